//! Naming of lab resources and removal of what a killed run left behind.
//!
//! Every lab has a short id made of its owner's pid and a counter. Its network
//! namespaces are named `b4m-<id>-<node>`, and its state directory
//! `/run/bgp4mesh-lab/<id>/` holds an `owner` file (`<pid> <start time>`) and
//! an `ifnames` file listing the machine-wide unique interface names it
//! handed out (wireguard-go's UAPI sockets live in one shared directory).
//! A lab whose owner process no longer exists is stale and is swept: its
//! processes are killed, its namespaces deleted, its sockets removed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::command::{COMMAND_TIMEOUT, run};

/// Prefix of every network namespace a lab creates.
pub const NETNS_PREFIX: &str = "b4m-";
/// Where labs keep their state (owner, sockets, pid files).
pub const STATE_ROOT: &str = "/run/bgp4mesh-lab";
/// Where `ip netns` keeps named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Where userspace WireGuard implementations put their UAPI sockets.
pub const WIREGUARD_SOCKET_DIR: &str = "/var/run/wireguard";

/// An owner written as `0 0` is a persistent lab (`bgp4mesh lab up`): never
/// swept automatically, only removed by an explicit teardown.
pub(crate) const PERSISTENT_OWNER: &str = "0 0";

/// What a sweep removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    pub namespaces: Vec<String>,
    pub processes_killed: usize,
    pub labs: Vec<String>,
}

impl SweepReport {
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.labs.is_empty() && self.processes_killed == 0
    }
}

pub fn state_dir(id: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(id)
}

/// The owner line for the current process: pid and its kernel start time, so
/// that a recycled pid is not mistaken for a live owner.
pub(crate) fn owner_line() -> Result<String> {
    let pid = std::process::id();
    let start = process_start_time(pid).context("cannot read this process's start time")?;
    Ok(format!("{pid} {start}"))
}

fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces; fields
    // after it are space separated. starttime is field 22 overall, the 20th
    // after the closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn owner_alive(owner: &str) -> bool {
    if owner.trim() == PERSISTENT_OWNER {
        return true;
    }
    let mut words = owner.split_whitespace();
    let (Some(pid), Some(start)) = (words.next(), words.next()) else {
        return false;
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return false;
    };
    process_start_time(pid) == Some(start)
}

/// The lab id in a namespace name `b4m-<id>-<node>`.
pub(crate) fn lab_id_of_namespace(ns: &str) -> Option<&str> {
    let rest = ns.strip_prefix(NETNS_PREFIX)?;
    let (id, node) = rest.split_once('-')?;
    (!id.is_empty() && !node.is_empty()).then_some(id)
}

fn list_dir_names(dir: &str) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Namespaces that belong to lab `id`.
pub(crate) fn namespaces_of(id: &str) -> Vec<String> {
    let prefix = format!("{NETNS_PREFIX}{id}-");
    list_dir_names(NETNS_DIR)
        .into_iter()
        .filter(|ns| ns.starts_with(&prefix))
        .collect()
}

/// Kills every process in namespace `ns` and deletes it. Returns how many
/// processes were killed.
pub(crate) fn destroy_namespace(ns: &str) -> usize {
    let mut killed = 0;
    // A few rounds: a dying daemon may have forked a helper.
    for _ in 0..3 {
        let pids = namespace_pids(ns);
        if pids.is_empty() {
            break;
        }
        for pid in &pids {
            // SAFETY: kill(2) with a pid read from the kernel and a valid
            // signal number; it touches no memory of ours.
            if unsafe { libc::kill(*pid, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = run(
        Command::new("ip").args(["netns", "delete", ns]),
        None,
        COMMAND_TIMEOUT,
    );
    killed
}

fn namespace_pids(ns: &str) -> Vec<i32> {
    run(
        Command::new("ip").args(["netns", "pids", ns]),
        None,
        COMMAND_TIMEOUT,
    )
    .map(|out| {
        out.stdout
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    })
    .unwrap_or_default()
}

/// Removes what lab `id` owns on the machine: processes, namespaces, UAPI
/// sockets of its interfaces, its state directory.
pub(crate) fn destroy_lab(id: &str, report: &mut SweepReport) {
    for ns in namespaces_of(id) {
        report.processes_killed += destroy_namespace(&ns);
        report.namespaces.push(ns);
    }
    let dir = state_dir(id);
    if let Ok(names) = fs::read_to_string(dir.join("ifnames")) {
        for name in names.split_whitespace() {
            let _ = fs::remove_file(Path::new(WIREGUARD_SOCKET_DIR).join(format!("{name}.sock")));
        }
    }
    let _ = fs::remove_dir_all(&dir);
    report.labs.push(id.to_string());
}

/// Removes every lab whose owner process is gone: what a run killed with
/// `kill -9` left behind. Live labs of other processes are not touched, so
/// parallel tests may call this at any time.
pub fn sweep() -> Result<SweepReport> {
    sweep_where(|owner| !owner_alive(owner))
}

/// Removes every lab, live or not, persistent or not (`bgp4mesh lab sweep --all`).
pub fn sweep_all() -> Result<SweepReport> {
    sweep_where(|_| true)
}

/// The id of the persistent lab called `name` (`bgp4mesh lab up` makes
/// one), if there is one.
pub fn find_persistent(name: &str) -> Option<String> {
    list_dir_names(STATE_ROOT)
        .into_iter()
        .filter(|id| !id.starts_with('.'))
        .find(|id| {
            let dir = state_dir(id);
            let owner = fs::read_to_string(dir.join("owner")).unwrap_or_default();
            let lab = fs::read_to_string(dir.join("name")).unwrap_or_default();
            owner.trim() == PERSISTENT_OWNER && lab.trim() == name
        })
}

/// The network namespace of node `node` in lab `id`.
pub fn netns_of(id: &str, node: &str) -> String {
    format!("{NETNS_PREFIX}{id}-{node}")
}

/// Removes the persistent labs (`bgp4mesh lab down`).
pub fn sweep_persistent() -> Result<SweepReport> {
    sweep_where(|owner| owner.trim() == PERSISTENT_OWNER)
}

fn sweep_where(doomed: impl Fn(&str) -> bool) -> Result<SweepReport> {
    let mut report = SweepReport::default();
    let mut ids: Vec<String> = list_dir_names(NETNS_DIR)
        .iter()
        .filter_map(|ns| lab_id_of_namespace(ns).map(str::to_string))
        .chain(
            // Names starting with '.' are labs still being created.
            list_dir_names(STATE_ROOT)
                .into_iter()
                .filter(|id| !id.starts_with('.')),
        )
        .collect();
    ids.sort();
    ids.dedup();
    for id in ids {
        // A namespace without an owner file is stale too: a lab writes its
        // owner before it creates any namespace.
        let owner = fs::read_to_string(state_dir(&id).join("owner")).unwrap_or_default();
        if doomed(&owner) {
            destroy_lab(&id, &mut report);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_give_back_their_lab_id() {
        assert_eq!(lab_id_of_namespace("b4m-k3x9_a1-bird"), Some("k3x9_a1"));
        assert_eq!(
            lab_id_of_namespace("b4m-k3x9a1-edge-router"),
            Some("k3x9a1")
        );
        assert_eq!(lab_id_of_namespace("b4m-k3x9a1-"), None);
        assert_eq!(lab_id_of_namespace("b4m--bird"), None);
        assert_eq!(lab_id_of_namespace("other-ns"), None);
    }

    #[test]
    fn own_process_is_a_live_owner_and_a_made_up_one_is_not() {
        let me = owner_line().expect("own start time");
        assert!(owner_alive(&me));
        let pid = std::process::id();
        assert!(!owner_alive(&format!("{pid} 1")));
        assert!(!owner_alive("garbage"));
        assert!(!owner_alive(""));
        assert!(owner_alive(PERSISTENT_OWNER));
    }
}
