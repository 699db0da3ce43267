//! The lab: network namespaces joined by veth pairs and bridges, with
//! processes running inside them.

use std::collections::HashMap;
use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::command::{COMMAND_TIMEOUT, CommandOutput, describe, run};
use crate::sweep::{self, NETNS_PREFIX, PERSISTENT_OWNER, STATE_ROOT, SweepReport};

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// A machine in the lab: one network namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Node {
    name: String,
    netns: String,
}

impl Node {
    /// The name the test gave it.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The network namespace, for `ip netns exec`.
    pub fn netns(&self) -> &str {
        &self.netns
    }
}

/// One end of a link: an interface inside a node, with its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    pub node: Node,
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub prefix4: u8,
    pub ipv6: Ipv6Addr,
    pub prefix6: u8,
}

impl Iface {
    pub fn cidr4(&self) -> String {
        format!("{}/{}", self.ipv4, self.prefix4)
    }
    pub fn cidr6(&self) -> String {
        format!("{}/{}", self.ipv6, self.prefix6)
    }
}

/// A layer-2 segment (a bridge in a namespace of its own), like an IXP LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switch {
    pub node: Node,
    index: u16,
}

/// A process the lab started; it is stopped when the lab drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    pub name: String,
    pub node: Node,
    pub log: PathBuf,
}

struct Running {
    proc: Proc,
    child: Child,
}

#[derive(Default)]
struct Topology {
    nodes: Vec<Node>,
    next_iface: HashMap<String, u32>,
    links: u16,
    switches: u16,
    switch_hosts: HashMap<u16, u16>,
    unique_ifnames: u32,
}

/// A set of network namespaces owned by one test (or one `bgp4mesh lab`).
///
/// Everything it made is removed when it drops, also while unwinding from a
/// panic; then the logs of its processes are printed so a failing test shows
/// what the daemons said. What a killed run leaves behind is removed by
/// [`crate::sweep`], which every `Lab::new` calls first.
///
/// Processes are started with `PR_SET_PDEATHSIG`: they are killed when the
/// thread that created the lab ends, so keep the lab on one thread.
pub struct Lab {
    name: String,
    id: String,
    log_dir: PathBuf,
    persistent: bool,
    topology: Mutex<Topology>,
    running: Mutex<Vec<Running>>,
}

impl Lab {
    /// A new empty lab for the test `name`. Sweeps stale labs first.
    pub fn new(name: &str) -> Result<Lab> {
        Self::create(name, false)
    }

    /// A lab that outlives this process (for `bgp4mesh lab up`): not swept
    /// as stale, and its processes are not tied to this process's life.
    /// Remove it with [`crate::sweep_persistent`].
    pub fn new_persistent(name: &str) -> Result<Lab> {
        Self::create(name, true)
    }

    fn create(name: &str, persistent: bool) -> Result<Lab> {
        ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "lab name {name:?} must be letters, digits, '-' or '_'"
        );
        ensure_root()?;
        crate::require_binary("ip")?;
        let swept = sweep::sweep()?;
        report_sweep(&swept);

        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}_{}", base36(std::process::id()), base36(n));
        // The state directory appears whole, owner included (made aside and
        // renamed), so a concurrent sweep never sees a lab without an owner.
        fs::create_dir_all(STATE_ROOT).with_context(|| format!("cannot create {STATE_ROOT}"))?;
        let staging = Path::new(STATE_ROOT).join(format!(".new-{id}"));
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging)?;
        let owner = if persistent {
            PERSISTENT_OWNER.to_string()
        } else {
            sweep::owner_line()?
        };
        fs::write(staging.join("owner"), format!("{owner}\n"))?;
        fs::write(staging.join("name"), format!("{name}\n"))?;
        fs::rename(&staging, sweep::state_dir(&id))
            .with_context(|| format!("cannot create lab state directory for {id}"))?;

        let log_root = std::env::var_os("BGP4MESH_LAB_LOGS")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("bgp4mesh-lab-logs"));
        let log_dir = log_root.join(format!("{name}-{id}"));
        fs::create_dir_all(&log_dir)
            .with_context(|| format!("cannot create log directory {}", log_dir.display()))?;

        Ok(Lab {
            name: name.to_string(),
            id,
            log_dir,
            persistent,
            topology: Mutex::default(),
            running: Mutex::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Short unique id of this lab, part of every name it creates.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where process logs and generated configs go.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// A per-node directory with a short path, for control sockets and pid
    /// files (unix socket paths are limited to 107 bytes).
    pub fn run_dir(&self, node: &Node) -> Result<PathBuf> {
        let dir = sweep::state_dir(&self.id).join(&node.name);
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Writes a generated config file for `node` into the log directory (kept
    /// there to read when a test fails) and returns its path.
    pub fn write_config(&self, node: &Node, file: &str, contents: &str) -> Result<PathBuf> {
        let dir = self.log_dir.join(&node.name);
        fs::create_dir_all(&dir)?;
        let path = dir.join(file);
        fs::write(&path, contents).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// Adds a node: a network namespace with loopback up.
    pub fn add_node(&self, name: &str) -> Result<Node> {
        ensure!(
            !name.is_empty()
                && name.len() <= 32
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "node name {name:?} must be 1 to 32 letters, digits or '-'"
        );
        let node = Node {
            name: name.to_string(),
            netns: format!("{NETNS_PREFIX}{}-{name}", self.id),
        };
        {
            let topo = self.lock_topology();
            ensure!(
                !topo.nodes.contains(&node),
                "node {name} exists already in lab {}",
                self.name
            );
        }
        ip(&["netns", "add", &node.netns])?;
        self.lock_topology().nodes.push(node.clone());
        ip(&["-n", &node.netns, "link", "set", "lo", "up"])?;
        Ok(node)
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.lock_topology().nodes.clone()
    }

    fn next_iface_name(&self, node: &Node) -> String {
        let mut topo = self.lock_topology();
        let n = topo.next_iface.entry(node.name.clone()).or_insert(0);
        let name = format!("eth{n}");
        *n += 1;
        name
    }

    /// An interface name unique on the whole machine, for devices whose
    /// control socket lives in a directory shared by all namespaces
    /// (userspace WireGuard: `/var/run/wireguard/<name>.sock`).
    pub fn unique_ifname(&self, prefix: &str) -> Result<String> {
        let n = {
            let mut topo = self.lock_topology();
            topo.unique_ifnames += 1;
            topo.unique_ifnames
        };
        let name = format!("{prefix}{}{}", self.id, base36(n));
        ensure!(
            name.len() <= 15,
            "interface name {name} is longer than 15 bytes"
        );
        let list = sweep::state_dir(&self.id).join("ifnames");
        let mut names = fs::read_to_string(&list).unwrap_or_default();
        names.push_str(&name);
        names.push('\n');
        fs::write(&list, names)?;
        Ok(name)
    }

    /// Connects two nodes with a veth pair. Each end gets the next free
    /// `ethN` name in its node and addresses from a fresh /24 and /64:
    /// link k is 10.(k/256).(k%256).0/24 and fd00:(k)::/64, `a` is .1 / ::1
    /// and `b` is .2 / ::2. Both ends are up when this returns.
    pub fn link(&self, a: &Node, b: &Node) -> Result<(Iface, Iface)> {
        ensure!(a != b, "cannot link node {} to itself", a.name);
        let k = {
            let mut topo = self.lock_topology();
            topo.links = topo.links.checked_add(1).context("too many links")?;
            topo.links
        };
        let (name_a, name_b) = (self.next_iface_name(a), self.next_iface_name(b));
        ip(&[
            "link", "add", &name_a, "netns", &a.netns, "type", "veth", "peer", "name", &name_b,
            "netns", &b.netns,
        ])?;
        let v4 = |host: u8| Ipv4Addr::new(10, (k >> 8) as u8, (k & 0xff) as u8, host);
        let v6 = |host: u16| Ipv6Addr::new(0xfd00, k, 0, 0, 0, 0, 0, host);
        let end_a = Iface {
            node: a.clone(),
            name: name_a,
            ipv4: v4(1),
            prefix4: 24,
            ipv6: v6(1),
            prefix6: 64,
        };
        let end_b = Iface {
            node: b.clone(),
            name: name_b,
            ipv4: v4(2),
            prefix4: 24,
            ipv6: v6(2),
            prefix6: 64,
        };
        configure_iface(&end_a)?;
        configure_iface(&end_b)?;
        Ok((end_a, end_b))
    }

    /// Adds a layer-2 switch: a node holding bridge `br0`. Nodes attached
    /// with [`Lab::attach`] share its subnet 172.16.(s).0/24 and fd01:(s)::/64.
    pub fn add_switch(&self, name: &str) -> Result<Switch> {
        let node = self.add_node(name)?;
        let index = {
            let mut topo = self.lock_topology();
            topo.switches = topo.switches.checked_add(1).context("too many switches")?;
            ensure!(topo.switches < 256, "at most 255 switches per lab");
            topo.switches
        };
        ip(&["-n", &node.netns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &node.netns, "link", "set", "br0", "up"])?;
        Ok(Switch { node, index })
    }

    /// Attaches `node` to `switch` with a veth pair; returns the node's end,
    /// addressed .N / ::N in the switch's subnet (N = 1, 2, ... in order).
    pub fn attach(&self, switch: &Switch, node: &Node) -> Result<Iface> {
        let host = {
            let mut topo = self.lock_topology();
            let n = topo.switch_hosts.entry(switch.index).or_insert(0);
            *n += 1;
            ensure!(*n < 255, "switch {} is full", switch.node.name);
            *n
        };
        let port = self.next_iface_name(&switch.node);
        let name = self.next_iface_name(node);
        ip(&[
            "link",
            "add",
            &port,
            "netns",
            &switch.node.netns,
            "type",
            "veth",
            "peer",
            "name",
            &name,
            "netns",
            &node.netns,
        ])?;
        ip(&[
            "-n",
            &switch.node.netns,
            "link",
            "set",
            &port,
            "master",
            "br0",
            "up",
        ])?;
        let iface = Iface {
            node: node.clone(),
            name,
            ipv4: Ipv4Addr::new(172, 16, switch.index as u8, host as u8),
            prefix4: 24,
            ipv6: Ipv6Addr::new(0xfd01, switch.index, 0, 0, 0, 0, 0, host),
            prefix6: 64,
        };
        configure_iface(&iface)?;
        Ok(iface)
    }

    /// Adds one more address (`"44.30.127.1/32"`, `"2001:db8::1/64"`) to an
    /// interface of `node` (`"lo"` works too).
    pub fn add_address(&self, node: &Node, ifname: &str, cidr: &str) -> Result<()> {
        let mut args = vec!["-n", &node.netns, "addr", "add", cidr, "dev", ifname];
        if cidr.contains(':') {
            args.push("nodad");
        }
        ip(&args)
    }

    /// `ip route add <route...>` inside `node`, e.g. `&["default", "via", "10.0.1.1"]`.
    pub fn add_route(&self, node: &Node, route: &[&str]) -> Result<()> {
        let mut args = vec!["-n", node.netns.as_str(), "route", "add"];
        args.extend_from_slice(route);
        ip(&args)
    }

    /// Sets a sysctl inside `node`'s namespace (`net.*` keys are per namespace).
    pub fn sysctl(&self, node: &Node, key: &str, value: &str) -> Result<()> {
        self.exec(node, &["sysctl", "-q", "-w", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Makes `node` a router: IPv4 and IPv6 forwarding on.
    pub fn enable_forwarding(&self, node: &Node) -> Result<()> {
        self.sysctl(node, "net.ipv4.ip_forward", "1")?;
        self.sysctl(node, "net.ipv6.conf.all.forwarding", "1")
    }

    /// Loads the nftables table `inet table` with `chains` on `node`, or
    /// deletes it (`None`).
    pub fn nft_table(&self, node: &Node, table: &str, chains: Option<&str>) -> Result<()> {
        match chains {
            Some(chains) => {
                let file = self.run_dir(node)?.join(format!("{table}.nft"));
                fs::write(&file, format!("table inet {table} {{\n{chains}\n}}\n"))?;
                self.exec(node, &["nft", "-f", &file.to_string_lossy()])?;
            }
            None => {
                self.exec(node, &["nft", "delete", "table", "inet", table])?;
            }
        }
        Ok(())
    }

    /// Runs a command inside `node` and returns what it printed; fails with
    /// its stderr when it exits non-zero or runs past 30 s.
    pub fn exec(&self, node: &Node, cmd: &[&str]) -> Result<String> {
        let out = self.try_exec(node, cmd)?;
        if !out.success() {
            bail!(
                "`{}` in {} failed ({}): {}{}",
                cmd.join(" "),
                node.name,
                out.status,
                out.stderr.trim(),
                if out.stderr.trim().is_empty() {
                    out.stdout.trim()
                } else {
                    ""
                }
            );
        }
        Ok(out.stdout)
    }

    /// Runs a command inside `node`; a non-zero exit is not an error here.
    pub fn try_exec(&self, node: &Node, cmd: &[&str]) -> Result<CommandOutput> {
        self.exec_full(node, cmd, None, COMMAND_TIMEOUT)
    }

    /// Runs a command inside `node` with `stdin` and a deadline of your choice.
    pub fn exec_full(
        &self,
        node: &Node,
        cmd: &[&str],
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<CommandOutput> {
        ensure!(!cmd.is_empty(), "empty command");
        run(&mut self.netns_command(node, cmd), stdin, timeout)
    }

    fn netns_command(&self, node: &Node, cmd: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &node.netns]).args(cmd);
        command
    }

    /// Starts a long-running process inside `node`, stdout and stderr going
    /// to `<log dir>/<node>/<name>.log`. It must stay in the foreground (no
    /// daemonizing) so the lab can stop it.
    pub fn spawn(&self, node: &Node, name: &str, cmd: &[&str]) -> Result<Proc> {
        self.spawn_env(node, name, cmd, &[])
    }

    /// [`Lab::spawn`] with extra environment variables.
    pub fn spawn_env(
        &self,
        node: &Node,
        name: &str,
        cmd: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Proc> {
        ensure!(!cmd.is_empty(), "empty command");
        let dir = self.log_dir.join(&node.name);
        fs::create_dir_all(&dir)?;
        let log = dir.join(format!("{name}.log"));
        let file =
            fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = self.netns_command(node, cmd);
        command
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        if !self.persistent {
            // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and only
            // sets a flag on the child; no allocation happens between fork
            // and exec here.
            unsafe {
                command.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        } else {
            command.process_group(0);
        }
        let shown = describe(&command);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start `{shown}`"))?;
        let proc = Proc {
            pid: child.id(),
            name: name.to_string(),
            node: node.clone(),
            log,
        };
        self.lock_running().push(Running {
            proc: proc.clone(),
            child,
        });
        Ok(proc)
    }

    /// Runs `f` on a thread that has entered `node`'s network namespace, so
    /// a test can open sockets there itself (no helper tools needed). Only
    /// that thread moves; the caller stays where it is.
    pub fn in_netns<T: Send>(&self, node: &Node, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = format!("/run/netns/{}", node.netns);
        let ns = fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    use std::os::fd::AsRawFd;
                    // SAFETY: setns on a valid namespace descriptor; it only
                    // changes this thread's network namespace.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(anyhow::anyhow!(
                            "setns into {}: {}",
                            node.netns,
                            std::io::Error::last_os_error()
                        ));
                    }
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the thread in {} panicked", node.netns))?
        })
    }

    /// Whether `proc` is still running (a stopped-by-signal process counts).
    pub fn is_running(&self, proc: &Proc) -> bool {
        let mut running = self.lock_running();
        running
            .iter_mut()
            .find(|r| r.proc.pid == proc.pid)
            .is_some_and(|r| matches!(r.child.try_wait(), Ok(None)))
    }

    /// Sends `signal` (libc::SIGSTOP, SIGCONT, SIGKILL, ...) to `proc`.
    pub fn signal(&self, proc: &Proc, signal: i32) -> Result<()> {
        ensure!(
            self.is_running(proc),
            "{} in {} is not running",
            proc.name,
            proc.node.name
        );
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(proc.pid as libc::pid_t, signal) };
        ensure!(
            rc == 0,
            "kill({}, {signal}): {}",
            proc.pid,
            std::io::Error::last_os_error()
        );
        Ok(())
    }

    /// Stops `proc`: SIGTERM, then SIGKILL after 2 s. Idempotent.
    pub fn stop(&self, proc: &Proc) {
        let mut running = self.lock_running();
        if let Some(i) = running.iter().position(|r| r.proc.pid == proc.pid) {
            let r = running.remove(i);
            drop(running);
            stop_all(vec![r]);
        }
    }

    /// The last `lines` lines a process wrote.
    pub fn log_tail(&self, proc: &Proc, lines: usize) -> String {
        tail(&proc.log, lines)
    }

    fn lock_topology(&self) -> std::sync::MutexGuard<'_, Topology> {
        self.topology.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, Vec<Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tears the lab down now (also done on drop).
    pub fn destroy(self) {}

    fn print_diagnostics(&self) {
        eprintln!(
            "\n==== lab {} ({}) failed; logs in {} ====",
            self.name,
            self.id,
            self.log_dir.display()
        );
        for r in self.lock_running().iter() {
            eprintln!(
                "---- {} on {} (last 40 lines) ----",
                r.proc.name, r.proc.node.name
            );
            eprintln!("{}", tail(&r.proc.log, 40));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if failed {
            self.print_diagnostics();
        }
        if self.persistent {
            // Left running on purpose; `bgp4mesh lab down` removes it.
            for mut r in self.lock_running().drain(..) {
                let _ = r.child.try_wait();
            }
            return;
        }
        stop_all(std::mem::take(&mut *self.lock_running()));
        let mut report = SweepReport::default();
        sweep::destroy_lab(&self.id, &mut report);
        if !failed && std::env::var_os("BGP4MESH_LAB_KEEP_LOGS").is_none() {
            let _ = fs::remove_dir_all(&self.log_dir);
        }
    }
}

fn stop_all(mut procs: Vec<Running>) {
    for r in &procs {
        // SAFETY: kill(2) on children we spawned and have not reaped; a
        // stopped one is continued so it can act on SIGTERM.
        unsafe {
            libc::kill(r.proc.pid as libc::pid_t, libc::SIGTERM);
            libc::kill(r.proc.pid as libc::pid_t, libc::SIGCONT);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        procs.retain_mut(|r| matches!(r.child.try_wait(), Ok(None)));
        if procs.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for r in &mut procs {
        let _ = r.child.kill();
        let _ = r.child.wait();
    }
}

fn configure_iface(iface: &Iface) -> Result<()> {
    let ns = iface.node.netns.as_str();
    ip(&["-n", ns, "addr", "add", &iface.cidr4(), "dev", &iface.name])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &iface.cidr6(),
        "dev",
        &iface.name,
        "nodad",
    ])?;
    ip(&["-n", ns, "link", "set", &iface.name, "up"])
}

fn ip(args: &[&str]) -> Result<()> {
    let out = run(Command::new("ip").args(args), None, COMMAND_TIMEOUT)?;
    ensure!(
        out.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        out.stderr.trim()
    );
    Ok(())
}

fn ensure_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "the lab needs root (network namespaces); running as uid {euid}"
    );
    Ok(())
}

fn report_sweep(report: &SweepReport) {
    if !report.is_empty() {
        eprintln!(
            "lab: swept leftovers of killed runs: labs {:?}, namespaces {:?}, {} processes killed",
            report.labs, report.namespaces, report.processes_killed
        );
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub(crate) fn base36(mut n: u32) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::base36;

    #[test]
    fn base36_is_short_and_unambiguous() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        assert_eq!(base36(4_194_304), "2hwcg");
    }
}
