#!/usr/bin/env bash
# Adapts the kernel's WireGuard selftest (tools/testing/selftests/wireguard/
# netns.sh, GPL-2.0, not in this repository: tests/kernel_selftest.rs
# extracts it from Debian's linux-source-6.1 at test time) to a userspace
# device started with wireguard-go's command line. Issue #26.
#
#   adapt.sh NETNS.SH > ADAPTED.SH
#
# Each adaptation below is one named transformation of whole lines; every
# line stays on its line number, so a failure reported by the adapted
# script ("FAILED CHECK line N") is line N of the kernel's script. A
# transformation that does not find the lines it expects stops the adapter
# with an error: a new version of the script must be looked at, not
# half-adapted. The functions the adapted lines call (kst_*) are in
# prelude.bash, next to this file.
set -euo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 NETNS.SH > ADAPTED.SH" >&2; exit 2; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mapfile -t lines < "$1"

die() { echo "adapt.sh: $*" >&2; exit 1; }
# Replaces line i (0-based) and counts it for the running transformation.
hits=0
put() { lines[$1]=$2; hits=$((hits + 1)); }
# Checks how many lines the transformation just run changed.
expect() {
	local name=$1 want=$2
	if [[ $want == +* ]]; then
		(( hits >= ${want#+} )) || die "$name: changed $hits lines, expected at least ${want#+}"
	else
		(( hits == want )) || die "$name: changed $hits lines, expected $want"
	fi
	echo "adapt.sh: $name: $hits lines" >&2
	hits=0
}
removed() { printf ': # kst: removed (%s)' "$1"; }

# 1. Count failed checks instead of stopping at the first: `set -e` becomes
#    the prelude, whose ERR trap counts and prints each failing command
#    where `set -e` would have stopped, and whose DEBUG trap counts the
#    script's lines run (the checks).
for i in "${!lines[@]}"; do
	[[ ${lines[i]} == "set -e" ]] && put "$i" "source '$here/prelude.bash' # kst: was set -e"
done
expect "set -e -> counting prelude" 1

# 2. The cleanup trap reports the count and exits non-zero when a check
#    failed (and kills the devices left in namespaces it cannot see any
#    more), instead of its plain `exit`.
for i in "${!lines[@]}"; do
	[[ ${lines[i]} == $'\texit' ]] && put "$i" $'\tkst_finish # kst: was exit'
done
expect "cleanup exit -> kst_finish" 1

# 3. Per-namespace UAPI socket directories: `wg` finds a userspace device's
#    socket in /var/run/wireguard, which all namespaces share. n0/n1/n2 run
#    their command with the namespace's own directory bind-mounted there
#    (netns-exec), as a kernel device is seen only in its namespace.
re='^(n[012]\(\) \{ pretty [012] "\$\*"; maybe_exec )ip netns exec (\$netns[012] "\$@"; \})$'
for i in "${!lines[@]}"; do
	[[ ${lines[i]} =~ $re ]] && put "$i" "${BASH_REMATCH[1]}'$here/netns-exec' ${BASH_REMATCH[2]}"
done
expect "n0/n1/n2 -> per-namespace /var/run/wireguard" 3

# 4. `ip link add [dev] NAME type wireguard` in namespace N: start our
#    device there with wireguard-go's command line and wait for its
#    interface and socket (kst_wg_add).
declare -A wireguard_names
re='^([[:space:]]*)ip([012]) link add (dev )?([a-z0-9]+) type wireguard$'
for i in "${!lines[@]}"; do
	if [[ ${lines[i]} =~ $re ]]; then
		wireguard_names[${BASH_REMATCH[4]}]=1
		put "$i" "${BASH_REMATCH[1]}kst_wg_add ${BASH_REMATCH[2]} ${BASH_REMATCH[4]} # kst: was ${lines[i]#"${BASH_REMATCH[1]}"}"
	fi
done
expect "ip link add type wireguard -> device" +1

# 5. `ip link set NAME netns X` of a WireGuard link: the TUN interface moves
#    as the kernel's does (the device's UDP socket stays in the namespace
#    it was started in, as the kernel's stays in the creating namespace),
#    and its UAPI socket moves to X's directory (kst_wg_move).
re1='^([[:space:]]*)ip([012]) link set (dev )?([a-z0-9]+) netns \$netns([012])$'
re2='^([[:space:]]*)ip([012]) link set netns \$netns([012]) dev ([a-z0-9]+)$'
for i in "${!lines[@]}"; do
	if [[ ${lines[i]} =~ $re1 ]] && [[ -n ${wireguard_names[${BASH_REMATCH[4]}]:-} ]]; then
		put "$i" "${BASH_REMATCH[1]}kst_wg_move ${BASH_REMATCH[2]} ${BASH_REMATCH[4]} ${BASH_REMATCH[5]} # kst: was ${lines[i]#"${BASH_REMATCH[1]}"}"
	elif [[ ${lines[i]} =~ $re2 ]] && [[ -n ${wireguard_names[${BASH_REMATCH[4]}]:-} ]]; then
		put "$i" "${BASH_REMATCH[1]}kst_wg_move ${BASH_REMATCH[2]} ${BASH_REMATCH[4]} ${BASH_REMATCH[3]} # kst: was ${lines[i]#"${BASH_REMATCH[1]}"}"
	fi
done
expect "ip link set netns of a WireGuard link -> move with its socket" +1

# 6. `ip link del [dev] NAME` of a WireGuard link: the kernel device is
#    gone, its UDP port free, when the command returns; ours exits a moment
#    later, when it sees its interface gone, and the script may start the
#    next device on the same port at once: kst_wg_del also waits for the
#    process to exit.
re='^([[:space:]]*)ip([012]) link del (dev )?([a-z0-9]+)$'
for i in "${!lines[@]}"; do
	if [[ ${lines[i]} =~ $re ]] && [[ -n ${wireguard_names[${BASH_REMATCH[4]}]:-} ]]; then
		put "$i" "${BASH_REMATCH[1]}kst_wg_del ${BASH_REMATCH[2]} ${BASH_REMATCH[4]} # kst: was ${lines[i]#"${BASH_REMATCH[1]}"}"
	fi
done
expect "ip link del of a WireGuard link -> and wait for the device to exit" +1

# 7. The interface's own byte counters (`ip -stats link`) are the TUN
#    driver's, counting the packets it carries, not WireGuard's messages:
#    kernel-specific, left out (the `wg show transfer` checks stay).
re='< <\(ip[012] -stats link show dev [a-z0-9]+\)$'
for i in "${!lines[@]}"; do
	if [[ ${lines[i]} =~ $re ]]; then
		[[ ${lines[i + 1]} =~ ^\(\(.*\)\)$ ]] || die "-stats link: line $((i + 2)) is not the (( )) check: ${lines[i + 1]}"
		put "$i" "$(removed "interface byte counters are the TUN driver's")"
		put "$((i + 1))" "$(removed "its check")"
	fi
done
expect "ip -stats link byte counters -> left out" 4

# 8. No dummy driver here: the interface holding the other address is a
#    veth (its peer left down; the address is local all the same).
re='^([[:space:]]*)ip([012]) link add ([a-z0-9]+) type dummy$'
for i in "${!lines[@]}"; do
	if [[ ${lines[i]} =~ $re ]]; then
		put "$i" "${BASH_REMATCH[1]}ip${BASH_REMATCH[2]} link add ${BASH_REMATCH[3]} type veth peer name ${BASH_REMATCH[3]}p # kst: was type dummy"
	fi
done
expect "dummy -> veth" 1

# 9. The last part reads the module's debug messages about its kernel
#    objects from /dev/kmsg: kernel-specific, left out. Its last line
#    becomes kst_end, the mark that the script ran to its end.
start=-1 end=-1
for i in "${!lines[@]}"; do
	[[ ${lines[i]} == "declare -A objects" ]] && start=$i
	[[ ${lines[i]} == 'pretty "" "Objects that were created were also destroyed."' ]] && end=$i
done
(( start >= 0 && end > start && end == ${#lines[@]} - 1 )) || die "/dev/kmsg block: not found at the end (declare -A objects ... destroyed.)"
grep -q /dev/kmsg <(printf '%s\n' "${lines[@]:start:end-start}") || die "/dev/kmsg block: does not read /dev/kmsg"
for ((i = start; i < end; i++)); do
	put "$i" "$(removed "the module's object messages in the kernel log")"
done
put "$end" "kst_end"
expect "/dev/kmsg objects check -> left out" +2

# Nothing kernel-specific may be left over.
leftover=$(printf '%s\n' "${lines[@]}" | grep -n . | grep -v '# kst: was' | grep -E 'type (wireguard|dummy)$|-stats link|/dev/kmsg|:set -e$' || true)
[[ -z $leftover ]] || die "lines left unadapted:"$'\n'"$leftover"

printf '%s\n' "${lines[@]}"
