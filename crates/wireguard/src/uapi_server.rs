//! Serves the UAPI of a [`Device`] on `/var/run/wireguard/<iface>.sock`,
//! where `wg` looks for userspace devices. One thread accepts; each
//! connection gets its own thread and may carry several requests.
//!
//! A connection is bounded (`Limits`): a line, a request's size and the
//! time it takes to arrive, and silence between requests. Past a bound the
//! client gets an errno reply (`-EINVAL` for size, `-ETIMEDOUT` for time)
//! and the connection is closed. A `set=1` is parsed as it arrives and
//! applied once whole, so the device is locked only while applying, and a
//! slow client holds nothing but its own thread.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::config::{DeviceStatus, SetRequest};
use crate::device::Device;
use crate::uapi::{SetParser, UapiError, format_errno, format_get};

/// Where `wg` and wg-quick look for userspace devices.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// Bounds on one connection.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Bytes in a line, without its newline (the longest real one is an
    /// endpoint with a scope, under 100).
    max_line: usize,
    /// Bytes in a request, from its first line to its empty line: room for
    /// two million `allowed_ip=` lines.
    max_request: usize,
    /// Silence that closes the connection, between or within requests
    /// (and the longest a write of a reply may block).
    idle: Duration,
    /// A request must arrive whole within this from its first line.
    request_time: Duration,
}

const LIMITS: Limits = Limits {
    max_line: 4096,
    max_request: 64 << 20,
    idle: Duration::from_secs(30),
    request_time: Duration::from_secs(120),
};

pub struct UapiServer {
    path: PathBuf,
    file: SocketFile,
    thread: Option<JoinHandle<()>>,
}

impl UapiServer {
    /// Binds `/var/run/wireguard/<name>.sock` and serves it until the device
    /// stops. A socket file left by a dead process is replaced; one that
    /// still answers is an error (another daemon has the name).
    pub fn start(device: Arc<Device>) -> io::Result<UapiServer> {
        Self::start_at(Path::new(SOCKET_DIR), device)
    }

    pub fn start_at(dir: &Path, device: Arc<Device>) -> io::Result<UapiServer> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        let path = dir.join(format!("{}.sock", device.name()));
        if path.exists() {
            if UnixStream::connect(&path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is served by another process", path.display()),
                ));
            }
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let file = SocketFile::of(&path)?;
        let ours = file.clone();
        let thread = std::thread::Builder::new()
            .name(format!("wg-uapi-{}", device.name()))
            .spawn(move || {
                accept_loop(listener, &device);
                // The device stopped (its interface deleted, say): `wg`
                // must not find a socket that answers nothing.
                ours.remove();
            })?;
        info!(socket = %path.display(), "UAPI listening");
        Ok(UapiServer {
            path,
            file,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The socket file this server bound, known by inode, so that removing it
/// never removes another daemon's socket of the same name bound since.
#[derive(Clone)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn of(path: &Path) -> io::Result<SocketFile> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(path)?;
        Ok(SocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
        {
            let _ = std::fs::remove_file(&self.path);
            info!(socket = %self.path.display(), "UAPI socket removed");
        }
    }
}

impl Drop for UapiServer {
    fn drop(&mut self) {
        self.file.remove();
        if let Some(thread) = self.thread.take()
            && thread.is_finished()
        {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: UnixListener, device: &Arc<Device>) {
    while device.is_running() {
        match listener.accept() {
            Ok((stream, _)) => {
                let device = Arc::clone(device);
                let spawned = std::thread::Builder::new()
                    .name("wg-uapi-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve(stream, &*device, &LIMITS) {
                            debug!("UAPI connection: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    warn!("UAPI: cannot start a connection thread: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Wakes at once when the device stops.
                device.wait_readable(listener.as_raw_fd(), Duration::from_secs(1));
            }
            Err(e) => {
                warn!("UAPI accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// What the server serves: a [`Device`], or a stand-in in tests.
trait Served {
    fn name(&self) -> &str;
    fn status(&self) -> DeviceStatus;
    fn apply(&self, request: &SetRequest) -> Result<(), UapiError>;
}

impl Served for Device {
    fn name(&self) -> &str {
        Device::name(self)
    }
    fn status(&self) -> DeviceStatus {
        Device::status(self)
    }
    fn apply(&self, request: &SetRequest) -> Result<(), UapiError> {
        Device::apply(self, request)
    }
}

/// Why a connection stops being read.
enum Stop {
    /// The client went away or the socket failed: close without a word.
    Gone(io::Error),
    /// Past a bound: reply with this errno, then close.
    Refused(UapiError),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Stop {
        Stop::Gone(e)
    }
}

/// Serves requests on one connection until the client closes it, sends
/// something that is not a request, or passes a bound.
fn serve(stream: UnixStream, device: &impl Served, limits: &Limits) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(limits.idle))?;
    let mut writer = stream.try_clone()?;
    let mut conn = Conn {
        reader: BufReader::with_capacity(64 << 10, stream),
        limits: *limits,
        line: Vec::new(),
        deadline: None,
        request_bytes: 0,
    };
    match serve_requests(&mut conn, &mut writer, device) {
        Ok(()) => Ok(()),
        Err(Stop::Gone(e)) => Err(e),
        Err(Stop::Refused(e)) => {
            warn!(
                interface = device.name(),
                "UAPI request refused, closing: {e}"
            );
            writer.write_all(format_errno(&Err(e)).as_bytes())
        }
    }
}

fn serve_requests(
    conn: &mut Conn,
    writer: &mut UnixStream,
    device: &impl Served,
) -> Result<(), Stop> {
    loop {
        conn.deadline = None;
        conn.request_bytes = 0;
        let op = match conn.read_line() {
            Ok(Some(op)) => op,
            Ok(None) => return Ok(()),
            // Silence between requests: nobody is waiting for a reply.
            Err(Stop::Refused(e)) if e.errno == libc::ETIMEDOUT => return Ok(()),
            Err(e) => return Err(e),
        };
        let is_get = match op {
            b"get=1" => true,
            b"set=1" => false,
            other => {
                let e = UapiError::invalid(format!(
                    "unknown operation {:?}",
                    String::from_utf8_lossy(other)
                ));
                debug!("UAPI: {e}");
                return Ok(());
            }
        };
        conn.deadline = Some(Instant::now() + conn.limits.request_time);
        if is_get {
            // The request ends with an empty line.
            if conn.read_line()? != Some(&b""[..]) {
                return Ok(());
            }
            writer.write_all(format_get(&device.status()).as_bytes())?;
            continue;
        }
        let mut parser = SetParser::default();
        let mut refused = None;
        loop {
            let line = match conn.read_line()? {
                Some([]) => break,
                Some(line) => line,
                None => return Ok(()),
            };
            if refused.is_some() {
                // Read to the end of the request, keeping the first error.
                continue;
            }
            let parsed = std::str::from_utf8(line)
                .map_err(|_| UapiError::invalid("a line is not UTF-8"))
                .and_then(|line| parser.line(line));
            if let Err(e) = parsed {
                refused = Some(e);
                parser = SetParser::default();
            }
        }
        let result = match refused {
            Some(e) => Err(e),
            None => device.apply(&parser.finish()),
        };
        if let Err(e) = &result {
            warn!(interface = device.name(), "UAPI set refused: {e}");
        }
        writer.write_all(format_errno(&result).as_bytes())?;
    }
}

/// The reading side of a connection, with its bounds.
struct Conn {
    reader: BufReader<UnixStream>,
    limits: Limits,
    line: Vec<u8>,
    /// When the request being read must be complete.
    deadline: Option<Instant>,
    request_bytes: usize,
}

impl Conn {
    /// The next line without its newline; `None` at the end of the stream
    /// between lines.
    fn read_line(&mut self) -> Result<Option<&[u8]>, Stop> {
        self.line.clear();
        loop {
            if self.reader.buffer().is_empty() {
                // About to wait for the client: no longer than the bounds.
                let mut wait = self.limits.idle;
                if let Some(deadline) = self.deadline {
                    wait = wait.min(deadline.saturating_duration_since(Instant::now()));
                }
                if wait.is_zero() {
                    return Err(timed_out());
                }
                self.reader.get_ref().set_read_timeout(Some(wait))?;
            }
            let available = match self.reader.fill_buf() {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(timed_out());
                }
                Err(e) => return Err(Stop::Gone(e)),
            };
            if available.is_empty() {
                if self.line.is_empty() {
                    return Ok(None);
                }
                return Err(Stop::Gone(io::ErrorKind::UnexpectedEof.into()));
            }
            let newline = available.iter().position(|b| *b == b'\n');
            let (take, used) = match newline {
                Some(at) => (at, at + 1),
                None => (available.len(), available.len()),
            };
            if self.line.len() + take > self.limits.max_line {
                return Err(Stop::Refused(UapiError::invalid(format!(
                    "a line is longer than {} bytes",
                    self.limits.max_line
                ))));
            }
            self.request_bytes += used;
            if self.request_bytes > self.limits.max_request {
                return Err(Stop::Refused(UapiError::invalid(format!(
                    "the request is larger than {} bytes",
                    self.limits.max_request
                ))));
            }
            self.line.extend_from_slice(&available[..take]);
            self.reader.consume(used);
            if newline.is_some() {
                return Ok(Some(&self.line));
            }
        }
    }
}

fn timed_out() -> Stop {
    Stop::Refused(UapiError {
        errno: libc::ETIMEDOUT,
        message: "the client was silent for too long or sent too slowly".into(),
    })
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::sync::Mutex;

    use super::*;
    use crate::key::Key;

    /// Records what it is asked to apply.
    #[derive(Default)]
    struct Fake {
        applied: Mutex<Vec<SetRequest>>,
    }

    impl Served for Fake {
        fn name(&self) -> &str {
            "fake0"
        }
        fn status(&self) -> DeviceStatus {
            DeviceStatus {
                name: "fake0".into(),
                private_key: None,
                public_key: None,
                listen_port: 51820,
                fwmark: 0,
                fragmented_datagrams: 0,
                peers: Vec::new(),
            }
        }
        fn apply(&self, request: &SetRequest) -> Result<(), UapiError> {
            self.applied
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(request.clone());
            Ok(())
        }
    }

    const SMALL: Limits = Limits {
        max_line: 100,
        max_request: 1000,
        idle: Duration::from_millis(300),
        request_time: Duration::from_millis(800),
    };

    /// Serves one end of a socket pair on a thread; returns the client's
    /// end and the thread, which ends with the connection.
    fn start(fake: &Arc<Fake>, limits: Limits) -> (UnixStream, JoinHandle<io::Result<()>>) {
        let (client, server) = UnixStream::pair().expect("socket pair");
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let fake = Arc::clone(fake);
        let thread = std::thread::spawn(move || serve(server, &*fake, &limits));
        (client, thread)
    }

    /// Everything the server writes until it closes the connection.
    fn read_to_close(client: &mut UnixStream) -> String {
        let mut out = Vec::new();
        let _ = client.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Reads one reply (up to its empty line).
    fn read_reply(client: &mut UnixStream) -> String {
        let mut out = Vec::new();
        let mut byte = [0u8; 1];
        while !out.ends_with(b"\n\n") {
            match client.read(&mut byte) {
                Ok(1) => out.push(byte[0]),
                _ => break,
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    fn peer_line() -> String {
        format!("public_key={}\n", Key([1; 32]).to_hex())
    }

    #[test]
    fn requests_follow_each_other_and_a_bad_line_refuses_only_its_request() {
        let fake = Arc::new(Fake::default());
        let (mut client, thread) = start(&fake, SMALL);
        let good = format!("set=1\n{}allowed_ip=10.0.0.1/32\n\n", peer_line());
        client.write_all(good.as_bytes()).expect("write");
        assert_eq!(read_reply(&mut client), "errno=0\n\n");
        let bad = format!("set=1\n{}allowed_ip=10.0.0.1/33\nfoo=\n\n", peer_line());
        client.write_all(bad.as_bytes()).expect("write");
        assert_eq!(read_reply(&mut client), "errno=-22\n\n");
        client
            .write_all(b"set=1\nlisten_port=\xff\n\n")
            .expect("write");
        assert_eq!(read_reply(&mut client), "errno=-22\n\n", "not UTF-8");
        client.write_all(b"get=1\n\n").expect("write");
        assert!(read_reply(&mut client).ends_with("listen_port=51820\nerrno=0\n\n"));
        drop(client);
        assert!(thread.join().expect("thread").is_ok());
        let applied = fake.applied.lock().expect("lock");
        assert_eq!(applied.len(), 1, "only the good request is applied");
        assert_eq!(applied[0].peers[0].allowed_ips.len(), 1);
    }

    #[test]
    fn a_line_or_a_request_past_its_bound_is_refused_and_closes() {
        let fake = Arc::new(Fake::default());
        // A line longer than 100 bytes.
        let (mut client, thread) = start(&fake, SMALL);
        let long = format!("set=1\nfwmark={}\n\n", "1".repeat(200));
        client.write_all(long.as_bytes()).expect("write");
        assert_eq!(read_to_close(&mut client), "errno=-22\n\n");
        assert!(thread.join().expect("thread").is_ok());
        // Short lines, but more than 1000 bytes of them; the client keeps
        // writing (and gets EPIPE) while the server refuses.
        let (mut client, thread) = start(&fake, SMALL);
        let mut writer = client.try_clone().expect("clone");
        let big =
            format!("set=1\n{}", peer_line()) + &"allowed_ip=10.0.0.1/32\n".repeat(100) + "\n";
        let sender = std::thread::spawn(move || {
            let _ = writer.write_all(big.as_bytes());
        });
        assert_eq!(read_to_close(&mut client), "errno=-22\n\n");
        assert!(thread.join().expect("thread").is_ok());
        let _ = sender.join();
        assert!(fake.applied.lock().expect("lock").is_empty());
    }

    #[test]
    fn slow_or_silent_clients_are_timed_out() {
        let fake = Arc::new(Fake::default());
        // Silent before any request: closed without a reply.
        let (mut client, thread) = start(&fake, SMALL);
        let start_at = Instant::now();
        assert_eq!(read_to_close(&mut client), "");
        assert!(start_at.elapsed() < Duration::from_secs(5));
        assert!(thread.join().expect("thread").is_ok());

        // Silent in the middle of a request: -ETIMEDOUT after `idle`.
        let (mut client, thread) = start(&fake, SMALL);
        client.write_all(b"set=1\nlisten_port=1").expect("write");
        assert_eq!(read_to_close(&mut client), "errno=-110\n\n");
        assert!(thread.join().expect("thread").is_ok());

        // A byte every 100 ms is never silent for `idle` (300 ms), but the
        // request is cut off at `request_time` (800 ms).
        let (mut client, thread) = start(&fake, SMALL);
        let mut writer = client.try_clone().expect("clone");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_dribbling = Arc::clone(&stop);
        let dribbler = std::thread::spawn(move || {
            let _ = writer.write_all(b"set=1\n");
            while !stop_dribbling.load(std::sync::atomic::Ordering::Relaxed) {
                if writer.write_all(b"fwmark=1\n").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let start_at = Instant::now();
        assert_eq!(read_to_close(&mut client), "errno=-110\n\n");
        let took = start_at.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = dribbler.join();
        assert!(
            took >= Duration::from_millis(700) && took < Duration::from_secs(5),
            "cut off after {took:?}"
        );
        assert!(thread.join().expect("thread").is_ok());
        assert!(fake.applied.lock().expect("lock").is_empty());
    }
}
