//! A node's side of a relay: one local UDP socket per relayed peer. The
//! WireGuard device's endpoint for the peer is the socket's loopback
//! address; what the device sends there goes to the relay with the pair's
//! channel header in front, and what the relay sends back goes to the
//! device without it. The device does not know a relay is involved, and
//! the kernel module's endpoints work the same way.
//!
//! The link binds to the relay at once, every 0.5 s until the relay
//! answers, then every [`BIND_EVERY`] (which also keeps this node's NAT
//! mapping towards the relay open); a new relay
//! path (the controller moved the pair to another relay) binds there at
//! once, and the device's endpoint stays the same loopback address.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bgp4mesh_api::RelayPath;
use bgp4mesh_api::relay::{self, Bind, Channel};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};

/// How often a bound link binds again.
pub const BIND_EVERY: Duration = Duration::from_secs(10);
/// How often a link binds while the relay has not answered: it may not
/// have its key yet (it gets it from the controller as the pair gets its
/// credentials), or the first bind was lost.
const BIND_UNTIL_BOUND: Duration = Duration::from_millis(500);
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
        let channel: Channel = relay::from_hex(&path.channel).ok_or_else(|| invalid("channel"))?;
        let mac: [u8; 32] = relay::from_hex(&path.mac).ok_or_else(|| invalid("credential"))?;
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

struct Shared {
    socket: UdpSocket,
    /// Bound to `[::]` with IPv4 mapped in (relays of either family).
    dual_stack: bool,
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
        let (socket, dual_stack) = bgp4mesh_wireguard::bind_udp_any(0)?;
        let socket: UdpSocket = socket.into();
        // recvmmsg on a blocking socket waits to fill every buffer: the
        // loop polls instead.
        socket.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            socket,
            dual_stack,
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

/// The largest GSO send: the kernel's limit on a UDP datagram's payload.
const MAX_RUN_BYTES: usize = 65_507;
/// Receive buffers per `recvmmsg`, each room for one GRO batch.
const BATCH: usize = 8;
const BUFFER: usize = 65_536;

/// Datagrams of one size (the last may be shorter) for one destination,
/// gathered into one GSO send.
struct Run {
    buf: Vec<u8>,
    segment: usize,
    count: usize,
    /// A shorter datagram ended the run: nothing more may join it.
    closed: bool,
}

impl Run {
    fn new() -> Run {
        Run {
            buf: Vec::with_capacity(MAX_RUN_BYTES),
            segment: 0,
            count: 0,
            closed: false,
        }
    }
}

impl Shared {
    fn destination(&self, to: SocketAddr) -> SocketAddr {
        match to.ip() {
            IpAddr::V4(v4) if self.dual_stack => {
                SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), to.port())
            }
            _ => to,
        }
    }

    /// Sends what `run` gathered to `to`, one GSO send; counts it in
    /// `counter`.
    fn flush(&self, state: &UdpSocketState, run: &mut Run, to: SocketAddr, counter: &AtomicU64) {
        if run.count == 0 {
            return;
        }
        let transmit = Transmit {
            destination: self.destination(to),
            ecn: None,
            contents: &run.buf,
            segment_size: (run.count > 1).then_some(run.segment),
            src_ip: None,
        };
        match state.try_send(UdpSockRef::from(&self.socket), &transmit) {
            Ok(()) => {
                counter.fetch_add(run.count as u64, Ordering::Relaxed);
            }
            Err(_) if run.count > 1 => {
                // No GSO on the way (or no room): one by one.
                for datagram in run.buf.chunks(run.segment.max(1)) {
                    if self.socket.send_to(datagram, self.destination(to)).is_ok() {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Err(e) => tracing::trace!(%to, "relay link send: {e}"),
        }
        run.buf.clear();
        run.count = 0;
        run.closed = false;
    }

    /// Adds `head` + `body` as one datagram to `run` for `to`, sending the
    /// run first when it cannot take it.
    fn push(
        &self,
        state: &UdpSocketState,
        run: &mut Run,
        to: SocketAddr,
        counter: &AtomicU64,
        head: &[u8],
        body: &[u8],
    ) {
        let len = head.len() + body.len();
        let max_segments = state.max_gso_segments().max(1);
        let fits = run.count == 0
            || (!run.closed
                && len <= run.segment
                && run.count < max_segments
                && run.buf.len() + len <= MAX_RUN_BYTES);
        if !fits {
            self.flush(state, run, to, counter);
        }
        if run.count == 0 {
            run.segment = len;
        }
        run.buf.extend_from_slice(head);
        run.buf.extend_from_slice(body);
        run.count += 1;
        run.closed = len < run.segment;
    }
}

fn run(shared: &Shared) {
    let state = match UdpSocketState::new(UdpSockRef::from(&shared.socket)) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("relay link: {e}");
            return;
        }
    };
    let mut storage: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; BUFFER]).collect();
    let mut meta = vec![RecvMeta::default(); BATCH];
    let (mut to_relay, mut to_device) = (Run::new(), Run::new());
    let mut last_bind: Option<Instant> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        let target = match shared.target.lock() {
            Ok(t) => t.clone(),
            Err(_) => return,
        };
        let every = if shared.bound.load(Ordering::Relaxed) {
            BIND_EVERY
        } else {
            BIND_UNTIL_BOUND
        };
        if shared.rebind.swap(false, Ordering::Relaxed)
            || last_bind.is_none_or(|t| t.elapsed() >= every)
        {
            let bind = relay::bind(&target.bind);
            if let Err(e) = shared
                .socket
                .send_to(&bind, shared.destination(target.relay))
            {
                tracing::debug!(relay = %target.relay, "relay bind: {e}");
            }
            last_bind = Some(Instant::now());
        }
        let received = {
            let mut iovs: Vec<IoSliceMut> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            state.recv(UdpSockRef::from(&shared.socket), &mut iovs, &mut meta)
        };
        let n = match received {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                use std::os::fd::AsFd;
                let mut fds = [nix::poll::PollFd::new(
                    shared.socket.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let millis = u16::try_from(TICK.as_millis()).unwrap_or(u16::MAX);
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(millis));
                continue;
            }
            Err(e) => {
                tracing::debug!("relay link: {e}");
                std::thread::sleep(TICK);
                continue;
            }
        };
        let header = relay::data_header(&target.bind.channel, target.bind.side);
        for (m, buf) in meta[..n].iter().zip(&storage) {
            let from = SocketAddr::new(m.addr.ip().to_canonical(), m.addr.port());
            let stride = if m.stride == 0 { m.len } else { m.stride }.max(1);
            for datagram in buf[..m.len].chunks(stride) {
                if from == shared.device {
                    shared.push(
                        &state,
                        &mut to_relay,
                        target.relay,
                        &shared.to_relay,
                        &header,
                        datagram,
                    );
                } else if from == target.relay {
                    if let Some((channel, side, payload)) = relay::parse_data(datagram) {
                        if channel == target.bind.channel && side != target.bind.side {
                            shared.push(
                                &state,
                                &mut to_device,
                                shared.device,
                                &shared.from_relay,
                                &[],
                                payload,
                            );
                        }
                    } else if relay::parse_bound(datagram)
                        .is_some_and(|(c, s)| c == target.bind.channel && s == target.bind.side)
                    {
                        shared.bound.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
        shared.flush(&state, &mut to_relay, target.relay, &shared.to_relay);
        shared.flush(&state, &mut to_device, shared.device, &shared.from_relay);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_parse_and_bad_ones_are_refused() {
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
