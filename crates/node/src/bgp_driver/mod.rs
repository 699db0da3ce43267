//! The tokio driver of the sans-IO BGP speaker (and of BFD beside it).
//!
//! One task ([`BgpDriver::run`]) owns the [`Speaker`] and the BFD
//! sessions. Everything else is a small task that does one piece of IO
//! and reports to it through one channel, the inbox; the BGP task feeds
//! what comes in to the speaker with the time, carries out the speaker's
//! events, and sleeps until the earliest `poll_timeout`.
//!
//! ```text
//!  IO tasks, one per job             inbox (one channel)      the BGP task: run()
//!  ─────────────────────             ───────────────────      ───────────────────
//!  listeners ............. Accepted ────┐
//!  connection attempts ... Connected ───┤
//!  a reader per conn ..... Received ────┤                    ┌───────────────────────┐
//!  a writer per conn ..... Written ─────┼───────────────────▶│ Speaker  (BGP)        │
//!  BFD receivers ......... BfdPacket ───┤ read before timers │ Bfd      (BFD)        │
//!  resolver lookups ...... Resolved, ───┤                    │ fed events and `now`, │
//!                          Interfaces,  │                    │ asleep until the      │
//!                          KernelRoutes │                    │ earliest poll_timeout │
//!  kernel barriers ....... InKernelUpTo ┘                    └───────────┬───────────┘
//!  control socket ........ ControlCall (its own channel) ───────────────▶│ commands, reload
//!                                                                        │
//!  the speaker's events, carried out by                                  ▼
//!    Connect .............. starting a connection attempt ........ connections
//!    Send, Close .......... a connection's writer ................ connections
//!    Route ................ the RouteSink (kernel_sync task) ..... kernel
//!                           and the mesh export set .............. mesh
//!    (Un)WatchNextHop ..... resolver lookups ..................... kernel
//!    EndOfRib ............. a kernel barrier, answered with
//!                           InKernelUpTo → end_of_rib_installed .. kernel
//!    GracefulRestartOver .. FlushStale to the kernel ............. kernel
//!    UpstreamReady ........ the agent's watch channel ............ mesh
//! ```
//!
//! By concern: `connections` (TCP: listeners, attempts, reader and
//! writer tasks), `bfd` (UDP sockets and sessions), `kernel` (the
//! route sink and the kernel lookups), `mesh` (what a border tells its
//! mesh agent), `reload` (a new config file), `commands` (control
//! socket requests).

mod bfd;
mod commands;
mod connections;
mod kernel;
mod mesh;
mod reload;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bgp4mesh_bgp::rib::NeighborId;
use bgp4mesh_bgp::session::ConnId;
use bgp4mesh_bgp::speaker::{Event, Level, Speaker};
use bgp4mesh_kernel::Resolution;
use ipnet::IpNet;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::bgp_reader::Received;
use crate::config::BgpConfig;
use crate::control::{ControlCall, Request, Response};

pub use kernel::RouteSink;

/// What socket and lookup tasks report to the BGP task.
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

/// Where the IO tasks send what they have for the BGP task.
type Inbox = mpsc::UnboundedSender<Inbound>;

/// How long kernel change notifications are gathered before one rescan.
const KERNEL_CHANGE_DEBOUNCE: Duration = Duration::from_millis(20);

/// How often watched next hops are looked up again in the kernel.
const RESOLVE_EVERY: Duration = Duration::from_secs(5);

pub struct BgpDriver {
    speaker: Speaker,
    config: BgpConfig,
    config_path: std::path::PathBuf,
    /// What the IO tasks report (each part holds a sender).
    inbox: mpsc::UnboundedReceiver<Inbound>,
    connections: connections::Connections,
    bfd: bfd::BfdLink,
    kernel: kernel::KernelLink,
    mesh: mesh::MeshLink,
}

impl BgpDriver {
    /// Binds the listeners; fails (naming the address) when one cannot be.
    pub fn new(config: BgpConfig, config_path: &std::path::Path) -> anyhow::Result<BgpDriver> {
        let (inbox_tx, inbox) = mpsc::unbounded_channel();
        let now = Instant::now();
        let mut speaker = Speaker::new(config.speaker.clone(), now);
        speaker.set_send_window(Some(connections::SEND_WINDOW));
        // Until a route sink is attached nothing consumes route changes.
        speaker.set_route_events(false);
        let connections = connections::Connections::bind(&config, &inbox_tx)?;
        for warning in &config.warnings {
            tracing::warn!("{warning}");
        }
        let mut driver = BgpDriver {
            speaker,
            config_path: config_path.to_path_buf(),
            connections,
            bfd: bfd::BfdLink::new(&inbox_tx),
            kernel: kernel::KernelLink::new(&inbox_tx),
            mesh: mesh::MeshLink::default(),
            config,
            inbox,
        };
        driver
            .bfd
            .sync(Instant::now(), &driver.config)
            .map_err(|e| anyhow::anyhow!("bfd: {e}"))?;
        Ok(driver)
    }

    /// We restarted with the previous run's kernel routes kept: the
    /// speaker runs the graceful restart (RFC 4724) and says when it is
    /// over, and the kernel then drops what was not learnt again.
    pub fn begin_graceful_restart(&mut self, now: Instant) {
        self.speaker.begin_graceful_restart(now);
    }

    /// Sends every best-route change to `sink`; static routes too when
    /// `install_static`.
    pub fn set_route_sink(
        &mut self,
        sink: RouteSink,
        install_static: bool,
        in_kernel: Option<crate::kernel_sync::InKernel>,
    ) {
        self.kernel.set_sink(sink, install_static, in_kernel);
        self.speaker.set_route_events(true);
    }

    /// Learn the routes others put in this table (`[kernel] learn`).
    pub fn set_kernel_learning(&mut self, table: u32) {
        self.kernel.set_learn_table(table);
    }

    /// Holds our static routes (a border's block) back while `gate` is
    /// false: the agent opens it when the controller has made this border
    /// an exit the nodes use, so the ISP sends return traffic our way in the
    /// same moment the nodes send theirs, and closes it again when the mesh
    /// stops carrying traffic, which withdraws them (the ISP then sends the
    /// traffic to another border). The gate is followed for as long as the
    /// agent holds its sender; once the sender is dropped, the routes are
    /// announced for good.
    pub fn hold_announcements_until(&mut self, gate: tokio::sync::watch::Receiver<bool>) {
        self.speaker.hold_origination(Instant::now());
        self.mesh.announce_gate = Some(gate);
    }

    /// The BGP-learned prefixes the `[mesh] export` policy takes, kept up
    /// to date for the mesh agent; None without `[mesh] export`.
    pub fn export_to_mesh(&mut self) -> Option<tokio::sync::watch::Receiver<Vec<IpNet>>> {
        let (policy, limit) = self.config.mesh_export.clone()?;
        let rx = self.mesh.start_export(&self.speaker, policy, limit);
        self.speaker.set_route_events(true);
        Some(rx)
    }

    /// Tells the mesh agent whether an upstream (eBGP) session is up. An
    /// upstream counts once its session is up and its routes are in
    /// (End-of-RIB): a border is not used for egress before it can route.
    pub fn watch_upstream(
        &mut self,
    ) -> tokio::sync::watch::Receiver<bgp4mesh_api::UpstreamFamilies> {
        self.mesh.watch_upstream(self.speaker.upstream_ready())
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
            self.bfd.io(Instant::now(), &mut self.speaker);
            self.carry_out_events();
            let held = self.speaker.origination_held();
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
                gate = self.mesh.announce_gate_moved(held) => self.follow_announce_gate(gate),
            }
        }
        self.connections.stop_listening();
    }

    /// The announcement gate asks for something else than the speaker
    /// does: `Some(open)`, or None once the agent dropped its sender
    /// (announce, and stop following).
    fn follow_announce_gate(&mut self, gate: Option<bool>) {
        let now = Instant::now();
        match gate {
            Some(true) => {
                tracing::info!("the mesh is ready for traffic: announcing our routes");
                self.speaker.release_origination(now);
            }
            Some(false) => {
                tracing::info!("the mesh is not carrying traffic: withdrawing our routes");
                self.speaker.hold_origination(now);
            }
            None => {
                self.mesh.announce_gate = None;
                if self.speaker.origination_held() {
                    tracing::info!("the mesh agent is gone: announcing our routes");
                    self.speaker.release_origination(now);
                }
            }
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
        self.connections.close_all();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// Looks the kernel state BGP depends on up again.
    fn rescan(&self) {
        self.kernel.rescan(&self.config.connected);
    }

    fn carry_out_events(&mut self) {
        while let Some(event) = self.speaker.poll_event() {
            self.carry_out(event);
        }
        self.mesh.send_export();
    }

    /// Does what one of the speaker's events asks for.
    fn carry_out(&mut self, event: Event) {
        match event {
            Event::Connect { neighbor } => self.connections.connect(&self.speaker, neighbor),
            Event::Send { conn, bytes, .. } => self.connections.send(conn, bytes),
            Event::Close { conn, .. } => self.connections.close(conn),
            Event::EndOfRib { neighbor, .. } => {
                // An upstream counts as up once what it sent before its
                // End-of-RIB is in the kernel: a node that moves its
                // Internet traffic to this border on that word must find
                // the default route there.
                self.kernel.end_of_rib(&mut self.speaker, neighbor);
            }
            Event::UpstreamReady(up) => self.mesh.upstream_ready(up),
            Event::GracefulRestartOver(why) => {
                tracing::info!("graceful restart over ({why})");
                self.kernel.flush_stale();
            }
            Event::WatchNextHop(addr) => self.kernel.watch(addr),
            Event::UnwatchNextHop(addr) => self.kernel.unwatch(addr),
            Event::Route(change) => {
                self.mesh.route_changed(&self.speaker, &change);
                self.kernel
                    .route_changed(&self.speaker, &change, self.connections.transports());
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

    fn on_inbound(&mut self, inbound: Inbound) {
        let now = Instant::now();
        let speaker = &mut self.speaker;
        match inbound {
            Inbound::Accepted {
                stream,
                peer,
                local,
            } => self.connections.accepted(speaker, now, stream, peer, local),
            Inbound::Connected {
                neighbor,
                attempt,
                result,
            } => self
                .connections
                .connected(speaker, now, neighbor, attempt, result),
            Inbound::Received { conn, received } => {
                self.connections.received(speaker, now, conn, received)
            }
            Inbound::Written { conn, bytes } => self.connections.written(speaker, now, conn, bytes),
            Inbound::Closed { conn } => self.connections.closed(speaker, now, conn),
            Inbound::Resolved { addr, resolution } => self.kernel.resolved(
                speaker,
                now,
                addr,
                resolution,
                self.connections.transports(),
            ),
            Inbound::Interfaces { prefixes } => speaker.set_connected(now, &prefixes),
            Inbound::KernelRoutes { routes } => speaker.set_kernel_routes(now, &routes),
            Inbound::InKernelUpTo { neighbor } => speaker.end_of_rib_installed(neighbor),
            Inbound::BfdPacket { from, bytes } => self.bfd.received(now, from, &bytes),
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
