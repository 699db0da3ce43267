//! The control socket: one JSON request per line, one JSON response per
//! line, on a unix socket (`[control] socket`). `bgp4mesh show …` and
//! `bgp4mesh bgp …` are its clients; docs/cli.md documents the JSON.
//!
//! Every line gets an answer: one that is not UTF-8 or not a request gets
//! an error answer and the connection goes on. What a client can hold is
//! bounded: a line of at most [`Limits::max_line`] bytes (a longer one is
//! answered with an error and the connection closed), [`Limits::idle`] to
//! send a whole line and for each part of an answer to be taken, and at
//! most [`Limits::max_clients`] connections at once. Each connection is
//! its own task, so a slow client holds up nobody else.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// A control request with the channel for its answer: what the socket
/// hands the daemon.
pub struct ControlCall {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    ShowProtocols {
        #[serde(default)]
        name: Option<String>,
    },
    ShowRoute {
        #[serde(default)]
        prefix: Option<IpNet>,
        /// Show what is announced to this neighbour instead.
        #[serde(default)]
        export: Option<String>,
    },
    Enable {
        name: String,
    },
    Disable {
        name: String,
        #[serde(default)]
        message: Option<String>,
    },
    Restart {
        name: String,
    },
    Refresh {
        name: String,
    },
    /// Re-read the config file and apply what changed.
    Reload,
    ShowBfd,
    /// The `[[peering]]` tunnels and their sessions.
    ShowPeerings,
    /// The `[[wireguard]]` interfaces and their peers.
    ShowWireguard,
    /// The mesh's peers: path, endpoint, handshake, round trip.
    ShowMesh,
    /// The layer-2 overlay: its bridge and wires.
    ShowOverlay,
    Shutdown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(data: Value) -> Self {
        Response {
            ok: true,
            data,
            error: None,
        }
    }
    pub fn ok_empty() -> Self {
        Response::ok(Value::Null)
    }
    pub fn error(message: impl Into<String>) -> Self {
        Response {
            ok: false,
            data: Value::Null,
            error: Some(message.into()),
        }
    }
}

/// The longest request line taken, without its newline.
pub const MAX_LINE: usize = 64 * 1024;

/// What one client may hold of the daemon.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The longest request line, without its newline: a longer one is
    /// answered with an error and the connection closed.
    pub max_line: usize,
    /// How long a client has to send a whole request line once the previous
    /// answer is out (an idle or a slow client is answered with an error
    /// and closed), and to take each 64 KiB of an answer.
    pub idle: Duration,
    /// Connections served at once; more are answered with an error and
    /// closed.
    pub max_clients: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line: MAX_LINE,
            idle: Duration::from_secs(30),
            max_clients: 32,
        }
    }
}

/// One request line (without its newline; a trailing `\r` is ignored):
/// the request, or the error answer it gets. Pure, so that it can be fuzzed
/// (fuzz target `control`).
pub fn parse_line(line: &[u8]) -> Result<Request, Response> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = std::str::from_utf8(line).map_err(|e| {
        Response::error(format!(
            "bad request: not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    serde_json::from_str(text).map_err(|e| Response::error(format!("bad request: {e}")))
}

/// An answer as it goes on the socket: one line of JSON.
pub fn encode(response: &Response) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(response)
        .unwrap_or_else(|_| br#"{"ok":false,"error":"the answer could not be encoded"}"#.to_vec());
    bytes.push(b'\n');
    bytes
}

/// The running control socket. Dropping it stops serving and removes the
/// socket file (if it is still the one we made), whichever way the daemon
/// stops.
pub struct ControlServer {
    task: tokio::task::JoinHandle<()>,
    _file: SocketFile,
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The socket file we bound, removed on drop unless something else has
/// taken its place since.
struct SocketFile {
    path: PathBuf,
    identity: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.identity
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Makes room for the socket at `path`: a socket nobody answers on was left
/// by a run that was killed and is removed; a live one, or a file that is
/// not a socket, is refused (and left alone).
fn clear_stale(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(e).with_context(|| format!("control socket {}", path.display()));
        }
    };
    if !meta.file_type().is_socket() {
        anyhow::bail!(
            "control socket {}: something that is not a socket is in the way (remove it, or set [control] socket)",
            path.display()
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => anyhow::bail!(
            "control socket {}: another bgp4mesh is running and answers there",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).with_context(|| {
                format!(
                    "control socket {}: cannot remove the one a previous run left",
                    path.display()
                )
            })?;
            tracing::info!(
                "control socket {}: removed the one a previous run left",
                path.display()
            );
            Ok(())
        }
        // Let bind say what is wrong.
        Err(_) => Ok(()),
    }
}

/// Serves the control socket at `path`, passing requests to `calls`.
pub fn serve(path: &Path, calls: mpsc::Sender<ControlCall>) -> Result<ControlServer> {
    serve_with(path, calls, Limits::default())
}

/// [`serve`] with other limits (tests).
pub fn serve_with(
    path: &Path,
    calls: mpsc::Sender<ControlCall>,
    limits: Limits,
) -> Result<ControlServer> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    clear_stale(path)?;
    let listener = UnixListener::bind(path).with_context(|| {
        format!(
            "control socket {}: cannot bind (another bgp4mesh running?)",
            path.display()
        )
    })?;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) => {
            let _ = std::fs::remove_file(path);
            return Err(e).with_context(|| format!("control socket {}", path.display()));
        }
    };
    let file = SocketFile {
        path: path.to_path_buf(),
        identity: (meta.dev(), meta.ino()),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("control socket {}: cannot set its mode", path.display()))?;
    let slots = Arc::new(Semaphore::new(limits.max_clients));
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: try again without spinning.
                    tracing::warn!("control socket: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    let calls = calls.clone();
                    tokio::spawn(async move {
                        serve_connection(stream, &calls, limits).await;
                        drop(slot);
                    });
                }
                Err(_) => {
                    // A fresh socket's buffer takes one short line without
                    // waiting; then it closes.
                    let busy = Response::error(format!(
                        "too many control connections (at most {}); try again",
                        limits.max_clients
                    ));
                    let _ = stream.try_write(&encode(&busy));
                }
            }
        }
    });
    Ok(ControlServer { task, _file: file })
}

/// How reading one request line ended.
enum LineRead {
    /// A line is in the buffer (the last one may lack its newline).
    Line,
    /// The client closed with nothing more.
    End,
    /// The line is longer than the limit.
    TooLong,
}

/// Reads one line (without its newline) into `line`, at most `max` bytes.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<LineRead> {
    line.clear();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(if line.is_empty() {
                LineRead::End
            } else {
                LineRead::Line
            });
        }
        let newline = available.iter().position(|&b| b == b'\n');
        let take = newline.unwrap_or(available.len());
        if line.len() + take > max {
            return Ok(LineRead::TooLong);
        }
        line.extend_from_slice(&available[..take]);
        reader.consume(take + usize::from(newline.is_some()));
        if newline.is_some() {
            return Ok(LineRead::Line);
        }
    }
}

/// Writes `bytes`, giving up when 64 KiB of them wait longer than `stall`.
async fn send<W: AsyncWrite + Unpin>(
    write: &mut W,
    bytes: &[u8],
    stall: Duration,
) -> std::io::Result<()> {
    for chunk in bytes.chunks(64 * 1024) {
        tokio::time::timeout(stall, write.write_all(chunk))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    }
    write.flush().await
}

/// Passes a request to the daemon and waits for its answer.
async fn ask(calls: &mpsc::Sender<ControlCall>, request: Request) -> Response {
    let (reply, answer) = oneshot::channel();
    if calls.send(ControlCall { request, reply }).await.is_err() {
        return Response::error("the daemon is shutting down");
    }
    answer
        .await
        .unwrap_or_else(|_| Response::error("no answer"))
}

/// Serves one client: a line in, an answer out, until it closes or
/// oversteps a limit.
async fn serve_connection<S>(stream: S, calls: &mpsc::Sender<ControlCall>, limits: Limits)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (read, mut write) = tokio::io::split(stream);
    let mut reader = tokio::io::BufReader::new(read);
    let mut line = Vec::new();
    loop {
        let read = tokio::time::timeout(
            limits.idle,
            read_line(&mut reader, &mut line, limits.max_line),
        )
        .await;
        let (response, last) = match read {
            Ok(Ok(LineRead::Line)) => match parse_line(&line) {
                Ok(request) => (ask(calls, request).await, false),
                Err(refused) => (refused, false),
            },
            Ok(Ok(LineRead::End)) | Ok(Err(_)) => return,
            Ok(Ok(LineRead::TooLong)) => (
                Response::error(format!(
                    "request longer than {} bytes; closing the connection",
                    limits.max_line
                )),
                true,
            ),
            Err(_) => (
                Response::error(format!(
                    "no complete request in {:?}; closing the connection",
                    limits.idle
                )),
                true,
            ),
        };
        if send(&mut write, &encode(&response), limits.idle)
            .await
            .is_err()
            || last
        {
            return;
        }
    }
}

/// Sends one request to the daemon at `path` and waits for the answer.
pub fn call(path: &Path, request: &Request) -> Result<Response> {
    let mut stream = std::os::unix::net::UnixStream::connect(path).with_context(|| {
        format!(
            "cannot reach the daemon at {} (is `bgp4mesh run` running? see [control] socket)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(&request_line(request)?)?;
    let mut answer = Vec::new();
    BufReader::new(&stream).read_until(b'\n', &mut answer)?;
    parse_answer(&answer)
}

/// A request as a client sends it: one line of JSON.
pub fn request_line(request: &Request) -> serde_json::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    Ok(line)
}

/// An answer line as the daemon sends it.
pub fn parse_answer(line: &[u8]) -> Result<Response> {
    serde_json::from_slice(line).with_context(|| {
        format!(
            "bad answer from the daemon: {:?}",
            String::from_utf8_lossy(line)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_json_form() {
        let r = Request::ShowRoute {
            prefix: Some("192.0.2.0/24".parse().expect("net")),
            export: None,
        };
        assert_eq!(
            serde_json::to_string(&r).expect("json"),
            r#"{"command":"show_route","prefix":"192.0.2.0/24","export":null}"#
        );
        let back: Request =
            serde_json::from_str(r#"{"command":"disable","name":"isp"}"#).expect("parses");
        assert_eq!(
            back,
            Request::Disable {
                name: "isp".into(),
                message: None
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"command":"explode"}"#).is_err());
    }
    #[test]
    fn a_line_parses_or_gets_an_error_answer() {
        assert_eq!(
            parse_line(b"{\"command\":\"reload\"}\r"),
            Ok(Request::Reload),
            "a trailing CR is ignored"
        );
        let refused = parse_line(b"{\"command\":\"show_protocols\",\"name\":\"\xff\"}")
            .expect_err("not UTF-8");
        assert!(!refused.ok);
        assert_eq!(
            refused.error.as_deref(),
            Some("bad request: not UTF-8 (invalid byte at offset 36)")
        );
        let refused = parse_line(b"{\"command\":\"explode\"}").expect_err("no such command");
        assert!(
            refused
                .error
                .as_deref()
                .is_some_and(|e| e.starts_with("bad request: unknown variant `explode`")),
            "{refused:?}"
        );
        assert_eq!(
            encode(&Response::error("x")),
            b"{\"ok\":false,\"error\":\"x\"}\n".to_vec()
        );
    }

    /// A daemon that answers every request with its command's name.
    fn echo_daemon() -> mpsc::Sender<ControlCall> {
        let (tx, mut rx) = mpsc::channel::<ControlCall>(8);
        tokio::spawn(async move {
            while let Some(call) = rx.recv().await {
                let name = serde_json::to_value(&call.request)
                    .ok()
                    .and_then(|v| v.get("command").cloned())
                    .unwrap_or_default();
                let _ = call.reply.send(Response::ok(name));
            }
        });
        tx
    }

    async fn answer<R: AsyncBufRead + Unpin>(reader: &mut R) -> Option<Response> {
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
            .await
            .expect("an answer within 5 s")
            .expect("reads");
        (read > 0).then(|| serde_json::from_str(&line).expect("an answer is JSON"))
    }

    fn connection(limits: Limits) -> tokio::io::BufReader<tokio::net::UnixStream> {
        let (ours, theirs) = tokio::net::UnixStream::pair().expect("socket pair");
        let calls = echo_daemon();
        tokio::spawn(async move { serve_connection(theirs, &calls, limits).await });
        tokio::io::BufReader::new(ours)
    }

    #[tokio::test]
    async fn invalid_utf8_is_answered_and_the_connection_goes_on() {
        let mut client = connection(Limits::default());
        client
            .get_mut()
            .write_all(b"{\"command\":\"reload\"\xc3\x28}\n{\"command\":\"show_bfd\"}\n")
            .await
            .expect("writes");
        let refused = answer(&mut client).await.expect("an answer");
        assert!(!refused.ok);
        assert!(
            refused
                .error
                .as_deref()
                .is_some_and(|e| e.contains("not UTF-8")),
            "{refused:?}"
        );
        let next = answer(&mut client).await.expect("the next line is served");
        assert_eq!(next, Response::ok(Value::from("show_bfd")));
    }

    #[tokio::test]
    async fn an_over_long_line_is_refused_and_closed() {
        let mut client = connection(Limits::default());
        // No newline: the daemon must not wait for one.
        let long = vec![b' '; MAX_LINE + 1];
        client.get_mut().write_all(&long).await.expect("writes");
        let refused = answer(&mut client).await.expect("an answer");
        assert_eq!(
            refused.error.as_deref(),
            Some("request longer than 65536 bytes; closing the connection")
        );
        assert_eq!(answer(&mut client).await, None, "then closed");
        // A line of exactly the limit is still read (and parsed).
        let mut client = connection(Limits::default());
        let request = b"{\"command\":\"reload\"}\n";
        let mut line = vec![b' '; MAX_LINE + 1 - request.len()];
        line.extend_from_slice(request);
        assert_eq!(line.len(), MAX_LINE + 1, "the limit and a newline");
        client.get_mut().write_all(&line).await.expect("writes");
        assert_eq!(
            answer(&mut client).await,
            Some(Response::ok(Value::from("reload")))
        );
    }

    fn socket_path(test: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("b4m-control-{}-{test}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    async fn connect(path: &Path) -> tokio::io::BufReader<tokio::net::UnixStream> {
        tokio::io::BufReader::new(
            tokio::net::UnixStream::connect(path)
                .await
                .expect("connects"),
        )
    }

    #[tokio::test]
    async fn an_idle_client_is_closed_and_blocks_nobody() {
        let path = socket_path("idle");
        let limits = Limits {
            idle: Duration::from_millis(300),
            ..Limits::default()
        };
        let server = serve_with(&path, echo_daemon(), limits).expect("serves");
        let mut idle = connect(&path).await;
        idle.get_mut()
            .write_all(b"{\"command\":")
            .await
            .expect("writes");
        // Meanwhile another client is served at once.
        let mut other = connect(&path).await;
        other
            .get_mut()
            .write_all(b"{\"command\":\"reload\"}\n")
            .await
            .expect("writes");
        let started = std::time::Instant::now();
        assert_eq!(
            answer(&mut other).await,
            Some(Response::ok(Value::from("reload")))
        );
        assert!(started.elapsed() < Duration::from_millis(300));
        let refused = answer(&mut idle).await.expect("an answer");
        assert_eq!(
            refused.error.as_deref(),
            Some("no complete request in 300ms; closing the connection")
        );
        assert_eq!(answer(&mut idle).await, None, "then closed");
        drop(server);
        assert!(!path.exists(), "the socket file goes with the server");
    }

    #[tokio::test]
    async fn clients_beyond_the_limit_are_refused() {
        let path = socket_path("limit");
        let limits = Limits {
            max_clients: 1,
            ..Limits::default()
        };
        let _server = serve_with(&path, echo_daemon(), limits).expect("serves");
        let mut first = connect(&path).await;
        first
            .get_mut()
            .write_all(b"{\"command\":\"reload\"}\n")
            .await
            .expect("writes");
        assert!(answer(&mut first).await.is_some_and(|r| r.ok));
        let mut second = connect(&path).await;
        let refused = answer(&mut second).await.expect("an answer");
        assert_eq!(
            refused.error.as_deref(),
            Some("too many control connections (at most 1); try again")
        );
        drop(first);
        // Its slot is free again once the first client has gone.
        let mut served = None;
        for _ in 0..100 {
            let mut again = connect(&path).await;
            again
                .get_mut()
                .write_all(b"{\"command\":\"reload\"}\n")
                .await
                .expect("writes");
            served = answer(&mut again).await;
            if served.as_ref().is_some_and(|r| r.ok) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(served, Some(Response::ok(Value::from("reload"))));
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_but_nothing_else_is() {
        let path = socket_path("stale");
        // What a killed run leaves: a socket file nobody listens on.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("binds"));
        assert!(path.exists());
        let server = serve_with(&path, echo_daemon(), Limits::default()).expect("replaces it");
        let mut client = connect(&path).await;
        client
            .get_mut()
            .write_all(b"{\"command\":\"reload\"}\n")
            .await
            .expect("writes");
        assert!(answer(&mut client).await.is_some_and(|r| r.ok));
        // A second daemon on a live socket is refused and removes nothing.
        let error = serve_with(&path, echo_daemon(), Limits::default())
            .err()
            .map(|e| format!("{e:#}"));
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("another bgp4mesh is running")),
            "{error:?}"
        );
        assert!(path.exists());
        drop(server);
        assert!(!path.exists());
        // A file that is no socket is left alone.
        std::fs::write(&path, b"precious").expect("writes");
        let error = serve_with(&path, echo_daemon(), Limits::default())
            .err()
            .map(|e| format!("{e:#}"));
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("not a socket is in the way")),
            "{error:?}"
        );
        assert_eq!(std::fs::read(&path).ok().as_deref(), Some(&b"precious"[..]));
        let _ = std::fs::remove_file(&path);
    }
}
