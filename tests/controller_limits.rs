//! The controller under connection exhaustion (issue 15): `bgp4mesh server`
//! with a 1024 open-files limit, 1,100 clients that finish the TLS
//! handshake and send nothing and 200 that send a request head a byte at a
//! time, from 40 loopback addresses; meanwhile an admin's `curl
//! /api/networks` from another address is answered within 1 s every time,
//! and the attackers' connections are closed by the header timeout.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bgp4mesh_lab::can_run;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

const MASTER: &str = "limits-master-key-0123456789";
const IDLE: usize = 1100;
const SLOWLORIS: usize = 200;
const SOURCES: u8 = 40;

struct Server {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_server(port: u16) -> Result<Server> {
    let dir = std::env::temp_dir().join(format!("bgp4mesh-limits-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nmaster_key = \"{MASTER}\"\nstate_dir = \"{}\"\n\
             database = \"sqlite::memory:\"\n",
            dir.join("state").display()
        ),
    )?;
    let mut child = Command::new("prlimit")
        .arg("--nofile=1024:1024")
        .arg(env!("CARGO_BIN_EXE_bgp4mesh"))
        .args(["server", "-c"])
        .arg(&config)
        .args(["--log-level", "warn"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the controller under prlimit")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let server = Server { child, dir };
    loop {
        match lines.next() {
            Some(line) => {
                if line?.starts_with("listening on") {
                    break;
                }
            }
            None => bail!("the controller exited before listening"),
        }
    }
    // Keep reading its stdout so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    Ok(server)
}

fn open_files_limit(pid: u32) -> Result<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("Max open files")?;
    Ok(line.split_whitespace().nth(3).context("soft")?.parse()?)
}

/// A TLS connection from `source` that completed its handshake.
fn tls_connect(
    config: &Arc<rustls::ClientConfig>,
    source: [u8; 4],
    port: u16,
) -> Result<(rustls::ClientConnection, TcpStream)> {
    let socket = socket_from(source)?;
    let mut tcp = connect_from(socket, port)?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut tls =
        rustls::ClientConnection::new(Arc::clone(config), ServerName::try_from("localhost")?)?;
    while tls.is_handshaking() {
        tls.complete_io(&mut tcp)?;
    }
    Ok((tls, tcp))
}

fn socket_from(source: [u8; 4]) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket() has no preconditions; the descriptor is owned
    // from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just returned by socket() and is not owned elsewhere.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(source),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: bind gets a valid sockaddr_in and its size.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "bind {source:?}: {}",
        std::io::Error::last_os_error()
    );
    Ok(owned)
}

fn connect_from(socket: std::os::fd::OwnedFd, port: u16) -> Result<TcpStream> {
    use std::os::fd::AsRawFd;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: connect gets a valid sockaddr_in and its size on an open
    // socket.
    let rc = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    ensure!(rc == 0, "connect: {}", std::io::Error::last_os_error());
    Ok(TcpStream::from(socket))
}

/// An admin's request with curl from 127.0.0.1 on a new connection: the
/// time it took.
fn admin_request(port: u16, cacert: &Path) -> Result<Duration> {
    let started = Instant::now();
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--cacert")
        .arg(cacert)
        .args(["--interface", "127.0.0.1", "-H"])
        .arg(format!("Authorization: Bearer {MASTER}"))
        .arg(format!("https://localhost:{port}/api/networks"))
        .output()?;
    let took = started.elapsed();
    let code = String::from_utf8_lossy(&out.stdout);
    ensure!(
        code == "200",
        "curl /api/networks: {code} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(took)
}

/// Whether the server closed the connection (EOF, reset or a TLS alert)
/// rather than leaving it open until the read timeout.
fn closed_by_server(tls: &mut rustls::ClientConnection, tcp: &mut TcpStream) -> bool {
    tcp.set_read_timeout(Some(Duration::from_millis(200))).ok();
    let mut buf = [0u8; 64];
    loop {
        match tls.read_tls(tcp) {
            Ok(0) => return true,
            Ok(_) => {
                if tls.process_new_packets().is_err() {
                    return true;
                }
                match tls.reader().read(&mut buf) {
                    Ok(0) => return true,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => return true,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn idle_and_slowloris_clients_cannot_starve_the_admin() -> Result<()> {
    if !can_run!(&["curl", "prlimit"],) {
        return Ok(());
    }
    // This test's own clients need more than the controller's 1024.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit get a pointer to a local rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    ensure!(
        limit.rlim_max >= 4096,
        "the hard open-files limit is {}",
        limit.rlim_max
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()
        .map(|a: SocketAddr| a.port())?;
    let server = start_server(port)?;
    ensure!(
        open_files_limit(server.child.id())? == 1024,
        "prlimit did not apply"
    );
    let cacert = server.dir.join("state/controller.crt");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(&cacert)?)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    admin_request(port, &cacert)?;

    // The admin asks every 250 ms for as long as the attack lasts.
    let attacking = Arc::new(AtomicBool::new(true));
    let admin = {
        let attacking = Arc::clone(&attacking);
        let cacert = cacert.clone();
        std::thread::spawn(move || -> Result<Vec<Duration>> {
            let mut took = Vec::new();
            while attacking.load(Ordering::Relaxed) {
                took.push(admin_request(port, &cacert)?);
                std::thread::sleep(Duration::from_millis(250));
            }
            Ok(took)
        })
    };

    let started = Instant::now();
    let source = |i: usize| [127, 0, 0, 2 + (i % usize::from(SOURCES)) as u8];
    let mut idle = Vec::new();
    let mut refused = 0;
    for i in 0..IDLE {
        match tls_connect(&config, source(i), port) {
            Ok(c) => idle.push((Instant::now(), c)),
            Err(_) => refused += 1,
        }
    }
    let mut slow = Vec::new();
    for i in 0..SLOWLORIS {
        match tls_connect(&config, source(i), port) {
            Ok(c) => slow.push(c),
            Err(_) => refused += 1,
        }
    }
    let connected = started.elapsed();
    eprintln!(
        "{} idle and {} slowloris connections made in {connected:.1?} ({refused} refused or cut in the handshake)",
        idle.len(),
        slow.len()
    );
    // The slowloris clients send a request head one byte every 500 ms.
    let head = b"GET /api/networks HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer x\r\n";
    let mut sent = 0;
    let mut slow_open = slow.len();
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until && slow_open > 0 {
        slow_open = 0;
        for (tls, tcp) in &mut slow {
            let byte = &head[sent % head.len()..sent % head.len() + 1];
            let ok = tls.writer().write_all(byte).is_ok() && tls.write_tls(tcp).is_ok();
            slow_open += usize::from(ok);
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("slowloris: {slow_open} still writable after {sent} bytes each");
    // Everything the attackers opened is closed within the header timeout
    // (10 s) of its accept, plus slack for a loaded machine.
    let deadline = started + connected + Duration::from_secs(14);
    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
    let idle_open = idle
        .iter_mut()
        .map(|(_, (tls, tcp))| !closed_by_server(tls, tcp))
        .filter(|open| *open)
        .count();
    let slow_open = slow
        .iter_mut()
        .map(|(tls, tcp)| !closed_by_server(tls, tcp))
        .filter(|open| *open)
        .count();
    attacking.store(false, Ordering::Relaxed);
    let took = admin
        .join()
        .map_err(|_| anyhow::anyhow!("admin thread"))??;
    let worst = took.iter().max().copied().unwrap_or_default();
    eprintln!(
        "admin: {} requests during the attack, slowest {worst:.0?}; attackers left open: {idle_open} idle, {slow_open} slowloris",
        took.len()
    );
    ensure!(took.len() >= 20, "only {} admin requests", took.len());
    ensure!(
        worst < Duration::from_secs(1),
        "an admin request took {worst:?}"
    );
    ensure!(idle_open == 0, "{idle_open} idle connections still open");
    ensure!(
        slow_open == 0,
        "{slow_open} slowloris connections still open"
    );
    // The controller counts what it did.
    let metrics = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&cacert)
        .arg("-H")
        .arg(format!("Authorization: Bearer {MASTER}"))
        .arg(format!("https://localhost:{port}/metrics"))
        .output()?;
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let (evicted, timed_out) = (
        value("bgp4mesh_connections_evicted_total"),
        value("bgp4mesh_connections_timed_out_total"),
    );
    eprintln!("controller: {evicted} evicted, {timed_out} timed out");
    ensure!(
        evicted + timed_out >= (IDLE + SLOWLORIS - refused) as u64,
        "{evicted} evicted + {timed_out} timed out < {} attackers",
        IDLE + SLOWLORIS
    );
    ensure!(value("bgp4mesh_connections_open") <= 2, "{metrics}");
    drop(server);
    Ok(())
}
