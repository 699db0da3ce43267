//! `bgp4mesh check` and `bgp4mesh run` agree, and `run` leaves no control
//! socket behind however it ends. These run the binary with no namespace
//! and no kernel routes (`[kernel] enabled = false`, listeners on loopback),
//! so they need no root.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

const BIN: &str = env!("CARGO_BIN_EXE_bgp4mesh");

/// A directory of its own for one test: config and control socket.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("b4m-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }

    fn socket(&self) -> PathBuf {
        self.0.join("control.sock")
    }

    /// Writes a config with the control socket here and `body` after it.
    fn config(&self, body: &str) -> Result<PathBuf> {
        let path = self.0.join("bgp4mesh.toml");
        let text = format!(
            "[control]\nsocket = \"{}\"\n\n[kernel]\nenabled = false\n\n{body}\n",
            self.socket().display()
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `[bgp]` listening on a loopback port.
fn bgp_section(port: u16, neighbor: &str) -> String {
    format!(
        "[bgp]\nasn = 65000\nrouter_id = \"10.0.0.1\"\nlisten = [\"127.0.0.1:{port}\"]\n\n{neighbor}"
    )
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn bgp4mesh(args: &[&str]) -> Result<Output> {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running bgp4mesh")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Waits for `child` to exit, killing it after `timeout`.
fn wait_exit(child: &mut Child, timeout: Duration) -> Result<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("bgp4mesh run did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the daemon on `config` with stderr captured.
fn start(config: &Path) -> Result<Child> {
    Command::new(BIN)
        .args(["run", "-c"])
        .arg(config)
        .args(["--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting bgp4mesh run")
}

fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut err, &mut text);
    }
    text
}

#[test]
fn check_refuses_a_tcp_md5_key_that_run_could_not_set() -> Result<()> {
    let scratch = Scratch::new("check-md5")?;
    let key = "k".repeat(100);
    let neighbor = format!(
        "[[bgp.neighbor]]\nname = \"isp\"\naddress = \"127.0.0.2\"\nremote_as = 65001\npassword = \"{key}\"\n"
    );
    let config = scratch.config(&bgp_section(free_port()?, &neighbor))?;
    let config_arg = config.to_str().context("path")?;
    let out = bgp4mesh(&["check", "-c", config_arg])?;
    let said = text(&out);
    ensure!(!out.status.success(), "check accepted it: {said}");
    ensure!(
        said.contains("bgp.neighbor[0].password: the TCP-MD5 key is 100 bytes"),
        "check does not name the field: {said}"
    );
    // run refuses it the same way, before anything is bound.
    let mut run = start(&config)?;
    let status = wait_exit(&mut run, Duration::from_secs(20))?;
    let said = stderr_of(&mut run);
    ensure!(!status.success(), "run accepted it: {said}");
    ensure!(said.contains("bgp.neighbor[0].password"), "{said}");
    ensure!(!scratch.socket().exists(), "run left its control socket");
    Ok(())
}

#[test]
fn run_failing_at_start_up_leaves_no_control_socket() -> Result<()> {
    let scratch = Scratch::new("start-fails")?;
    // The port is taken: the config is valid (check says OK), binding the
    // listener fails once the control socket is up.
    let taken = TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port();
    let config = scratch.config(&bgp_section(port, ""))?;
    let out = bgp4mesh(&["check", "-c", config.to_str().context("path")?])?;
    ensure!(out.status.success(), "check: {}", text(&out));
    let mut run = start(&config)?;
    let status = wait_exit(&mut run, Duration::from_secs(20))?;
    let said = stderr_of(&mut run);
    ensure!(!status.success(), "run started on a taken port: {said}");
    ensure!(
        said.contains(&format!("bgp.listen: cannot listen on 127.0.0.1:{port}")),
        "{said}"
    );
    ensure!(
        !scratch.socket().exists(),
        "the failed start left {}",
        scratch.socket().display()
    );
    Ok(())
}

#[test]
fn run_replaces_a_stale_socket_and_removes_its_own_on_a_signal() -> Result<()> {
    let scratch = Scratch::new("signals")?;
    // What a killed run leaves behind: a socket nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(scratch.socket())?);
    ensure!(scratch.socket().exists());
    let config = scratch.config(&bgp_section(free_port()?, ""))?;
    let socket = scratch.socket();
    let socket_arg = socket.to_str().context("path")?;
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let mut run = start(&config)?;
        let started = Instant::now();
        loop {
            let out = bgp4mesh(&["-s", socket_arg, "show", "protocols", "--json"])?;
            if out.status.success() {
                break;
            }
            if let Some(status) = run.try_wait()? {
                bail!("run exited ({status}): {}", stderr_of(&mut run));
            }
            ensure!(
                started.elapsed() < Duration::from_secs(20),
                "the daemon does not answer: {}",
                text(&out)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let pid = i32::try_from(run.id())?;
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        ensure!(unsafe { libc::kill(pid, signal) } == 0, "kill {name}");
        let status = wait_exit(&mut run, Duration::from_secs(20))?;
        ensure!(
            status.success(),
            "{name}: exit {status}: {}",
            stderr_of(&mut run)
        );
        ensure!(!socket.exists(), "{name}: the control socket was left");
    }
    Ok(())
}
