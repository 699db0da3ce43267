//! Network-namespace labs for bgp4mesh's end-to-end tests and demos.
//!
//! A [`Lab`] is a set of network namespaces ("nodes") joined by veth pairs
//! and bridges, with processes running inside them: real routing daemons
//! (BIRD, FRR, GoBGP, wireguard-go; see [`peers`]) and bgp4mesh itself. All
//! traffic stays inside the lab's namespaces. Everything is removed when the
//! lab drops, and [`sweep`] removes what a killed run left behind.
//!
//! ```no_run
//! use bgp4mesh_lab::{Lab, wait_until};
//! # fn main() -> anyhow::Result<()> {
//! let lab = Lab::new("ping-example")?;
//! let (a, b) = (lab.add_node("a")?, lab.add_node("b")?);
//! let (_, b_end) = lab.link(&a, &b)?;
//! lab.exec(&a, &["ping", "-c1", "-W1", &b_end.ipv4.to_string()])?;
//! # Ok(()) }
//! ```
//!
//! This crate changes the kernel only through the `ip` command, inside the
//! namespaces it creates. It is test and demo tooling, not part of the
//! daemon's data path (see ARCHITECTURE.md).

mod command;
mod lab;
pub mod nat;
pub mod own_as;
pub mod peers;
pub mod postgres;
pub mod scenarios;
mod sweep;

use std::time::{Duration, Instant};

pub use command::{CommandOutput, find_binary, require_binary};
pub use lab::{Iface, Lab, Node, Proc, Switch};
pub use sweep::{
    SweepReport, find_persistent, netns_of, state_dir, sweep, sweep_all, sweep_persistent,
};

/// Polls `probe` until it returns `Ok`, backing off from 20 ms to 250 ms.
/// On timeout the error names `what` and carries the last probe's error, so
/// a failing test says what it last saw.
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        match probe() {
            Ok(value) => return Ok(value),
            Err(last) => {
                let waited = start.elapsed();
                if waited >= timeout {
                    anyhow::bail!(
                        "timed out after {waited:.1?} waiting for {what}; last probe: {last:#}"
                    );
                }
                std::thread::sleep(pause.min(timeout - waited));
                pause = (pause * 2).min(Duration::from_millis(250));
            }
        }
    }
}

/// [`can_run`] under the name of the function it is called in, so a
/// test's skip message and CI failure name the test without repeating it.
///
/// ```no_run
/// fn bird_sees_route() {
///     if !bgp4mesh_lab::can_run!(&["bird", "birdc"]) {
///         return;
///     }
/// }
/// ```
#[macro_export]
macro_rules! can_run {
    ($binaries:expr $(,)?) => {{
        fn here() {}
        $crate::can_run(
            $crate::enclosing_function(::std::any::type_name_of_val(&here)),
            $binaries,
        )
    }};
}

/// The name of the function a `fn here() {}` item was declared in, from
/// its type name (`crate::module::function::here`).
#[doc(hidden)]
pub fn enclosing_function(here: &str) -> &str {
    let path = here.strip_suffix("::here").unwrap_or(here);
    path.rsplit("::").next().unwrap_or(path)
}

/// Whether an end-to-end test can run here. Such tests need root and some
/// programs. When something is missing, the test is skipped with a loud
/// message, except under CI (`CI` set), where a skip would hide a broken
/// setup: there this panics instead.
///
/// ```no_run
/// # fn t() {
/// if !bgp4mesh_lab::can_run("bird_sees_route", &["bird", "birdc"]) {
///     return;
/// }
/// # }
/// ```
#[allow(
    clippy::panic,
    reason = "called from tests: under CI the test must fail"
)]
pub fn can_run(test: &str, binaries: &[&str]) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (network namespaces)".to_string());
    }
    for name in std::iter::once(&"ip").chain(binaries) {
        if let Err(e) = require_binary(name) {
            missing.push(format!("{e:#}"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let why = missing.join("; ");
    if std::env::var_os("CI").is_some() {
        panic!("end-to-end test {test} cannot run under CI: {why}");
    }
    // Written straight to stderr: libtest's capture only takes eprintln!.
    let banner = format!("\n!!!!!!!! SKIPPED {test}: needs {why} !!!!!!!!\n\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), banner.as_bytes());
    // nextest hides a passing test's output; scripts/test prints this file.
    if let Some(report) = std::env::var_os("BGP4MESH_SKIP_REPORT") {
        let line = format!("SKIPPED {test}: needs {why}\n");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(report);
        let _ = file.and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn can_run_names_the_test_it_is_called_in() {
        fn bird_sees_route() -> &'static str {
            fn here() {}
            enclosing_function(std::any::type_name_of_val(&here))
        }
        assert_eq!(bird_sees_route(), "bird_sees_route");
    }

    #[test]
    fn wait_until_returns_the_value_once_the_probe_succeeds() {
        let mut calls = 0;
        let got = wait_until(Duration::from_secs(5), "third call", || {
            calls += 1;
            anyhow::ensure!(calls >= 3, "only {calls} calls");
            Ok(calls)
        });
        assert_eq!(got.expect("succeeds"), 3);
    }

    #[test]
    fn wait_until_reports_the_last_probe_on_timeout() {
        let err = wait_until(
            Duration::from_millis(60),
            "the impossible",
            || -> anyhow::Result<()> { anyhow::bail!("still nothing") },
        )
        .expect_err("times out");
        let text = format!("{err:#}");
        assert!(text.contains("the impossible"), "{text}");
        assert!(text.contains("still nothing"), "{text}");
    }
}
