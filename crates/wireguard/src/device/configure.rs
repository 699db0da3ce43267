//! Changing the device: [`Device::apply`] (one UAPI change request) and
//! [`Device::configure`] (desired state), with the peers, keys and socket
//! they change.

use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use gotatun::noise::Tunn;
use gotatun::noise::rate_limiter::RateLimiter;
use gotatun::packet::{Packet, WgKind};
use gotatun::x25519;
use tracing::debug;

use super::{Device, Interface, Peer, PeerState, Shared, Udp, lock, read};
use crate::config::{AllowedIpChange, DeviceConfig, PeerChange, SetRequest, plan_changes};
use crate::key::Key;
use crate::uapi::UapiError;

/// Handshake messages per second from one source address before the device
/// answers with cookies (the protocol's DoS defence).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

impl Device {
    /// Applies one change request (the UAPI `set=1` semantics). As in
    /// wireguard-go, setting an endpoint starts no handshake: the peer
    /// handshakes when it first has a packet to send, so a peer whose other
    /// side is configured a moment later is not left waiting for a lost
    /// handshake's retry (5 s). Turning a persistent keepalive on does
    /// start one, as its first keepalive would.
    pub fn apply(&self, request: &SetRequest) -> Result<(), UapiError> {
        self.shared.apply(request, false)
    }

    /// Brings the device to `desired`, changing only what differs: peers
    /// whose key, preshared key and keepalive are unchanged keep their
    /// sessions; an endpoint is only set when the desired one changed, so a
    /// roamed peer is not pulled back on every reconcile.
    ///
    /// This is the daemon's API (the mesh agent, peerings) and it
    /// handshakes eagerly: each peer given a new endpoint and without a
    /// session gets a handshake initiation at once, so tunnels are up
    /// before traffic needs them (the agent waits for these handshakes
    /// before a border announces its routes). [`Device::apply`] does not.
    pub fn configure(&self, desired: &DeviceConfig) -> Result<(), UapiError> {
        self.shared.check_running()?;
        let current = self.status();
        let configured_port = read(&self.shared.iface).listen_port;
        let endpoints = lock(&self.shared.configured_endpoints).clone();
        let request = plan_changes(&current, configured_port, &endpoints, desired);
        self.shared.remember_endpoints(desired);
        if request == SetRequest::default() {
            return Ok(());
        }
        self.shared.apply(&request, true)
    }

    /// Sends `peer` a handshake initiation now, unless it has no endpoint,
    /// the device has no private key, or a handshake with it is under way
    /// or done (its session stands). Returns whether one was sent. For a
    /// caller that wants a tunnel up before traffic without
    /// [`Device::configure`]'s reconciling.
    pub fn handshake_now(&self, peer: &Key) -> bool {
        let Some(peer) = read(&self.shared.iface).by_key.get(peer).cloned() else {
            return false;
        };
        let Some(udp) = self.shared.udp() else {
            return false;
        };
        self.shared.initiate(&peer, &udp)
    }
}

impl Shared {
    /// `eager`: peers given an endpoint handshake at once
    /// ([`Device::configure`]), not only on their first packet.
    /// A stopped device takes no change: `ENODEV` ("No such device") when
    /// its interface is gone, as the kernel module answers for a deleted
    /// link; `ESHUTDOWN` when its owner stopped it.
    pub(super) fn check_running(&self) -> Result<(), UapiError> {
        if !self.stopping.load(Ordering::Relaxed) {
            return Ok(());
        }
        Err(if self.gone.load(Ordering::Relaxed) {
            UapiError {
                errno: libc::ENODEV,
                message: format!("{}: the interface is gone; the device stopped", self.name),
            }
        } else {
            UapiError {
                errno: libc::ESHUTDOWN,
                message: format!("{}: the device is stopped", self.name),
            }
        })
    }

    fn apply(&self, request: &SetRequest, eager: bool) -> Result<(), UapiError> {
        self.check_running()?;
        let mut iface = self.iface.write().unwrap_or_else(PoisonError::into_inner);
        // The socket first: a port in use refuses the request before
        // anything else changed.
        let port = request.listen_port.unwrap_or(iface.listen_port);
        let fwmark = request.fwmark.unwrap_or(iface.fwmark);
        if request.listen_port.is_some() || request.fwmark.is_some() {
            self.rebind(&iface, port, fwmark)?;
            iface.listen_port = port;
            iface.fwmark = fwmark;
        }
        if let Some(private_key) = request.private_key {
            self.set_private_key(&mut iface, private_key);
        }
        // Removed peers leave the peer list and the index map in one pass
        // at the end, however many there are.
        let mut removed = Vec::new();
        if request.replace_peers {
            let all: Vec<Key> = iface.peers.iter().map(|p| p.public_key).collect();
            removed.extend(
                all.iter()
                    .filter_map(|key| self.remove_peer(&mut iface, key)),
            );
        }
        for change in &request.peers {
            removed.extend(self.apply_peer(&mut iface, change, eager));
        }
        self.forget(&mut iface, &removed);
        // Peers marked for it get a handshake now rather than at the next
        // timer tick: a peer that restarted holds a session we no longer
        // have.
        // Not while the interface is down: the marks wait for it to come
        // up ([`Shared::came_up`]).
        if let Some(udp) = self.udp().filter(|_| !self.down.load(Ordering::Relaxed)) {
            for peer in &iface.peers {
                let initiate = {
                    let mut state = lock(&peer.state);
                    state.endpoint.is_some() && std::mem::take(&mut state.initiate)
                };
                if initiate {
                    self.initiate(peer, &udp);
                }
            }
        }
        Ok(())
    }

    /// Sends `peer` a handshake initiation unless it has no endpoint or
    /// key, or has a session or a handshake under way. Returns whether one
    /// was sent.
    pub(super) fn initiate(&self, peer: &Arc<Peer>, udp: &Udp) -> bool {
        if peer.low_order {
            return false;
        }
        let mut state = lock(&peer.state);
        let Some(to) = state.target(peer) else {
            return false;
        };
        let Some(tunn) = state.tunn.as_mut() else {
            return false;
        };
        if tunn.time_since_last_handshake().is_some() {
            return false;
        }
        let Some(init) = tunn.format_handshake_initiation(false) else {
            return false;
        };
        let init: WgKind = init.into();
        self.register_index(&init, peer);
        drop(state);
        let bytes: Packet = init.into();
        udp.send(self, to, Some(peer), &bytes, None);
        true
    }

    /// The interface came up: as the kernel module's `wg_open`, each peer
    /// with a persistent keepalive sends one now (without a session, a
    /// handshake initiation), and so does each peer marked to handshake
    /// while it was down.
    pub(super) fn came_up(&self) {
        let Some(udp) = self.udp() else {
            return;
        };
        let iface = read(&self.iface);
        for peer in &iface.peers {
            let initiate = {
                let mut state = lock(&peer.state);
                let marked = std::mem::take(&mut state.initiate);
                (marked || state.keepalive.is_some()) && state.endpoint.is_some()
            };
            if initiate {
                self.initiate(peer, &udp);
            }
        }
    }

    fn rebind(&self, iface: &Interface, port: u16, fwmark: u32) -> Result<(), UapiError> {
        let current = self.udp();
        if let Some(udp) = &current
            && (port == 0 || port == udp.port)
        {
            if fwmark != iface.fwmark {
                udp.socket
                    .set_mark(fwmark)
                    .map_err(|e| UapiError::invalid(format!("fwmark={fwmark}: {e}")))?;
            }
            return Ok(());
        }
        // Free the old port first: the new one may be the same number on
        // the other address family, and a failed bind must not leave the
        // device without a socket.
        let udp = match self.in_device_netns(|| Udp::bind(port, fwmark)) {
            Ok(udp) => udp,
            Err(e) => {
                let errno = if e.kind() == io::ErrorKind::AddrInUse {
                    libc::EADDRINUSE
                } else {
                    libc::EIO
                };
                return Err(UapiError {
                    errno,
                    message: format!("listen_port={port}: {e}"),
                });
            }
        };
        *self.udp.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(udp));
        Ok(())
    }

    fn set_private_key(&self, iface: &mut Interface, key: Option<Key>) {
        // Stored and reported clamped, as the kernel and wireguard-go do.
        let secret = key.map(|k| x25519::StaticSecret::from(k.clamped().0));
        let same = match (&secret, &iface.secret) {
            (Some(a), Some(b)) => a.to_bytes() == b.to_bytes(),
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        let Some(secret) = secret else {
            iface.secret = None;
            iface.public = None;
            iface.rate_limiter = None;
            for peer in &iface.peers {
                lock(&peer.state).tunn = None;
            }
            return;
        };
        let public = x25519::PublicKey::from(&secret);
        let rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        // The first private key: peers with a persistent keepalive send it
        // now (at once if the interface is up, else when it comes up), as
        // the kernel module sends what it queued without a key (netlink.c:
        // `send_staged_packets`).
        let first = iface.secret.is_none();
        // A peer with our own public key cannot exist (the kernel and
        // wireguard-go drop it too).
        let own = self.remove_peer(iface, &Key(*public.as_bytes()));
        self.forget(iface, own.as_slice());
        for peer in &iface.peers {
            let mut state = lock(&peer.state);
            state.initiate |= first && state.keepalive.is_some();
            match state.tunn.as_mut() {
                Some(tunn) => tunn.set_static_private(secret.clone(), public, rate_limiter.clone()),
                None => {
                    state.tunn = Some(self.new_tunn(
                        &secret,
                        &rate_limiter,
                        peer.public_key,
                        state.preshared_key,
                        state.keepalive,
                    ))
                }
            }
        }
        iface.secret = Some(secret);
        iface.public = Some(public);
        iface.rate_limiter = Some(rate_limiter);
    }

    fn new_tunn(
        &self,
        secret: &x25519::StaticSecret,
        rate_limiter: &Arc<RateLimiter>,
        peer: Key,
        preshared_key: Option<Key>,
        keepalive: Option<u16>,
    ) -> Tunn {
        let mut tunn = Tunn::new(
            secret.clone(),
            x25519::PublicKey::from(peer.0),
            preshared_key.map(|k| k.0),
            keepalive,
            self.index_table.clone(),
            rate_limiter.clone(),
        );
        if let Some(params) = &self.timer_params {
            tunn.dangerously_set_timer_params(params.clone());
        }
        tunn
    }

    /// Takes a peer out of the key map and the allowed IPs and ends its
    /// sessions; [`Shared::forget`] takes it out of the rest.
    fn remove_peer(&self, iface: &mut Interface, key: &Key) -> Option<Arc<Peer>> {
        let peer = iface.by_key.remove(key)?;
        iface.allowed.clear(key);
        lock(&peer.state).tunn = None;
        debug!(interface = %self.name, peer = ?key, "peer removed");
        Some(peer)
    }

    /// Takes removed peers out of the peer list and the index map: one
    /// pass over each.
    fn forget(&self, iface: &mut Interface, removed: &[Arc<Peer>]) {
        if removed.is_empty() {
            return;
        }
        let gone: HashSet<*const Peer> = removed.iter().map(Arc::as_ptr).collect();
        iface.peers.retain(|p| !gone.contains(&Arc::as_ptr(p)));
        lock(&self.by_index).retain(|_, owner| !gone.contains(&Arc::as_ptr(owner)));
    }

    /// Applies one peer's change; returns the peer if it was removed.
    /// `eager`: a new endpoint marks the peer for a handshake.
    fn apply_peer(
        &self,
        iface: &mut Interface,
        change: &PeerChange,
        eager: bool,
    ) -> Option<Arc<Peer>> {
        if change.remove {
            return self.remove_peer(iface, &change.public_key);
        }
        if iface.public.map(|p| *p.as_bytes()) == Some(change.public_key.0) {
            return None;
        }
        let peer = match iface.by_key.get(&change.public_key) {
            Some(peer) => Arc::clone(peer),
            None if change.update_only => return None,
            None => {
                let tunn = iface.secret.as_ref().zip(iface.rate_limiter.as_ref()).map(
                    |(secret, limiter)| {
                        self.new_tunn(secret, limiter, change.public_key, None, None)
                    },
                );
                let peer = Arc::new(Peer {
                    public_key: change.public_key,
                    state: Mutex::new(PeerState {
                        tunn,
                        preshared_key: None,
                        keepalive: None,
                        endpoint: None,
                        source: None,
                        initiate: false,
                        handed_over: None,
                        fallback: None,
                        direct_heard: None,
                        second: None,
                        initiated: None,
                        held: None,
                    }),
                    rx_bytes: AtomicU64::new(0),
                    tx_bytes: AtomicU64::new(0),
                    gso_limit: AtomicUsize::new(usize::MAX),
                    source_refused: AtomicBool::new(false),
                    low_order: low_order(&change.public_key),
                    early: Mutex::new(None),
                });
                iface.peers.push(Arc::clone(&peer));
                iface.by_key.insert(change.public_key, Arc::clone(&peer));
                debug!(interface = %self.name, peer = ?change.public_key, "peer added");
                peer
            }
        };
        {
            let mut state = lock(&peer.state);
            if let Some(psk) = change.preshared_key {
                state.preshared_key = psk;
                if let Some(tunn) = state.tunn.as_mut() {
                    tunn.set_preshared_key(psk.map(|k| k.0));
                }
            }
            if let Some(endpoint) = change.endpoint {
                state.endpoint = Some(endpoint);
                // A configured endpoint: the kernel picks the source until
                // the peer's first packet says where it sends to.
                state.source = None;
                state.initiate |= eager;
            }
            if let Some(keepalive) = change.persistent_keepalive {
                let keepalive = (keepalive > 0).then_some(keepalive);
                // Turned on: its first keepalive goes now, which without
                // a session is a handshake (wireguard-go does the same).
                state.initiate |= keepalive.is_some() && state.keepalive.is_none();
                state.keepalive = keepalive;
                if let Some(tunn) = state.tunn.as_mut() {
                    tunn.set_persistent_keepalive(keepalive);
                }
            }
        }
        // Each change costs the same however many allowed IPs there are
        // (`AllowedIps`): a request is linear in its lines.
        if change.replace_allowed_ips {
            iface.allowed.clear(&peer.public_key);
        }
        for allowed in &change.allowed_ips {
            match *allowed {
                AllowedIpChange::Add(net) => {
                    iface.allowed.insert(net, &peer);
                }
                AllowedIpChange::Remove(net) => {
                    iface.allowed.remove(net, &peer.public_key);
                }
            }
        }
        None
    }

    fn remember_endpoints(&self, desired: &DeviceConfig) {
        let mut map = lock(&self.configured_endpoints);
        map.clear();
        for peer in &desired.peers {
            if let Some(endpoint) = peer.endpoint {
                map.insert(peer.public_key, endpoint);
            }
        }
    }
}

/// Whether `key` is a point of small order: its X25519 with any private
/// key (clamped, so a multiple of the cofactor) is all zeros.
fn low_order(key: &Key) -> bool {
    let any = x25519::StaticSecret::from([1; 32]);
    !any.diffie_hellman(&x25519::PublicKey::from(key.0))
        .was_contributory()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use bgp4mesh_lab::{Lab, can_run};

    use super::*;
    use crate::device::DeviceOptions;
    use crate::uapi_server::UapiServer;

    /// A device in a lab namespace with its UAPI socket in a directory of
    /// its own; `None` (skipped loudly) without root.
    struct Served {
        server: UapiServer,
        device: Arc<Device>,
        dir: std::path::PathBuf,
        _lab: Lab,
    }

    impl Served {
        fn start(test: &str) -> Option<Served> {
            if !can_run(test, &[]) {
                return None;
            }
            let lab = Lab::new("wg-uapi").expect("lab");
            let node = lab.add_node("a").expect("node");
            let ifname = lab.unique_ifname("wg").expect("name");
            let device = lab
                .in_netns(&node, || Device::create(DeviceOptions::new(&ifname)))
                .expect("netns")
                .expect("device");
            let device = Arc::new(device);
            let dir = std::env::temp_dir().join(format!("b4m-{test}-{}", std::process::id()));
            let server = UapiServer::start_at(&dir, Arc::clone(&device)).expect("UAPI server");
            Some(Served {
                server,
                device,
                dir,
                _lab: lab,
            })
        }

        /// One request on a new connection, and its reply.
        fn ask(&self, request: &str) -> String {
            ask(self.server.path(), request)
        }

        fn peer_for(&self, addr: &str) -> Option<Key> {
            let addr: IpAddr = addr.parse().expect("address");
            let iface = read(&self.device.shared.iface);
            iface.allowed.lookup(addr).map(|peer| peer.public_key)
        }
    }

    impl Drop for Served {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn ask(socket: &Path, request: &str) -> String {
        let mut stream = UnixStream::connect(socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(300)))
            .expect("timeout");
        stream.write_all(request.as_bytes()).expect("write");
        let mut reply = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while !reply.ends_with(b"\n\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => reply.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8(reply).expect("UTF-8 reply")
    }

    /// The `allowed_ip=` lines of one peer in a `get=1` reply.
    fn allowed_ips_of(reply: &str, peer: &Key) -> Vec<String> {
        let start = format!("public_key={}", peer.to_hex());
        reply
            .lines()
            .skip_while(|l| *l != start)
            .skip(1)
            .take_while(|l| !l.starts_with("public_key="))
            .filter_map(|l| l.strip_prefix("allowed_ip="))
            .map(str::to_string)
            .collect()
    }

    /// Equal lists, or where they first differ (not 200 000 lines of them).
    fn assert_same(got: &[String], want: &[String]) {
        let first = got.iter().zip(want).position(|(g, w)| g != w);
        assert!(
            got.len() == want.len() && first.is_none(),
            "{} listed, {} wanted; first difference at {first:?}: {:?} vs {:?}",
            got.len(),
            want.len(),
            first.map(|i| &got[i]),
            first.map(|i| &want[i])
        );
    }

    /// `n` distinct /32s and /128s, every tenth one IPv6.
    fn many_networks(n: u32) -> Vec<String> {
        (0..n)
            .map(|i| {
                if i % 10 == 9 {
                    let v6 = Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(i));
                    format!("{v6}/128")
                } else {
                    format!("{}/32", Ipv4Addr::from(0x0a00_0000 + i))
                }
            })
            .collect()
    }

    fn set_request(peer: &Key, networks: &[String]) -> String {
        let mut request = format!(
            "set=1\nprivate_key={}\npublic_key={}\nreplace_allowed_ips=true\n",
            Key([9; 32]).to_hex(),
            peer.to_hex()
        );
        for net in networks {
            request.push_str("allowed_ip=");
            request.push_str(net);
            request.push('\n');
        }
        request.push('\n');
        request
    }

    /// 200 000 allowed IPs on one peer through the UAPI socket (parse,
    /// apply, `get=1`): the old code, with a list searched per allowed IP,
    /// took 17 s in a release build; linear, it takes well under a second
    /// (a few in a debug build).
    #[test]
    fn uapi_set_of_200k_allowed_ips_is_linear_and_routes_to_the_peer() {
        let Some(served) = Served::start("uapi_set_of_200k_allowed_ips") else {
            return;
        };
        let (peer, other) = (Key([1; 32]), Key([2; 32]));
        // Another peer has a covering prefix: the more specific ones win.
        let cover = format!(
            "set=1\npublic_key={}\nallowed_ip=10.0.0.0/8\nallowed_ip=fd00::/16\n\n",
            other.to_hex()
        );
        assert_eq!(served.ask(&cover), "errno=0\n\n");
        let networks = many_networks(200_000);
        let request = set_request(&peer, &networks);
        let start = Instant::now();
        assert_eq!(served.ask(&request), "errno=0\n\n");
        let reply = served.ask("get=1\n\n");
        let took = start.elapsed();
        eprintln!("200 000 allowed IPs: set and get in {took:?}");
        assert!(took < Duration::from_secs(10), "set and get took {took:?}");
        assert_same(&allowed_ips_of(&reply, &peer), &networks);
        assert_eq!(allowed_ips_of(&reply, &other), ["10.0.0.0/8", "fd00::/16"]);
        // Numbers 99 999 and 100 000.
        assert_eq!(served.peer_for("fd00::1:869f"), Some(peer));
        assert_eq!(served.peer_for("10.1.134.160"), Some(peer));
        assert_eq!(served.peer_for("10.200.0.1"), Some(other));
        assert_eq!(served.peer_for("192.0.2.1"), None);

        // Half of them moved to the other peer, then that peer removed:
        // the moved ones are gone, the rest stay.
        let mut request = format!("set=1\npublic_key={}\n", other.to_hex());
        for net in networks.iter().step_by(2) {
            request.push_str(&format!("allowed_ip={net}\n"));
        }
        request.push_str(&format!(
            "\nset=1\npublic_key={}\nremove=true\n\n",
            other.to_hex()
        ));
        let start = Instant::now();
        let mut stream = UnixStream::connect(served.server.path()).expect("connect");
        stream.write_all(request.as_bytes()).expect("write");
        let mut replies = String::new();
        let mut buf = [0u8; 64];
        while replies.matches("errno=0\n\n").count() < 2 {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => replies.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        assert_eq!(replies, "errno=0\n\nerrno=0\n\n");
        let reply = served.ask("get=1\n\n");
        let took = start.elapsed();
        assert!(took < Duration::from_secs(10), "moving half took {took:?}");
        let rest: Vec<String> = networks.iter().skip(1).step_by(2).cloned().collect();
        assert_same(&allowed_ips_of(&reply, &peer), &rest);
        assert_eq!(served.peer_for("fd00::1:869f"), Some(peer), "odd: kept");
        assert_eq!(served.peer_for("10.1.134.160"), None, "even: moved, gone");
        assert!(!reply.contains(&other.to_hex()));
    }

    /// Release-build figures for BENCHMARKS-style reports: `SIZES=80000,1000000
    /// cargo test --release -p bgp4mesh-wireguard --lib uapi_set_timing --
    /// --ignored --nocapture`.
    #[test]
    #[ignore]
    fn uapi_set_timing() {
        let Some(served) = Served::start("uapi_set_timing") else {
            return;
        };
        let sizes = std::env::var("SIZES").unwrap_or_else(|_| "80000,1000000".into());
        for (k, n) in sizes.split(',').enumerate() {
            let n: u32 = n.trim().parse().expect("SIZES: numbers");
            let peer = Key([k as u8 + 1; 32]);
            let request = set_request(&peer, &many_networks(n));
            let start = Instant::now();
            assert_eq!(served.ask(&request), "errno=0\n\n");
            let set = start.elapsed();
            let start = Instant::now();
            let reply = served.ask("get=1\n\n");
            let get = start.elapsed();
            assert_eq!(allowed_ips_of(&reply, &peer).len(), n as usize);
            eprintln!("{n} allowed IPs: set {set:?}, get {get:?}");
            let remove = format!("set=1\npublic_key={}\nremove=true\n\n", peer.to_hex());
            assert_eq!(served.ask(&remove), "errno=0\n\n");
        }
    }
}
