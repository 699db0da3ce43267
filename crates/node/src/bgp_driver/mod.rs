//! The tokio driver of the sans-IO BGP speaker: one task owns the
//! [`Speaker`]; socket tasks feed it bytes and connection events through a
//! channel; it carries out the speaker's events and answers the control
//! socket.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use bgp4mesh_bgp::rib::NeighborId;
use bgp4mesh_bgp::rib::PathSource;
use bgp4mesh_bgp::session::ConnId;
use bgp4mesh_bgp::speaker::NextHopState;
use bgp4mesh_bgp::speaker::{Event, Level, RouteChange, Speaker, StaticKind};
use bgp4mesh_bgp::wire::Codec;
use bgp4mesh_kernel::{Resolution, Resolver, Target};
use ipnet::IpNet;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::bgp_reader::{MessageReader, Received};
use crate::config::{BgpConfig, Transport};
use crate::control::{Request, Response};
use crate::{show, transport};

/// What socket tasks report to the speaker's task.
enum Inbound {
    Accepted {
        stream: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
    },
    Connected {
        neighbor: NeighborId,
        attempt: u64,
        result: std::io::Result<TcpStream>,
    },
    /// What a connection's reader took from the socket.
    Received {
        conn: ConnId,
        received: Received,
    },
    Closed {
        conn: ConnId,
    },
    /// A connection's writer put this many bytes on the socket.
    Written {
        conn: ConnId,
        bytes: usize,
    },
    Resolved {
        addr: IpAddr,
        resolution: Resolution,
    },
    Interfaces {
        prefixes: Vec<IpNet>,
    },
    KernelRoutes {
        routes: Vec<(IpNet, Option<IpAddr>)>,
    },
    BfdPacket {
        from: IpAddr,
        bytes: Vec<u8>,
    },
    /// The kernel has what the neighbour sent up to its End-of-RIB.
    InKernelUpTo {
        neighbor: NeighborId,
    },
}

/// How long kernel change notifications are gathered before one rescan.
const KERNEL_CHANGE_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(20);

/// How often watched next hops are looked up again in the kernel.
const RESOLVE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

enum WriterCommand {
    Data(Vec<u8>),
    Close,
}

/// Reads (of up to 32 KiB) one connection may have queued for the speaker:
/// enough for the reader to decode the next while the speaker works on
/// this one. Decoded, a read takes about six times its bytes; with 8 of
/// them in flight a full table's flap peaked 5 MB higher, for no speed.
const READ_AHEAD: usize = 2;

struct Conn {
    neighbor: NeighborId,
    /// Reads the reader task may have in flight: it stops reading (and
    /// TCP pushes back on the peer) while the speaker is behind, instead
    /// of queueing a whole table in memory.
    credit: std::sync::Arc<tokio::sync::Semaphore>,
    /// Set once the session has negotiated: from then on the reader
    /// decodes what it reads.
    codec: std::sync::Arc<std::sync::OnceLock<Codec>>,
    writer: mpsc::UnboundedSender<WriterCommand>,
    reader: JoinHandle<()>,
    writer_task: JoinHandle<()>,
}

/// UPDATE bytes a neighbour may have queued for its socket before the
/// speaker holds the rest back as pending slots (4 bytes a prefix): a
/// slow peer, or a fast table to a peer on the same machine, never has a
/// full table encoded and waiting in memory.
const SEND_WINDOW: usize = 512 * 1024;

/// How long a closing connection may take to flush what was queued (a
/// NOTIFICATION) before it is torn down anyway: a peer that stopped reading
/// must not keep the socket and its queue alive.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

impl Conn {
    /// Flushes what is queued, then closes; aborts after [`CLOSE_GRACE`].
    fn close(self) {
        self.reader.abort();
        let _ = self.writer.send(WriterCommand::Close);
        let writer_task = self.writer_task;
        tokio::spawn(async move {
            tokio::time::sleep(CLOSE_GRACE).await;
            writer_task.abort();
        });
    }
}

/// A control request with the channel for its answer.
pub struct ControlCall {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
}

/// Where best-route changes go: the kernel, as a prefix and what it
/// should do (None: remove).
pub type RouteSink = Box<dyn FnMut(crate::kernel_sync::KernelCommand) + Send>;

pub struct BgpDriver {
    speaker: Speaker,
    config: BgpConfig,
    config_path: std::path::PathBuf,
    inbox_tx: mpsc::UnboundedSender<Inbound>,
    inbox: mpsc::UnboundedReceiver<Inbound>,
    conns: HashMap<ConnId, Conn>,
    connecting: HashMap<NeighborId, (u64, JoinHandle<()>)>,
    next_conn: ConnId,
    next_attempt: u64,
    listeners: Vec<JoinHandle<()>>,
    route_sink: Option<RouteSink>,
    /// Socket options by neighbour name (ids change across reloads).
    transports: HashMap<String, Transport>,
    /// The table whose foreign routes we learn, when `[kernel] learn`.
    learn_table: Option<u32>,
    /// What the kernel module says it installed.
    in_kernel: Option<crate::kernel_sync::InKernel>,
    /// BFD sessions with the neighbours that have `bfd = true`.
    bfd: bgp4mesh_bfd::Bfd,
    /// Senders for BFD control packets: IPv4, IPv6.
    bfd_tx: [Option<std::sync::Arc<tokio::net::UdpSocket>>; 2],
    /// The listening sockets, for TCP-MD5 keys set at reload.
    listener_sockets: Vec<std::sync::Arc<tokio::net::TcpListener>>,
    install_static: bool,
    /// Whether an eBGP session is up and has sent its routes (End-of-RIB),
    /// for the mesh agent of a border.
    upstream: Option<tokio::sync::watch::Sender<bool>>,
    /// Static routes wait until this is true (`hold_announcements_until`).
    announce_gate: Option<tokio::sync::watch::Receiver<bool>>,
    resolver: Option<Resolver>,
    /// Next hops the speaker watches, with their last resolution.
    next_hops: HashMap<IpAddr, Option<Resolution>>,
    /// `[mesh] export`: what the mesh is offered, and where it goes.
    mesh_export: Option<MeshExport>,
}

/// A border's BGP-learned prefixes for its mesh, sent to the agent.
struct MeshExport {
    set: bgp4mesh_bgp::export_set::ExportSet,
    tx: tokio::sync::watch::Sender<Vec<ipnet::IpNet>>,
    /// `set.left_out()` when we last warned about it.
    warned_left_out: usize,
}

/// What the kernel should do for a prefix after a best-path change.
fn kernel_target(
    speaker: &Speaker,
    change: &RouteChange,
    install_static: bool,
    next_hops: &HashMap<IpAddr, Option<Resolution>>,
) -> Option<Target> {
    let best = change.best.as_ref()?;
    match best.source {
        PathSource::Connected | PathSource::Kernel => None,
        PathSource::Static(id) if install_static => Some(match &speaker.static_route(id)?.kind {
            StaticKind::Blackhole => Target::Blackhole,
            StaticKind::Unreachable => Target::Unreachable,
            StaticKind::Via(gateway) => Target::Via(vec![*gateway]),
            StaticKind::Device(name) => Target::Device(name.clone()),
        }),
        PathSource::Static(_) => None,
        PathSource::Neighbor(_) => {
            let mut gateways: Vec<IpAddr> = Vec::new();
            for path in &change.multipath {
                let Some(next_hop) = path.attrs.next_hop.as_ref() else {
                    continue;
                };
                let address = bgp4mesh_bgp::rib::next_hop_address(next_hop);
                // A next hop that is not on a connected network is reached
                // through the gateway the kernel resolved it to.
                let hop = match next_hops
                    .get(&address)
                    .copied()
                    .flatten()
                    .and_then(|r| r.gateway)
                {
                    Some(gateway) => gateway,
                    None => match next_hop {
                        bgp4mesh_bgp::wire::NextHop::V4(a) => IpAddr::V4(*a),
                        bgp4mesh_bgp::wire::NextHop::V6 { global, .. } => IpAddr::V6(*global),
                    },
                };
                if !gateways.contains(&hop) {
                    gateways.push(hop);
                }
            }
            (!gateways.is_empty()).then_some(Target::Via(gateways))
        }
    }
}

fn transports_by_name(config: &BgpConfig) -> HashMap<String, Transport> {
    config
        .speaker
        .neighbors
        .iter()
        .zip(&config.transport)
        .map(|(n, t)| (n.name.clone(), t.clone()))
        .collect()
}

impl BgpDriver {
    /// Binds the listeners; fails (naming the address) when one cannot be.
    pub fn new(config: BgpConfig, config_path: &std::path::Path) -> anyhow::Result<BgpDriver> {
        let (inbox_tx, inbox) = mpsc::unbounded_channel();
        let now = Instant::now();
        let mut speaker = Speaker::new(config.speaker.clone(), now);
        speaker.set_send_window(Some(SEND_WINDOW));
        // Until a route sink is attached nothing consumes route changes.
        speaker.set_route_events(false);
        let mut listeners = Vec::new();
        let mut listener_sockets = Vec::new();
        for addr in &config.listen {
            let listener = std::sync::Arc::new(
                transport::listen(*addr)
                    .map_err(|e| anyhow::anyhow!("bgp.listen: cannot listen on {addr}: {e}"))?,
            );
            listener_sockets.push(listener.clone());
            // TCP-MD5 keys must be on the listening socket to accept.
            for (n, t) in config.speaker.neighbors.iter().zip(&config.transport) {
                if let Some(password) = &t.password
                    && n.address.is_ipv4() == addr.is_ipv4()
                {
                    transport::set_md5(&listener, n.address, password.as_bytes()).map_err(|e| {
                        anyhow::anyhow!("neighbor {}: cannot set TCP-MD5 key: {e}", n.name)
                    })?;
                }
            }
            let tx = inbox_tx.clone();
            listeners.push(tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, peer)) => {
                            let local = stream.local_addr().unwrap_or(peer);
                            if tx
                                .send(Inbound::Accepted {
                                    stream,
                                    peer,
                                    local,
                                })
                                .is_err()
                            {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(
                                "accept on {}: {e}",
                                listener
                                    .local_addr()
                                    .map(|a| a.to_string())
                                    .unwrap_or_default()
                            );
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    }
                }
            }));
        }
        for warning in &config.warnings {
            tracing::warn!("{warning}");
        }
        let transports = transports_by_name(&config);
        let mut driver = BgpDriver {
            speaker,
            config,
            config_path: config_path.to_path_buf(),
            inbox_tx,
            inbox,
            conns: HashMap::new(),
            connecting: HashMap::new(),
            next_conn: 1,
            next_attempt: 1,
            listeners,
            route_sink: None,
            transports,
            listener_sockets,
            bfd: bgp4mesh_bfd::Bfd::new(),
            in_kernel: None,
            learn_table: None,
            bfd_tx: [None, None],
            install_static: false,
            upstream: None,
            announce_gate: None,
            resolver: match Resolver::connect() {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!("next hops cannot be resolved (all taken as reachable): {e:#}");
                    None
                }
            },
            next_hops: HashMap::new(),
            mesh_export: None,
        };
        driver
            .sync_bfd(Instant::now())
            .map_err(|e| anyhow::anyhow!("bfd: {e}"))?;
        Ok(driver)
    }

    /// We restarted with the previous run's kernel routes kept: the
    /// speaker runs the graceful restart (RFC 4724) and says when it is
    /// over, and the kernel then drops what was not learnt again.
    pub fn begin_graceful_restart(&mut self, now: Instant) {
        self.speaker.begin_graceful_restart(now);
    }

    /// Makes the BFD sessions match the neighbours with `bfd = true`,
    /// opening the sockets when first needed.
    fn sync_bfd(&mut self, now: Instant) -> std::io::Result<()> {
        let sessions: Vec<(IpAddr, bgp4mesh_bfd::SessionConfig)> = self
            .config
            .speaker
            .neighbors
            .iter()
            .zip(&self.config.transport)
            .filter(|(_, t)| t.bfd)
            .map(|(n, t)| {
                let interval = std::time::Duration::from_millis(t.bfd_timers.0);
                let timers = bgp4mesh_bfd::SessionConfig {
                    desired_min_tx: interval,
                    required_min_rx: interval,
                    detect_mult: t.bfd_timers.1,
                };
                (n.address, timers)
            })
            .collect();
        let wanted: Vec<IpAddr> = sessions.iter().map(|(a, _)| *a).collect();
        for ipv6 in [false, true] {
            let slot = usize::from(ipv6);
            if self.bfd_tx[slot].is_none() && wanted.iter().any(|a| a.is_ipv6() == ipv6) {
                let receiver = transport::bfd_receiver(ipv6)?;
                let tx = self.inbox_tx.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 512];
                    while let Ok((n, from)) = receiver.recv_from(&mut buf).await {
                        let from = canonical(from.ip());
                        if tx
                            .send(Inbound::BfdPacket {
                                from,
                                bytes: buf[..n].to_vec(),
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                });
                self.bfd_tx[slot] = Some(std::sync::Arc::new(transport::bfd_sender(ipv6)?));
            }
        }
        for (peer, timers) in sessions {
            self.bfd.add(now, peer, timers);
        }
        let gone: Vec<IpAddr> = self
            .bfd
            .sessions()
            .map(|(p, _)| *p)
            .filter(|p| !wanted.contains(p))
            .collect();
        for peer in gone {
            if let Some(bye) = self.bfd.remove(peer) {
                self.bfd_send(peer, &bye);
            }
        }
        Ok(())
    }

    fn bfd_send(&self, peer: IpAddr, bytes: &[u8]) {
        if let Some(socket) = &self.bfd_tx[usize::from(peer.is_ipv6())] {
            let _ = socket.try_send_to(bytes, SocketAddr::new(peer, transport::BFD_PORT));
        }
    }

    /// Sends the BFD packets due and acts on state changes: a session that
    /// leaves Up takes its BGP session down at once.
    fn bfd_io(&mut self, now: Instant) {
        self.bfd.handle_timeout(now);
        for (peer, bytes) in self.bfd.poll_transmit(now) {
            self.bfd_send(peer, &bytes);
        }
        while let Some(event) = self.bfd.poll_event() {
            tracing::info!(
                "BFD {}: {} -> {} ({})",
                event.peer,
                event.from,
                event.to,
                event.diag
            );
            if event.from == bgp4mesh_bfd::State::Up
                && let Some(id) = self.speaker.neighbor_by_address(event.peer)
            {
                self.speaker.bfd_down(now, id);
            }
        }
    }

    /// Sends every best-route change to `sink`; static routes too when
    /// `install_static`.
    pub fn set_route_sink(
        &mut self,
        sink: RouteSink,
        install_static: bool,
        in_kernel: Option<crate::kernel_sync::InKernel>,
    ) {
        self.route_sink = Some(sink);
        self.speaker.set_route_events(true);
        self.install_static = install_static;
        self.in_kernel = in_kernel;
    }

    /// Runs until `control` closes or a `Shutdown` request arrives.
    pub async fn run(mut self, mut control: mpsc::Receiver<ControlCall>) {
        self.speaker.start(Instant::now());
        let mut resolve_tick = tokio::time::interval(RESOLVE_EVERY);
        resolve_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Link, address and route changes nudge a rescan (debounced), so a
        // next hop behind a downed interface goes within milliseconds.
        let mut kernel_changes = match bgp4mesh_kernel::watch_changes() {
            Ok(rx) => Some(rx),
            Err(e) => {
                tracing::warn!(
                    "no netlink change notifications, next hops rescanned every {RESOLVE_EVERY:?}: {e:#}"
                );
                None
            }
        };
        let mut rescan_at: Option<tokio::time::Instant> = None;
        loop {
            self.bfd_io(Instant::now());
            self.carry_out_events();
            let deadline = [self.speaker.poll_timeout(), self.bfd.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            let sleep = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                    None => std::future::pending().await,
                }
            };
            // Biased: input first, so that a KEEPALIVE waiting in the inbox
            // is read before a hold timer that is due at the same time.
            tokio::select! {
                biased;
                Some(inbound) = self.inbox.recv() => self.on_inbound(inbound),
                call = control.recv() => {
                    let Some(call) = call else { break };
                    if matches!(call.request, Request::Shutdown) {
                        self.shutdown().await;
                        let _ = call.reply.send(Response::ok_empty());
                        break;
                    }
                    let response = self.on_control(call.request);
                    let _ = call.reply.send(response);
                }
                _ = sleep => self.speaker.handle_timeout(Instant::now()),
                _ = resolve_tick.tick() => self.rescan(),
                Some(()) = async {
                    match kernel_changes.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    rescan_at.get_or_insert(tokio::time::Instant::now() + KERNEL_CHANGE_DEBOUNCE);
                }
                _ = async {
                    match rescan_at {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {
                    rescan_at = None;
                    self.rescan();
                }
                open = async {
                    match self.announce_gate.as_mut() {
                        Some(gate) => gate.wait_for(|open| *open).await.is_ok(),
                        None => std::future::pending().await,
                    }
                } => {
                    // Opens once, for good (or the agent is gone: announce).
                    self.announce_gate = None;
                    if open {
                        tracing::info!("the mesh is ready for traffic: announcing our routes");
                    }
                    self.speaker.release_origination(Instant::now());
                }
            }
        }
        for l in &self.listeners {
            l.abort();
        }
    }

    /// Closes every session with Cease / Administrative Shutdown and lets
    /// the NOTIFICATIONs go out.
    async fn shutdown(&mut self) {
        let now = Instant::now();
        let ids: Vec<NeighborId> = self.speaker.neighbor_ids().collect();
        for id in ids {
            self.speaker.disable(now, id, "bgp4mesh shutting down");
        }
        self.carry_out_events();
        for (_, c) in self.conns.drain() {
            c.close();
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    fn transport(&self, neighbor: NeighborId) -> Option<&Transport> {
        self.transports.get(self.speaker.neighbor_name(neighbor))
    }

    /// Re-reads the config file and applies the difference.
    fn reload(&mut self, now: Instant) -> Result<(), String> {
        let loaded =
            crate::config::NodeConfig::load(&self.config_path).map_err(|e| format!("{e:#}"))?;
        let Some(bgp) = loaded.bgp else {
            return Err("the new config has no [bgp] section; keeping the running one".into());
        };
        if bgp.listen != self.config.listen {
            tracing::warn!("bgp.listen changed: takes effect at the next start");
        }
        for warning in &bgp.warnings {
            tracing::warn!("{warning}");
        }
        let old = std::mem::replace(&mut self.transports, transports_by_name(&bgp));
        // TCP-MD5 keys of the listeners follow the config (an empty key
        // removes one).
        for n in &bgp.speaker.neighbors {
            let (was, now_key) = (
                old.get(&n.name).and_then(|t| t.password.clone()),
                self.transports
                    .get(&n.name)
                    .and_then(|t| t.password.clone()),
            );
            if was != now_key {
                for listener in &self.listener_sockets {
                    let family_matches = listener
                        .local_addr()
                        .is_ok_and(|a| a.is_ipv4() == n.address.is_ipv4());
                    if family_matches
                        && let Err(e) = transport::set_md5(
                            &**listener,
                            n.address,
                            now_key.as_deref().unwrap_or("").as_bytes(),
                        )
                    {
                        tracing::warn!(
                            "neighbor {}: cannot set TCP-MD5 key on the listener: {e}",
                            n.name
                        );
                    }
                }
            }
        }
        self.speaker.reconfigure(now, bgp.speaker.clone());
        // Changed socket options take effect on a new connection.
        for (name, t) in &self.transports {
            if old.get(name).is_some_and(|o| o != t)
                && let Some(id) = self.speaker.neighbor_by_name(name)
            {
                self.speaker.restart(now, id, "transport settings changed");
            }
        }
        self.config = bgp;
        match (&mut self.mesh_export, self.config.mesh_export.clone()) {
            // Neighbour numbers may have changed with the policy: start over.
            (Some(export), Some((policy, limit))) => {
                export.set.rebuild(&self.speaker, policy, limit);
                export.warned_left_out = 0;
            }
            (Some(export), None) => {
                let none = std::sync::Arc::new(bgp4mesh_bgp::policy::Policy::reject_all());
                export.set.rebuild(&self.speaker, none, 1);
                tracing::warn!(
                    "mesh.export removed: the mesh is offered nothing until the next start"
                );
            }
            (None, Some(_)) => {
                tracing::warn!("mesh.export added: takes effect at the next start");
            }
            (None, None) => {}
        }
        self.send_mesh_export();
        if let Err(e) = self.sync_bfd(now) {
            tracing::warn!("bfd: {e}");
        }
        tracing::info!("configuration reloaded from {}", self.config_path.display());
        Ok(())
    }

    fn on_inbound(&mut self, inbound: Inbound) {
        let now = Instant::now();
        match inbound {
            Inbound::Accepted {
                stream,
                peer,
                local,
            } => {
                let peer_ip = canonical(peer.ip());
                let Some(neighbor) = self.speaker.neighbor_by_address(peer_ip) else {
                    tracing::info!("refused BGP connection from {peer}: not a configured neighbor");
                    return;
                };
                if let Some(t) = self.transport(neighbor).cloned()
                    && let Err(e) = transport::apply_options(SockRef::from(&stream), peer_ip, &t)
                {
                    tracing::warn!(
                        "{}: socket options on accepted connection: {e}",
                        self.speaker.neighbor_name(neighbor)
                    );
                }
                let _ = stream.set_nodelay(true);
                let conn = self.add_conn(neighbor, stream);
                self.speaker
                    .tcp_connected(now, neighbor, conn, false, canonical(local.ip()));
            }
            Inbound::Connected {
                neighbor,
                attempt,
                result,
            } => {
                if self.connecting.get(&neighbor).map(|(a, _)| *a) != Some(attempt) {
                    return; // a newer attempt replaced this one
                }
                self.connecting.remove(&neighbor);
                match result {
                    // A neighbour removed by a reload meanwhile: just drop it.
                    Ok(_) if self.speaker.neighbor(neighbor).is_none() => {}
                    Ok(stream) => match stream.local_addr() {
                        Ok(local) => {
                            let conn = self.add_conn(neighbor, stream);
                            self.speaker.tcp_connected(
                                now,
                                neighbor,
                                conn,
                                true,
                                canonical(local.ip()),
                            );
                        }
                        Err(e) => self
                            .speaker
                            .tcp_connect_failed(now, neighbor, &e.to_string()),
                    },
                    Err(e) => self
                        .speaker
                        .tcp_connect_failed(now, neighbor, &e.to_string()),
                }
            }
            Inbound::Received { conn, received } => {
                if let Some(c) = self.conns.get(&conn) {
                    let neighbor = c.neighbor;
                    c.credit.add_permits(1);
                    match received {
                        Received::Bytes(data) => {
                            self.speaker.received(now, neighbor, conn, &data);
                            // The OPENs may be through: hand the reader the
                            // codec, so it decodes the table off this task.
                            if let Some(c) = self.conns.get(&conn)
                                && c.codec.get().is_none()
                                && let Some(codec) = self.speaker.codec(neighbor, conn)
                            {
                                let _ = c.codec.set(codec);
                            }
                        }
                        Received::Messages(messages) => {
                            self.speaker.received_decoded(now, neighbor, conn, messages);
                        }
                    }
                }
            }
            Inbound::Written { conn, bytes } => {
                if let Some(c) = self.conns.get(&conn) {
                    self.speaker.written(now, c.neighbor, conn, bytes);
                }
            }
            Inbound::Closed { conn } => {
                if let Some(c) = self.conns.remove(&conn) {
                    self.speaker.tcp_closed(now, c.neighbor, conn);
                }
            }
            Inbound::Resolved { addr, resolution } => self.on_resolved(now, addr, resolution),
            Inbound::Interfaces { prefixes } => self.speaker.set_connected(now, &prefixes),
            Inbound::KernelRoutes { routes } => self.speaker.set_kernel_routes(now, &routes),
            Inbound::InKernelUpTo { neighbor } => self.speaker.end_of_rib_installed(neighbor),
            Inbound::BfdPacket { from, bytes } => {
                if let Err(why) = self.bfd.receive(now, from, &bytes) {
                    tracing::debug!("BFD packet from {from} discarded: {why}");
                }
            }
        }
    }

    /// Reads our interfaces' networks in the background, when configured
    /// to originate them (`bgp.connected`).
    fn scan_interfaces(&self) {
        let (Some(resolver), false) = (self.resolver.clone(), self.config.connected.is_empty())
        else {
            return;
        };
        let wanted = self.config.connected.clone();
        let tx = self.inbox_tx.clone();
        tokio::spawn(async move {
            match resolver.connected(&wanted).await {
                Ok(list) => {
                    let prefixes = list.into_iter().map(|(p, _)| p).collect();
                    let _ = tx.send(Inbound::Interfaces { prefixes });
                }
                Err(e) => tracing::warn!("cannot read interface addresses: {e:#}"),
            }
        });
    }

    /// Looks every watched next hop up again, our interfaces' networks, and
    /// the routes we learn from the kernel.
    fn rescan(&self) {
        let all: Vec<IpAddr> = self.next_hops.keys().copied().collect();
        self.resolve(all);
        self.scan_interfaces();
        if let (Some(table), Some(resolver)) = (self.learn_table, self.resolver.clone()) {
            let tx = self.inbox_tx.clone();
            tokio::spawn(async move {
                match resolver.learn_routes(table).await {
                    Ok(routes) => {
                        let _ = tx.send(Inbound::KernelRoutes { routes });
                    }
                    Err(e) => tracing::warn!("cannot learn kernel routes: {e:#}"),
                }
            });
        }
    }

    /// Learn the routes others put in this table (`[kernel] learn`).
    pub fn set_kernel_learning(&mut self, table: u32) {
        self.learn_table = Some(table);
    }

    /// Looks next hops up in the background; answers come as Resolved.
    fn resolve(&self, addrs: Vec<IpAddr>) {
        let Some(resolver) = self.resolver.clone() else {
            return;
        };
        if addrs.is_empty() {
            return;
        }
        let tx = self.inbox_tx.clone();
        tokio::spawn(async move {
            for addr in addrs {
                let resolution = resolver.resolve(addr).await;
                if tx.send(Inbound::Resolved { addr, resolution }).is_err() {
                    return;
                }
            }
        });
    }

    fn on_resolved(&mut self, now: Instant, addr: IpAddr, resolution: Resolution) {
        let Some(last) = self.next_hops.get_mut(&addr) else {
            return;
        };
        if *last == Some(resolution) {
            return;
        }
        let old_gateway = last.and_then(|l| l.gateway);
        *last = Some(resolution);
        self.speaker.set_next_hop(
            now,
            addr,
            NextHopState {
                reachable: resolution.reachable,
                cost: resolution.metric,
            },
        );
        if old_gateway != resolution.gateway {
            // Routes through this next hop go in the kernel via the new
            // immediate gateway, though BGP's choice did not change.
            for prefix in self.speaker.prefixes_via(addr) {
                let Some(entry) = self.speaker.rib().get(&prefix) else {
                    continue;
                };
                let change = RouteChange {
                    prefix,
                    best: entry.best().cloned(),
                    multipath: entry.multipath().to_vec(),
                };
                let target =
                    kernel_target(&self.speaker, &change, self.install_static, &self.next_hops);
                if let Some(sink) = self.route_sink.as_mut() {
                    sink(crate::kernel_sync::KernelCommand::Route(prefix, target));
                }
            }
        }
    }

    fn add_conn(&mut self, neighbor: NeighborId, stream: TcpStream) -> ConnId {
        let conn = self.next_conn;
        self.next_conn += 1;
        let (mut read, mut write) = stream.into_split();
        let (writer, mut commands) = mpsc::unbounded_channel::<WriterCommand>();
        let tx = self.inbox_tx.clone();
        let credit = std::sync::Arc::new(tokio::sync::Semaphore::new(READ_AHEAD));
        let reader_credit = credit.clone();
        let codec = std::sync::Arc::new(std::sync::OnceLock::new());
        let reader_codec = codec.clone();
        let reader = tokio::spawn(async move {
            let mut messages = MessageReader::default();
            loop {
                match reader_credit.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => return,
                }
                loop {
                    match read.read(messages.space()).await {
                        Ok(0) | Err(_) => {
                            let _ = tx.send(Inbound::Closed { conn });
                            return;
                        }
                        Ok(n) => messages.filled(n),
                    }
                    // Nothing whole yet: read on, on the same credit.
                    if let Some(received) = messages.take(reader_codec.get()) {
                        if tx.send(Inbound::Received { conn, received }).is_err() {
                            return;
                        }
                        break;
                    }
                }
            }
        });
        let tx = self.inbox_tx.clone();
        let writer_task = tokio::spawn(async move {
            let mut written = 0;
            while let Some(command) = commands.recv().await {
                match command {
                    WriterCommand::Data(bytes) => {
                        if write.write_all(&bytes).await.is_err() {
                            let _ = tx.send(Inbound::Closed { conn });
                            return;
                        }
                        // Reported in sums: the speaker's send window
                        // opens as the socket takes what it was given.
                        written += bytes.len();
                        if written >= SEND_WINDOW / 4 || commands.is_empty() {
                            let bytes = std::mem::take(&mut written);
                            let _ = tx.send(Inbound::Written { conn, bytes });
                        }
                    }
                    WriterCommand::Close => {
                        let _ = write.shutdown().await;
                        return;
                    }
                }
            }
        });
        self.conns.insert(
            conn,
            Conn {
                neighbor,
                credit,
                codec,
                writer,
                reader,
                writer_task,
            },
        );
        conn
    }

    /// Tells the mesh agent whether an upstream (eBGP) session is up.
    /// Holds our static routes (a border's block) back until `gate` is
    /// true: the agent opens it when the controller has made this border
    /// an exit the nodes use, so the ISP sends return traffic our way in the
    /// same moment the nodes send theirs.
    pub fn hold_announcements_until(&mut self, gate: tokio::sync::watch::Receiver<bool>) {
        self.speaker.hold_origination();
        self.announce_gate = Some(gate);
    }

    /// The BGP-learned prefixes the `[mesh] export` policy takes, kept up
    /// to date for the mesh agent; None without `[mesh] export`.
    pub fn export_to_mesh(&mut self) -> Option<tokio::sync::watch::Receiver<Vec<ipnet::IpNet>>> {
        let (policy, limit) = self.config.mesh_export.clone()?;
        let (tx, rx) = tokio::sync::watch::channel(Vec::new());
        let mut set = bgp4mesh_bgp::export_set::ExportSet::new(policy.clone(), limit);
        set.rebuild(&self.speaker, policy, limit);
        self.speaker.set_route_events(true);
        self.mesh_export = Some(MeshExport {
            set,
            tx,
            warned_left_out: 0,
        });
        Some(rx)
    }

    /// Hands a changed mesh export to the agent.
    fn send_mesh_export(&mut self) {
        let Some(export) = self.mesh_export.as_mut() else {
            return;
        };
        let left_out = export.set.left_out();
        if left_out > export.warned_left_out {
            tracing::warn!(
                "mesh.export: the policy takes more than mesh.export_limit = {}; prefixes were left out {left_out} times (narrow the policy or raise the limit, then reload)",
                export.set.limit()
            );
            export.warned_left_out = left_out.max(export.warned_left_out * 2);
        }
        if let Some(prefixes) = export.set.take_changed() {
            tracing::debug!(prefixes = prefixes.len(), "mesh export changed");
            export.tx.send_replace(prefixes);
        }
    }

    /// An upstream counts once its session is up and its routes are in
    /// (End-of-RIB): a border is not used for egress before it can route.
    pub fn watch_upstream(&mut self) -> tokio::sync::watch::Receiver<bool> {
        let (tx, rx) = tokio::sync::watch::channel(self.speaker.upstream_ready());
        self.upstream = Some(tx);
        rx
    }

    fn carry_out_events(&mut self) {
        self.carry_out_queued_events();
        self.send_mesh_export();
    }

    fn carry_out_queued_events(&mut self) {
        while let Some(event) = self.speaker.poll_event() {
            match event {
                Event::Connect { neighbor } => self.connect(neighbor),
                Event::Send { conn, bytes, .. } => {
                    if let Some(c) = self.conns.get(&conn) {
                        let _ = c.writer.send(WriterCommand::Data(bytes));
                    }
                }
                Event::Close { conn, .. } => {
                    if let Some(c) = self.conns.remove(&conn) {
                        c.close();
                    }
                }
                Event::EndOfRib { neighbor, .. } => {
                    // An upstream counts as up once what it sent before its
                    // End-of-RIB is in the kernel: a node that moves its
                    // Internet traffic to this border on that word must find
                    // the default route there.
                    match self.route_sink.as_mut() {
                        Some(sink) => {
                            let (done, applied) = tokio::sync::oneshot::channel();
                            sink(crate::kernel_sync::KernelCommand::Barrier(done));
                            let tx = self.inbox_tx.clone();
                            tokio::spawn(async move {
                                if applied.await.is_ok() {
                                    let _ = tx.send(Inbound::InKernelUpTo { neighbor });
                                }
                            });
                        }
                        None => self.speaker.end_of_rib_installed(neighbor),
                    }
                }
                Event::UpstreamReady(up) => {
                    if let Some(tx) = &self.upstream {
                        tx.send_if_modified(|v| std::mem::replace(v, up) != up);
                    }
                }
                Event::GracefulRestartOver(why) => {
                    // The kernel drops what was not learnt again.
                    tracing::info!("graceful restart over ({why})");
                    if let Some(sink) = self.route_sink.as_mut() {
                        sink(crate::kernel_sync::KernelCommand::FlushStale);
                    }
                }
                Event::WatchNextHop(addr) => {
                    self.next_hops.insert(addr, None);
                    self.resolve(vec![addr]);
                }
                Event::UnwatchNextHop(addr) => {
                    self.next_hops.remove(&addr);
                }
                Event::Route(change) => {
                    if let Some(export) = self.mesh_export.as_mut() {
                        export.set.route_changed(&self.speaker, &change);
                    }
                    let target =
                        kernel_target(&self.speaker, &change, self.install_static, &self.next_hops);
                    if let Some(sink) = self.route_sink.as_mut() {
                        sink(crate::kernel_sync::KernelCommand::Route(
                            change.prefix,
                            target,
                        ));
                    }
                }
                Event::Log {
                    level: Level::Info,
                    message,
                    ..
                } => tracing::info!("{message}"),
                Event::Log {
                    level: Level::Warn,
                    message,
                    ..
                } => tracing::warn!("{message}"),
            }
        }
    }

    fn connect(&mut self, neighbor: NeighborId) {
        let Some(status) = self.speaker.neighbor(neighbor) else {
            return;
        };
        let Some(t) = self.transport(neighbor).cloned() else {
            return;
        };
        let peer = SocketAddr::new(status.config.address, t.port);
        let attempt = self.next_attempt;
        self.next_attempt += 1;
        let tx = self.inbox_tx.clone();
        let task = tokio::spawn(async move {
            let result = transport::connect(peer, &t).await;
            let _ = tx.send(Inbound::Connected {
                neighbor,
                attempt,
                result,
            });
        });
        if let Some((_, old)) = self.connecting.insert(neighbor, (attempt, task)) {
            old.abort();
        }
    }

    fn on_control(&mut self, request: Request) -> Response {
        let now = Instant::now();
        let neighbor = |speaker: &Speaker, name: &str| {
            speaker
                .neighbor_by_name(name)
                .ok_or_else(|| format!("no neighbor named {name:?}"))
        };
        let result: Result<serde_json::Value, String> = match request {
            Request::ShowProtocols { name } => show::protocols(&self.speaker, name.as_deref(), now),
            Request::ShowRoute { prefix, export } => match export {
                Some(name) => neighbor(&self.speaker, &name)
                    .map(|id| show::exported(&self.speaker, id, prefix, now)),
                None => Ok(show::routes(
                    &self.speaker,
                    prefix,
                    now,
                    self.in_kernel.as_ref(),
                )),
            },
            Request::Enable { name } => neighbor(&self.speaker, &name).map(|id| {
                self.speaker.enable(now, id);
                serde_json::Value::Null
            }),
            Request::Disable { name, message } => neighbor(&self.speaker, &name).map(|id| {
                self.speaker
                    .disable(now, id, message.as_deref().unwrap_or(""));
                serde_json::Value::Null
            }),
            Request::Restart { name } => neighbor(&self.speaker, &name).map(|id| {
                self.speaker.restart(now, id, "restarted by the operator");
                serde_json::Value::Null
            }),
            Request::Refresh { name } => neighbor(&self.speaker, &name).map(|id| {
                self.speaker.refresh(now, id);
                serde_json::Value::Null
            }),
            Request::Reload => self.reload(now).map(|()| serde_json::Value::Null),
            Request::ShowBfd => Ok(show::bfd_sessions(&self.bfd, &self.speaker, now)),
            Request::Shutdown => Ok(serde_json::Value::Null),
        };
        match result {
            Ok(data) => Response::ok(data),
            Err(error) => Response::error(error),
        }
    }
}

/// IPv4-mapped IPv6 addresses (from a dual-stack socket) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}
