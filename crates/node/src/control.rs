//! The control socket: one JSON request per line, one JSON response per
//! line, on a unix socket (`[control] socket`). `bgp4mesh show …` and
//! `bgp4mesh bgp …` are its clients; docs/cli.md documents the JSON.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use crate::bgp_driver::ControlCall;

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

/// Serves the control socket at `path`, passing requests to `calls`.
pub fn serve(path: &Path, calls: mpsc::Sender<ControlCall>) -> Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // A socket left by a previous run would make bind fail.
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).with_context(|| {
        format!(
            "control socket {}: cannot bind (another bgp4mesh running?)",
            path.display()
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let calls = calls.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = tokio::io::BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let response = match serde_json::from_str::<Request>(&line) {
                        Err(e) => Response::error(format!("bad request: {e}")),
                        Ok(request) => {
                            let (reply, answer) = oneshot::channel();
                            if calls.send(ControlCall { request, reply }).await.is_err() {
                                Response::error("the daemon is shutting down")
                            } else {
                                answer
                                    .await
                                    .unwrap_or_else(|_| Response::error("no answer"))
                            }
                        }
                    };
                    let mut text = serde_json::to_string(&response)
                        .unwrap_or_else(|_| "{\"ok\":false}".into());
                    text.push('\n');
                    if write.write_all(text.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    }))
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
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    serde_json::from_str(&answer).with_context(|| format!("bad answer from the daemon: {answer:?}"))
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
}
