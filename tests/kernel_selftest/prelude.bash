# Sourced by the adapted kernel selftest (adapt.sh) in place of its `set -e`:
# what its adapted lines call. Our code, not the kernel's.
#
# Environment:
#   KST_DEVICE  the userspace implementation, started as wireguard-go is:
#               `$KST_DEVICE --foreground IFACE` (bgp4mesh through a
#               symlink named bgp4mesh-wireguard)
#   KST_DIR     an empty directory for this run: the devices' socket
#               directories and logs, the namespaces' socket views, the
#               devices' pids

: "${KST_DEVICE:?the userspace WireGuard implementation to test}"
: "${KST_DIR:?an empty directory for this run}"
mkdir -p "$KST_DIR/ns" "$KST_DIR/dev" /run/wireguard
kst_devices=0

# --- Counting failed checks instead of stopping at the first (set -e) ----
#
# The ERR trap fires exactly where `set -e` would have stopped the script
# (the same exemptions: if/while conditions, && and || lists but the last,
# `!`). With -E it also fires inside functions; a failure is counted once,
# where the script itself ran the failing command: not inside the script's
# helpers (n1, ip1, pp, maybe_exec...) whose failure comes back out as the
# failure of the script's line that called them, and not again for a call
# of the script's own functions (tests, configure_peers) whose failing
# command was counted inside. Subshells (background jobs, process
# substitutions) are not counted: `set -e` did not stop the script for
# them either.
set -E
kst_failed=0
kst_helpers=" source pretty pp maybe_exec n0 n1 n2 ip0 ip1 ip2 sleep waitiperf waitncatudp waitiface cleanup "
kst_is_helper() { [[ $kst_helpers == *" $1 "* || $1 == kst_* ]]; }
# The script's lines, to name the failed ones (BASH_COMMAND names the
# innermost command, "$@" in a helper).
mapfile -t kst_script < "$0"
kst_err() {
	local status=$1 line=$2 where=${FUNCNAME[1]:-main}
	((BASH_SUBSHELL == 0)) || return 0
	kst_is_helper "$where" && return 0
	local text=${kst_script[line - 1]}
	local first=${text#"${text%%[![:space:]]*}"}
	first=${first%% *}
	if [[ $(type -t -- "$first") == function ]] && ! kst_is_helper "$first"; then
		return 0
	fi
	((++kst_failed))
	[[ $where == main ]] && where= || where=" (in $where)"
	printf '\x1b[31m\x1b[1mFAILED CHECK line %s%s: %s (exit status %s)\x1b[0m\n' \
		"$line" "$where" "$text" "$status" >&3
	printf 'line %s%s: %s (exit status %s)\n' "$line" "$where" "$text" "$status" >> "$KST_DIR/failed"
}
trap 'kst_err $? $LINENO' ERR

# The checks run: the script's lines run outside its helpers, each one a
# place where `set -e` would stop it.
set -T
declare -A kst_lines
kst_step() {
	((BASH_SUBSHELL == 0)) || return 0
	local where=${FUNCNAME[1]:-main}
	kst_is_helper "$where" && return 0
	kst_lines[$2]=1
}
trap 'kst_step "$BASH_COMMAND" $LINENO' DEBUG

# --- Devices -----------------------------------------------------------
#
# Each device gets its own UAPI socket directory, mounted over
# /var/run/wireguard for it alone, so a device exiting removes its own
# socket and never another's of the same name. Each namespace has a
# directory of links to the sockets of the devices whose interfaces are in
# it; netns-exec mounts that one over /var/run/wireguard for `wg`.

# kst_wg_add N NAME: `ipN link add NAME type wireguard`.
kst_wg_add() {
	local index=$1 name=$2 var="netns$1"
	local ns=${!var}
	local dir="$KST_DIR/dev/$((++kst_devices))"
	pretty "$index" "${KST_DEVICE##*/} --foreground $name (for: ip link add $name type wireguard)"
	mkdir -p "$dir" "$KST_DIR/ns/$ns"
	ip netns exec "$ns" bash -c 'mount --bind "$0" /var/run/wireguard && exec "$@"' \
		"$dir" "$KST_DEVICE" --foreground "$name" < /dev/null > "$dir/log" 2>&1 &
	local pid=$!
	echo "$pid" >> "$KST_DIR/pids"
	echo "$pid" > "$dir/pid"
	local tries
	for ((tries = 0; tries < 200; tries++)); do
		if [[ -S $dir/$name.sock ]] && ip -n "$ns" link show dev "$name" > /dev/null 2>&1; then
			ln -sfn "$dir/$name.sock" "$KST_DIR/ns/$ns/$name.sock"
			return 0
		fi
		kill -0 "$pid" 2> /dev/null || break
		command sleep 0.05 # not the script's sleep, which reads stdin
	done
	echo "kst: the device for $name in $ns did not come up; its log:" >&3
	cat "$dir/log" >&3
	return 1
}

# kst_wg_move N NAME M: `ipN link set NAME netns $netnsM`. The interface
# moves; the device's UDP socket stays where it was opened, as the kernel
# device's stays in the namespace that created it. `wg` in M finds the
# socket from then on.
kst_wg_move() {
	local from_var="netns$1" name=$2 to_var="netns$3"
	local from=${!from_var} to=${!to_var}
	pretty "$1" "ip link set $name netns $to (and its UAPI socket)"
	ip -n "$from" link set "$name" netns "$to" || return
	mkdir -p "$KST_DIR/ns/$to"
	mv -f "$KST_DIR/ns/$from/$name.sock" "$KST_DIR/ns/$to/$name.sock"
}

# kst_alive PID: the process runs (and is not a zombie yet to be reaped).
kst_alive() {
	local state
	read -r _ _ state _ 2> /dev/null < "/proc/$1/stat" && [[ $state != Z ]]
}

# kst_wg_del N NAME: `ipN link del NAME` of a WireGuard link. The kernel
# device is gone when `ip link del` returns, its UDP port free at once; our
# device exits when it sees its interface gone, a moment later. The next
# device the script starts may want the same port in the same namespace:
# this waits for the process to exit.
kst_wg_del() {
	local var="netns$1" name=$2
	local ns=${!var}
	local socket="$KST_DIR/ns/$ns/$name.sock" pid= tries
	[[ -L $socket ]] && pid=$(< "$(dirname "$(readlink "$socket")")/pid")
	pretty "$1" "ip link del $name (and wait for its device to exit)"
	ip -n "$ns" link del dev "$name" || return
	rm -f "$socket"
	[[ -n $pid ]] || return 0
	for ((tries = 0; tries < 100; tries++)); do
		kst_alive "$pid" || return 0
		command sleep 0.05
	done
	echo "kst: the device of $name in $ns (pid $pid) did not exit within 5 s of its interface's deletion" >&3
	return 1
}

# --- The end -----------------------------------------------------------

kst_completed=0
# The script's last line: it ran to its end.
kst_end() {
	kst_completed=1
	pretty "" "The script ran to its end."
}

# Called by the script's cleanup (its EXIT trap) in place of `exit`: kills
# the devices still running (those whose namespaces the script deleted while
# their processes held them: the kernel's "circular reference" check moves
# two interfaces into each other's namespaces), reports, and exits non-zero
# when a check failed or the script did not run to its end.
kst_finish() {
	local pid tries left
	trap - ERR DEBUG
	while read -r pid; do
		[[ $(tr '\0' ' ' < "/proc/$pid/cmdline") == *bgp4mesh* ]] 2> /dev/null && kill "$pid" 2> /dev/null
	done < <(cat "$KST_DIR/pids" 2> /dev/null)
	for ((tries = 0; tries < 100; tries++)); do
		left=0
		while read -r pid; do
			kst_alive "$pid" && left=1
		done < <(cat "$KST_DIR/pids" 2> /dev/null)
		((left)) || break
		command sleep 0.05
	done
	echo "kernel selftest: ${#kst_lines[@]} checks run, $kst_failed failed, devices started: $kst_devices" >&3
	if ((kst_completed == 0)); then
		echo "kernel selftest: the script stopped before its end" >&3
		((++kst_failed))
	fi
	echo "FAILED CHECKS: $kst_failed" >&3
	# (In an EXIT trap a bare `exit` keeps the status the script had.)
	exit $((kst_failed > 0))
}
