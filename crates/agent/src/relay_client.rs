//! A node's side of a relay: one local UDP socket per relayed peer. The
//! WireGuard device's endpoint for the peer is the socket's loopback
//! address; what the device sends there goes to the relay with the pair's
//! channel header in front, and what the relay sends back goes to the
//! device without it. The device does not know a relay is involved, and
//! the kernel module's endpoints work the same way.
//!
//! The link binds to the relay at once and every [`BIND_EVERY`] (which
//! also keeps this node's NAT mapping towards the relay open); a new relay
//! path (the controller moved the pair to another relay) binds there at
//! once, and the device's endpoint stays the same loopback address.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bgp4mesh_api::RelayPath;
use bgp4mesh_api::relay::{self, Bind, Channel};

/// How often a link binds again.
pub const BIND_EVERY: Duration = Duration::from_secs(10);
/// How long a receive waits before the link looks at its clock.
const TICK: Duration = Duration::from_millis(100);

/// Where a link sends: the relay, the channel and the credential.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    relay: SocketAddr,
    bind: Bind,
}

impl Target {
    fn of(path: &RelayPath) -> io::Result<Target> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let relay: SocketAddr = path.address.parse().map_err(|_| invalid("relay address"))?;
        let channel: Channel = hex_array(&path.channel).ok_or_else(|| invalid("channel"))?;
        let mac: [u8; 32] = hex_array(&path.mac).ok_or_else(|| invalid("credential"))?;
        if path.side > 1 {
            return Err(invalid("side"));
        }
        Ok(Target {
            relay,
            bind: Bind {
                channel,
                side: path.side,
                expires: path.expires,
                mac,
            },
        })
    }
}

/// `N` bytes from `2 N` hex digits.
pub fn hex_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

struct Shared {
    socket: UdpSocket,
    /// The device's socket (loopback, its listen port).
    device: SocketAddr,
    target: Mutex<Target>,
    /// Set when the target changed: bind at once.
    rebind: AtomicBool,
    stop: AtomicBool,
    bound: AtomicBool,
    to_relay: AtomicU64,
    from_relay: AtomicU64,
}

/// One relayed peer's link. Stops with [`RelayLink::stop`] or on drop.
pub struct RelayLink {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What `show mesh` says of a link.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkStatus {
    pub relay: SocketAddr,
    pub bound: bool,
    pub to_relay: u64,
    pub from_relay: u64,
}

impl RelayLink {
    /// A link to the relay of `path` for a device listening on
    /// `device_port`.
    pub fn start(path: &RelayPath, device_port: u16) -> io::Result<RelayLink> {
        let target = Target::of(path)?;
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket.set_read_timeout(Some(TICK))?;
        let shared = Arc::new(Shared {
            socket,
            device: SocketAddr::from((Ipv4Addr::LOCALHOST, device_port)),
            target: Mutex::new(target),
            rebind: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            bound: AtomicBool::new(false),
            to_relay: AtomicU64::new(0),
            from_relay: AtomicU64::new(0),
        });
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("relay-link".into())
            .spawn(move || run(&for_thread))?;
        Ok(RelayLink {
            shared,
            thread: Some(thread),
        })
    }

    /// The device's endpoint for the peer: this link's loopback address.
    pub fn endpoint(&self) -> io::Result<SocketAddr> {
        let port = self.shared.socket.local_addr()?.port();
        Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    }

    /// Moves the link to another relay path (or a new credential);
    /// binds there at once when it changed.
    pub fn set_path(&self, path: &RelayPath) -> io::Result<()> {
        let target = Target::of(path)?;
        let mut have = self
            .shared
            .target
            .lock()
            .map_err(|_| io::Error::other("relay link poisoned"))?;
        if *have != target {
            if have.relay != target.relay {
                self.shared.bound.store(false, Ordering::Relaxed);
            }
            *have = target;
            self.shared.rebind.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    pub fn status(&self) -> Option<LinkStatus> {
        let relay = self.shared.target.lock().ok()?.relay;
        Some(LinkStatus {
            relay,
            bound: self.shared.bound.load(Ordering::Relaxed),
            to_relay: self.shared.to_relay.load(Ordering::Relaxed),
            from_relay: self.shared.from_relay.load(Ordering::Relaxed),
        })
    }

    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RelayLink {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(shared: &Shared) {
    let mut buf = vec![0u8; relay::HEADER_LEN + 65_536];
    let mut last_bind: Option<Instant> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        let target = match shared.target.lock() {
            Ok(t) => t.clone(),
            Err(_) => return,
        };
        if shared.rebind.swap(false, Ordering::Relaxed)
            || last_bind.is_none_or(|t| t.elapsed() >= BIND_EVERY)
        {
            if let Err(e) = shared
                .socket
                .send_to(&relay::bind(&target.bind), target.relay)
            {
                tracing::debug!(relay = %target.relay, "relay bind: {e}");
            }
            last_bind = Some(Instant::now());
        }
        // Received after the header's room, so a datagram from the device
        // gets its header without a copy.
        let (n, from) = match shared.socket.recv_from(&mut buf[relay::HEADER_LEN..]) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => {
                tracing::debug!("relay link: {e}");
                std::thread::sleep(TICK);
                continue;
            }
        };
        let datagram = &buf[relay::HEADER_LEN..relay::HEADER_LEN + n];
        if from == shared.device {
            buf[..relay::HEADER_LEN]
                .copy_from_slice(&relay::data_header(&target.bind.channel, target.bind.side));
            let whole = &buf[..relay::HEADER_LEN + n];
            if shared.socket.send_to(whole, target.relay).is_ok() {
                shared.to_relay.fetch_add(1, Ordering::Relaxed);
            }
        } else if from == target.relay {
            if let Some((channel, side, payload)) = relay::parse_data(datagram) {
                if channel == target.bind.channel
                    && side != target.bind.side
                    && shared.socket.send_to(payload, shared.device).is_ok()
                {
                    shared.from_relay.fetch_add(1, Ordering::Relaxed);
                }
            } else if relay::parse_bound(datagram)
                .is_some_and(|(c, s)| c == target.bind.channel && s == target.bind.side)
            {
                shared.bound.store(true, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_credentials_parse_and_bad_ones_are_refused() {
        assert_eq!(hex_array::<2>("0aff"), Some([0x0a, 0xff]));
        assert_eq!(hex_array::<2>("0af"), None);
        assert_eq!(hex_array::<2>("0afz"), None);
        let path = RelayPath {
            node_id: "r".into(),
            name: "r".into(),
            address: "192.0.2.1:51821".into(),
            channel: "0102030405060708".into(),
            side: 1,
            expires: 9,
            mac: "ab".repeat(32),
        };
        let t = Target::of(&path).expect("valid");
        assert_eq!(t.bind.channel, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(
            Target::of(&RelayPath {
                side: 2,
                ..path.clone()
            })
            .is_err()
        );
        assert!(
            Target::of(&RelayPath {
                address: "nowhere".into(),
                ..path
            })
            .is_err()
        );
    }
}
