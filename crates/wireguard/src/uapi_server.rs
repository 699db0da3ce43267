//! Serves the UAPI of a [`Device`] on `/var/run/wireguard/<iface>.sock`,
//! where `wg` looks for userspace devices. One thread accepts; each
//! connection gets its own thread and may carry several requests.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::device::Device;
use crate::uapi::{UapiError, format_errno, format_get, parse_set};

/// Where `wg` and wg-quick look for userspace devices.
pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// A request line longer than this closes the connection.
const MAX_LINE: u64 = 4096;

pub struct UapiServer {
    path: PathBuf,
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
        let thread = std::thread::Builder::new()
            .name(format!("wg-uapi-{}", device.name()))
            .spawn(move || accept_loop(listener, device))?;
        info!(socket = %path.display(), "UAPI listening");
        Ok(UapiServer {
            path,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UapiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(thread) = self.thread.take()
            && thread.is_finished()
        {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: UnixListener, device: Arc<Device>) {
    while device.is_running() {
        match listener.accept() {
            Ok((stream, _)) => {
                let device = Arc::clone(&device);
                let spawned = std::thread::Builder::new()
                    .name("wg-uapi-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve(stream, &device) {
                            debug!("UAPI connection: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    warn!("UAPI: cannot start a connection thread: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fd = libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd on the stack for the call.
                unsafe { libc::poll(&mut fd, 1, 500) };
            }
            Err(e) => {
                warn!("UAPI accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Serves requests on one connection until the client closes it or sends
/// something that is not a request.
fn serve(stream: UnixStream, device: &Device) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let Some(op) = read_line(&mut reader)? else {
            return Ok(());
        };
        match op.as_str() {
            "get=1" => {
                // The request ends with an empty line.
                if read_line(&mut reader)?.as_deref() != Some("") {
                    return Ok(());
                }
                writer.write_all(format_get(&device.status()).as_bytes())?;
            }
            "set=1" => {
                let mut lines = Vec::new();
                loop {
                    match read_line(&mut reader)? {
                        Some(line) if line.is_empty() => break,
                        Some(line) => lines.push(line),
                        None => return Ok(()),
                    }
                }
                let result = parse_set(lines.iter().map(String::as_str))
                    .and_then(|request| device.apply(&request));
                if let Err(e) = &result {
                    warn!(interface = device.name(), "UAPI set refused: {e}");
                }
                writer.write_all(format_errno(&result).as_bytes())?;
            }
            other => {
                let e = UapiError::invalid(format!("unknown operation {other:?}"));
                debug!("UAPI: {e}");
                return Ok(());
            }
        }
    }
}

fn read_line(reader: &mut BufReader<UnixStream>) -> io::Result<Option<String>> {
    let mut line = String::new();
    let n = reader.by_ref().take(MAX_LINE).read_line(&mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with('\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "request line too long or cut short",
        ));
    }
    line.pop();
    Ok(Some(line))
}
