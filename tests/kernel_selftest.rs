//! The kernel's WireGuard selftest itself
//! (`tools/testing/selftests/wireguard/netns.sh`), run against our device
//! (issue #26). The script is the kernel's (GPL-2.0) and is not in this
//! repository: it is read at test time from Debian's `linux-source-6.1`
//! package (`/usr/src/linux-source-6.1.tar.xz`, scripts/setup-debian
//! installs it) and adapted by `tests/kernel_selftest/adapt.sh` to a
//! userspace device started with wireguard-go's command line (`bgp4mesh`
//! through a symlink named `bgp4mesh-wireguard`). docs/wireguard.md lists
//! the adaptations and the checks left out; `tests/wireguard_selftest.rs`
//! has each check as a test of its own.
//!
//! The adapted script counts its failed checks instead of stopping at the
//! first, and ends with `FAILED CHECKS: N`. Its namespaces are named after
//! its pid (`wg-test-PID-N`), so they collide with no other test's; it
//! deletes them at its exit, and this test deletes them too if it had to
//! kill the script.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bgp4mesh_lab::can_run;

const BIN: &str = env!("CARGO_BIN_EXE_bgp4mesh");
const SOURCES: &str = "/usr/src/linux-source-6.1.tar.xz";
const SCRIPT: &str = "linux-source-6.1/tools/testing/selftests/wireguard/netns.sh";
/// The script runs in about two minutes on an idle 2-core machine.
const TIMEOUT: Duration = Duration::from_secs(10 * 60);

#[test]
fn kernel_selftest_passes_against_our_device() -> Result<()> {
    if !can_run!(&[
        "bash", "tar", "xz", "wg", "ping", "ping6", "iperf3", "ncat", "ss", "iptables", "mount",
    ]) {
        return Ok(());
    }
    if !Path::new(SOURCES).exists() {
        let why = format!("{SOURCES} (apt-get install linux-source-6.1: scripts/setup-debian)");
        ensure!(
            std::env::var_os("CI").is_none(),
            "the kernel selftest cannot run under CI: needs {why}"
        );
        let banner = format!(
            "\n!!!!!!!! SKIPPED kernel_selftest_passes_against_our_device: needs {why} !!!!!!!!\n\n"
        );
        std::io::Write::write_all(&mut std::io::stderr(), banner.as_bytes())?;
        if let Some(report) = std::env::var_os("BGP4MESH_SKIP_REPORT") {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(report)?;
            std::io::Write::write_all(
                &mut file,
                format!("SKIPPED kernel_selftest_passes_against_our_device: needs {why}\n")
                    .as_bytes(),
            )?;
        }
        return Ok(());
    }

    let dir = RunDir::new()?;
    let original = dir.0.join("netns.sh");
    let extracted = Command::new("tar")
        .args(["-xJf", SOURCES, "-O", SCRIPT])
        .stdout(std::fs::File::create(&original)?)
        .status()
        .context("running tar")?;
    ensure!(
        extracted.success(),
        "tar -xJf {SOURCES} -O {SCRIPT}: {extracted}"
    );

    let kit = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kernel_selftest");
    let adapted = dir.0.join("adapted.sh");
    let adapt = Command::new("bash")
        .arg(kit.join("adapt.sh"))
        .arg(&original)
        .stdout(std::fs::File::create(&adapted)?)
        .output()
        .context("running adapt.sh")?;
    let notes = String::from_utf8_lossy(&adapt.stderr);
    ensure!(adapt.status.success(), "adapt.sh failed:\n{notes}");
    eprint!("{notes}");

    let device = dir.0.join("bgp4mesh-wireguard");
    std::os::unix::fs::symlink(BIN, &device)?;
    let kst = dir.0.join("kst");
    std::fs::create_dir(&kst)?;
    let output = dir.0.join("output.log");
    let started = Instant::now();
    let mut script = Command::new("bash")
        .arg(&adapted)
        .env("KST_DEVICE", &device)
        .env("KST_DIR", &kst)
        // The script's `sleep` is `read -t SECONDS` from its stdin: a pipe
        // that stays open and silent, or every sleep would end at once.
        .stdin(Stdio::piped())
        // A file, not a pipe: processes the script leaves running must not
        // keep this test waiting for the end of its output.
        .stdout(std::fs::File::create(&output)?)
        .stderr(std::fs::File::create(&output)?)
        .spawn()
        .context("starting the adapted selftest")?;
    let pid = script.id();
    let status = wait_or_kill(&mut script, TIMEOUT);
    let took = started.elapsed();
    sweep(pid, &kst);
    let status = status?;

    let log = std::fs::read_to_string(&output).unwrap_or_default();
    let failed = std::fs::read_to_string(kst.join("failed")).unwrap_or_default();
    let summary: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("kernel selftest:") || l.starts_with("FAILED CHECKS:"))
        .collect();
    eprintln!("{} (in {took:.0?})", summary.join("; "));
    let tail: Vec<&str> = log.lines().rev().take(60).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    ensure!(
        status.success()
            && log.contains("FAILED CHECKS: 0")
            && log.contains("The script ran to its end."),
        "the kernel selftest failed ({status}, after {took:.0?}); failed checks (lines of \
         netns.sh):\n{failed}\nthe end of its output:\n{}",
        tail.join("\n")
    );
    Ok(())
}

/// Waits for the script; after `timeout`, SIGTERM (its exit trap cleans
/// up), then SIGKILL.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let pid = libc::pid_t::try_from(child.id())?;
    // SAFETY: kill takes no pointers; the pid is our own child's.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let grace = Instant::now() + Duration::from_secs(20);
    while Instant::now() < grace {
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    bail!("the kernel selftest did not finish within {timeout:?}")
}

/// Whatever the script left behind (it was killed, or its cleanup
/// failed): our devices still running, and its namespaces.
fn sweep(pid: u32, kst: &Path) {
    let pids = std::fs::read_to_string(kst.join("pids")).unwrap_or_default();
    for device in pids
        .lines()
        .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
    {
        let cmdline = std::fs::read(format!("/proc/{device}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("bgp4mesh") {
            // SAFETY: kill takes no pointers; the pid is a device the
            // script started (checked by its command line just above).
            unsafe { libc::kill(device, libc::SIGTERM) };
        }
    }
    for n in 0..3 {
        let name = format!("wg-test-{pid}-{n}");
        if Path::new("/run/netns").join(&name).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// A directory of its own for one run, removed at the end.
struct RunDir(PathBuf);

impl RunDir {
    fn new() -> Result<RunDir> {
        let dir =
            std::env::temp_dir().join(format!("bgp4mesh-kernel-selftest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(RunDir(dir))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if std::env::var_os("BGP4MESH_KEEP_KERNEL_SELFTEST").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
