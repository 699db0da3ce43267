//! The cross-platform userspace API (wireguard.com/xplatform): the text
//! protocol `wg` speaks on `/var/run/wireguard/<iface>.sock`. This module
//! only reads and writes the text; `uapi_server` serves it for a device.
//!
//! Replies end with `errno=N` where N is 0 or a negative errno, as
//! wireguard-go writes them (`wg` prints the matching message).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::UNIX_EPOCH;

use ipnet::IpNet;

use crate::config::{AllowedIpChange, DeviceStatus, PeerChange, SetRequest};
use crate::key::Key;

/// Why a `set=1` request was refused: the errno for the reply and a
/// message for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UapiError {
    pub errno: i32,
    pub message: String,
}

impl UapiError {
    pub fn invalid(message: impl Into<String>) -> UapiError {
        UapiError {
            errno: libc::EINVAL,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for UapiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (errno {})", self.message, self.errno)
    }
}

impl std::error::Error for UapiError {}

/// Parses the `key=value` lines of a `set=1` request (without the `set=1`
/// line and the final empty line). Nothing is applied when a line is bad.
pub fn parse_set<'a>(lines: impl IntoIterator<Item = &'a str>) -> Result<SetRequest, UapiError> {
    let mut parser = SetParser::default();
    for line in lines {
        parser.line(line)?;
    }
    Ok(parser.finish())
}

/// A `set=1` request parsed line by line as it arrives, so that a request
/// is never held as text. Each line costs the same however long the
/// request already is.
#[derive(Debug, Default)]
pub struct SetParser {
    request: SetRequest,
}

impl SetParser {
    /// Parses one `key=value` line (without its newline).
    pub fn line(&mut self, line: &str) -> Result<(), UapiError> {
        let request = &mut self.request;
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| UapiError::invalid(format!("line {line:?} is not key=value")))?;
        let bad = |what: &str| UapiError::invalid(format!("{key}={value}: {what}"));
        let peer = request.peers.last_mut();
        match (key, peer) {
            ("public_key", _) => {
                let key = Key::from_hex(value).map_err(|e| bad(&e.to_string()))?;
                request.peers.push(PeerChange::new(key));
            }
            ("private_key", None) => {
                let key = Key::from_hex(value).map_err(|e| bad(&e.to_string()))?;
                request.private_key = Some((!key.is_zero()).then_some(key));
            }
            ("listen_port", None) => {
                request.listen_port = Some(value.parse().map_err(|_| bad("not a port"))?);
            }
            ("fwmark", None) => {
                request.fwmark = Some(if value.is_empty() {
                    0
                } else {
                    value.parse().map_err(|_| bad("not a 32-bit mark"))?
                });
            }
            ("replace_peers", None) => {
                request.replace_peers = parse_true(value).ok_or_else(|| bad("must be true"))?;
            }
            ("remove", Some(peer)) => {
                peer.remove = parse_true(value).ok_or_else(|| bad("must be true"))?;
            }
            ("update_only", Some(peer)) => {
                peer.update_only = parse_true(value).ok_or_else(|| bad("must be true"))?;
            }
            ("preshared_key", Some(peer)) => {
                let key = Key::from_hex(value).map_err(|e| bad(&e.to_string()))?;
                peer.preshared_key = Some((!key.is_zero()).then_some(key));
            }
            ("endpoint", Some(peer)) => {
                let endpoint: SocketAddr = value.parse().map_err(|_| bad("not IP:port"))?;
                peer.endpoint = Some(endpoint);
            }
            ("persistent_keepalive_interval", Some(peer)) => {
                peer.persistent_keepalive =
                    Some(value.parse().map_err(|_| bad("not 0..65535 seconds"))?);
            }
            ("replace_allowed_ips", Some(peer)) => {
                peer.replace_allowed_ips = parse_true(value).ok_or_else(|| bad("must be true"))?;
            }
            ("allowed_ip", Some(peer)) => {
                let (remove, prefix) = match value.strip_prefix('-') {
                    Some(rest) => (true, rest),
                    None => (false, value),
                };
                let net: IpNet = prefix.parse().map_err(|_| bad("not a prefix"))?;
                // The kernel and wireguard-go store the network address.
                let net = net.trunc();
                peer.allowed_ips.push(if remove {
                    AllowedIpChange::Remove(net)
                } else {
                    AllowedIpChange::Add(net)
                });
            }
            ("protocol_version", Some(_)) => {
                if value != "1" {
                    return Err(bad("only protocol version 1 exists"));
                }
            }
            (_, None) => return Err(bad("not an interface key")),
            (_, Some(_)) => return Err(bad("not a peer key")),
        }
        Ok(())
    }

    /// The request, once every line was accepted.
    pub fn finish(self) -> SetRequest {
        self.request
    }
}

fn parse_true(value: &str) -> Option<bool> {
    (value == "true").then_some(true)
}

/// The reply to `get=1`: the device, then each peer, then `errno=0`.
pub fn format_get(status: &DeviceStatus) -> String {
    let mut out = String::with_capacity(256 + 256 * status.peers.len());
    // Writing to a String cannot fail.
    let mut line = |args: std::fmt::Arguments| {
        let _ = out.write_fmt(args);
        out.push('\n');
    };
    if let Some(key) = &status.private_key {
        line(format_args!("private_key={}", key.to_hex()));
    }
    if status.listen_port != 0 {
        line(format_args!("listen_port={}", status.listen_port));
    }
    if status.fwmark != 0 {
        line(format_args!("fwmark={}", status.fwmark));
    }
    for peer in &status.peers {
        line(format_args!("public_key={}", peer.public_key.to_hex()));
        let psk = peer.preshared_key.unwrap_or(Key([0; 32]));
        line(format_args!("preshared_key={}", psk.to_hex()));
        line(format_args!("protocol_version=1"));
        if let Some(endpoint) = peer.endpoint {
            line(format_args!("endpoint={endpoint}"));
        }
        let since_epoch = peer
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        line(format_args!(
            "last_handshake_time_sec={}",
            since_epoch.as_secs()
        ));
        line(format_args!(
            "last_handshake_time_nsec={}",
            since_epoch.subsec_nanos()
        ));
        line(format_args!("tx_bytes={}", peer.tx_bytes));
        line(format_args!("rx_bytes={}", peer.rx_bytes));
        line(format_args!(
            "persistent_keepalive_interval={}",
            peer.persistent_keepalive.unwrap_or(0)
        ));
        for net in &peer.allowed_ips {
            line(format_args!("allowed_ip={net}"));
        }
    }
    out.push_str("errno=0\n\n");
    out
}

/// The reply to a `set=1`: `errno=0` or `errno=-N`.
pub fn format_errno(result: &Result<(), UapiError>) -> String {
    match result {
        Ok(()) => "errno=0\n\n".to_string(),
        Err(e) => format!("errno=-{}\n\n", e.errno),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::config::PeerStatus;

    fn hex(byte: u8) -> String {
        Key([byte; 32]).to_hex()
    }

    /// The example of wireguard.com/xplatform, with the keys shortened to
    /// repeated bytes.
    #[test]
    fn parses_the_xplatform_example() {
        let text = format!(
            "private_key={}\nfwmark=0\nlisten_port=12912\nreplace_peers=true\n\
             public_key={}\npreshared_key={}\nreplace_allowed_ips=true\nallowed_ip=192.168.4.4/32\n\
             endpoint=[abcd:23::33%2]:51820\n\
             public_key={}\nreplace_allowed_ips=true\nallowed_ip=192.168.4.6/32\n\
             persistent_keepalive_interval=111\nendpoint=182.122.22.19:3233\n\
             public_key={}\nendpoint=5.152.198.39:51820\nreplace_allowed_ips=true\n\
             allowed_ip=192.168.4.10/32\nallowed_ip=192.168.4.11/32\n\
             public_key={}\nremove=true",
            hex(0xe8),
            hex(0xb8),
            hex(0x18),
            hex(0x58),
            hex(0x66),
            hex(0xe3)
        );
        let request = parse_set(text.lines()).expect("parses");
        assert_eq!(request.private_key, Some(Some(Key([0xe8; 32]))));
        assert_eq!(request.fwmark, Some(0));
        assert_eq!(request.listen_port, Some(12912));
        assert!(request.replace_peers);
        assert_eq!(request.peers.len(), 4);
        let first = &request.peers[0];
        assert_eq!(first.preshared_key, Some(Some(Key([0x18; 32]))));
        assert!(first.replace_allowed_ips);
        assert_eq!(
            first.endpoint,
            Some("[abcd:23::33%2]:51820".parse().expect("v6 endpoint"))
        );
        assert_eq!(request.peers[1].persistent_keepalive, Some(111));
        assert_eq!(request.peers[2].allowed_ips.len(), 2);
        assert!(request.peers[3].remove);
    }

    #[test]
    fn zero_keys_remove_and_prefixes_are_truncated() {
        let text = format!(
            "private_key={}\npublic_key={}\npreshared_key={}\nallowed_ip=10.1.2.3/24\nallowed_ip=-fd00::1/64",
            hex(0),
            hex(1),
            hex(0)
        );
        let request = parse_set(text.lines()).expect("parses");
        assert_eq!(request.private_key, Some(None));
        assert_eq!(request.peers[0].preshared_key, Some(None));
        assert_eq!(
            request.peers[0].allowed_ips,
            vec![
                AllowedIpChange::Add("10.1.2.0/24".parse().expect("net")),
                AllowedIpChange::Remove("fd00::/64".parse().expect("net")),
            ]
        );
    }

    #[test]
    fn bad_lines_are_refused_with_einval_and_name_the_key() {
        let peer = format!("public_key={}", hex(1));
        for (lines, needle) in [
            (vec!["listen_port=abc"], "listen_port=abc"),
            (vec!["foo=1"], "not an interface key"),
            (vec![peer.as_str(), "listen_port=1"], "not a peer key"),
            (vec!["remove=true"], "not an interface key"),
            (
                vec![peer.as_str(), "protocol_version=2"],
                "protocol version",
            ),
            (vec![peer.as_str(), "endpoint=nowhere"], "endpoint=nowhere"),
            (
                vec![peer.as_str(), "allowed_ip=10.0.0.0/33"],
                "not a prefix",
            ),
            (vec!["private_key=abcd"], "64 characters"),
            (vec!["no equals sign"], "key=value"),
        ] {
            let err = parse_set(lines.clone()).expect_err("refused");
            assert_eq!(err.errno, libc::EINVAL, "{lines:?}");
            assert!(err.message.contains(needle), "{lines:?}: {err}");
        }
        assert_eq!(format_errno(&Err(UapiError::invalid("x"))), "errno=-22\n\n");
    }

    #[test]
    fn get_lists_device_then_peers() {
        let status = DeviceStatus {
            name: "wg0".into(),
            private_key: Some(Key([2; 32])),
            public_key: None,
            listen_port: 51820,
            fwmark: 0,
            fragmented_datagrams: 0,
            peers: vec![PeerStatus {
                local_address: None,
                public_key: Key([3; 32]),
                preshared_key: None,
                endpoint: Some("192.0.2.1:51821".parse().expect("addr")),
                allowed_ips: vec!["10.0.0.2/32".parse().expect("net")],
                persistent_keepalive: Some(25),
                last_handshake: Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5)),
                rx_bytes: 10,
                tx_bytes: 20,
            }],
        };
        let text = format_get(&status);
        let expected = format!(
            "private_key={}\nlisten_port=51820\npublic_key={}\npreshared_key={}\n\
             protocol_version=1\nendpoint=192.0.2.1:51821\nlast_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=5\ntx_bytes=20\nrx_bytes=10\n\
             persistent_keepalive_interval=25\nallowed_ip=10.0.0.2/32\nerrno=0\n\n",
            hex(2),
            hex(3),
            hex(0)
        );
        assert_eq!(text, expected);
    }
}
