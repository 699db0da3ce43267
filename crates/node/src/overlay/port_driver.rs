//! The overlay's ports at run time, one task per overlay:
//!
//! - **Is the wire's tunnel alive?** Every [`PROBE_EVERY`] an ICMP echo goes
//!   through each wire's tunnel to its far end (the agent's prober, bound
//!   to the tunnel's interface), judged by the agent's liveness rule with
//!   [`WIRE_LIVENESS`]: a wire whose peer stops answering for 400 ms is
//!   dead, and alive again after 1 s of answers. This works with any peer
//!   that answers ping (wireguard-go, the kernel module), and needs no BFD.
//! - **With `stp = "fast"`**, our RSTP core ([`bgp4mesh_rstp`]) runs the
//!   spanning tree: BPDUs in and out through one packet socket
//!   ([`super::bpdu_socket`]), a dead wire's port disabled at once (the
//!   tree re-forms in a round trip of proposals, not after max-age), and
//!   the port states applied by the kernel crate's nftables table, set
//!   again every second with a 5-second hold so that a hung daemon leaves
//!   its ports discarding, not forwarding into a loop.
//! - **With the kernel's STP (or none)**, a dead wire's port is set down,
//!   which the kernel bridge acts on at once, and up again when it lives.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bgp4mesh_agent::liveness::{Liveness, LivenessParams};
use bgp4mesh_agent::probe::Prober;
use bgp4mesh_kernel::links::Links;
use bgp4mesh_kernel::overlay::{PortStates, set_port_states};
use bgp4mesh_rstp::{Bridge, BridgeConfig, Event, PortState, Protocol, Role};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::bpdu_socket::{self, BpduSocket};

/// How often each wire's far end is probed.
pub const PROBE_EVERY: Duration = Duration::from_millis(100);
/// Dead after 400 ms (4 probes) unanswered, alive after 1 s of answers;
/// a tunnel gets 5 s to come up before it is judged.
pub const WIRE_LIVENESS: LivenessParams = LivenessParams {
    lost: Duration::from_millis(400),
    min_unanswered: 4,
    recover: Duration::from_secs(1),
    grace: Duration::from_secs(5),
    answered_within: Duration::from_millis(250),
};
/// How often the task looks at its sockets and timers.
const TICK: Duration = Duration::from_millis(10);
/// How long applied port states hold without being set again.
pub const STATES_HOLD: Duration = Duration::from_secs(5);
/// How often they are set again.
const STATES_REFRESH: Duration = Duration::from_secs(1);
/// BPDUs read per tick at most.
const MAX_BPDUS_PER_TICK: usize = 256;
/// The path cost of every wire: the tunnels do not say their speed, and a
/// kernel bridge gives a port of unknown speed 100, so in an overlay of
/// both (seed 003's hand-built machines) every wire counts as one hop.
pub const PATH_COST: u32 = 100;

/// One port as the task runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    /// The VXLAN port's name.
    pub name: String,
    /// What it goes over (`peering:rho`), for `show`.
    pub label: String,
    /// The tunnel's interface, and its far end's address there.
    pub via: String,
    pub remote: IpAddr,
}

/// Who decides the ports' states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Our RSTP.
    Rstp(BridgeConfig),
    /// The kernel bridge (its STP, or none): dead wires are set down.
    Kernel,
}

/// The running task and what it last saw.
pub struct PortDriver {
    mode: Mode,
    ports: watch::Sender<Vec<PortSpec>>,
    status: Arc<Mutex<Value>>,
    task: JoinHandle<()>,
}

impl PortDriver {
    /// Starts the task for `bridge` (which must exist). With RSTP the
    /// packet socket is opened here, so a missing privilege is an error
    /// now, not a tree that never forms.
    pub fn start(bridge: &str, mode: Mode) -> Result<PortDriver> {
        let links = Links::connect()?;
        let rstp = match &mode {
            Mode::Rstp(config) => Some(Rstp {
                bridge: Bridge::new(config.clone())
                    .map_err(|e| anyhow::anyhow!("overlay: the spanning tree: {e}"))?,
                socket: BpduSocket::open()
                    .context("overlay: opening the packet socket for BPDUs (root?)")?,
                mac: config.mac,
                states: BTreeMap::new(),
                applied: None,
                next_refresh: Instant::now(),
            }),
            Mode::Kernel => None,
        };
        let (ports, ports_rx) = watch::channel(Vec::new());
        let status = Arc::new(Mutex::new(Value::Null));
        let task = tokio::spawn(
            Task {
                bridge: bridge.to_string(),
                links,
                rstp,
                ports: BTreeMap::new(),
                probers: HashMap::new(),
                next_index_check: Instant::now(),
                unprobed: std::collections::HashSet::new(),
                next_probe: Instant::now(),
                status: status.clone(),
            }
            .run(ports_rx),
        );
        Ok(PortDriver {
            mode,
            ports,
            status,
            task,
        })
    }

    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// The ports to run from now on.
    pub fn set_ports(&self, ports: Vec<PortSpec>) {
        self.ports.send_if_modified(|old| {
            let changed = *old != ports;
            *old = ports;
            changed
        });
    }

    /// Stops the task once its step in progress is done (so no port state
    /// it was applying lands after the caller removes the table); the
    /// port states it applied are left to the caller.
    pub async fn stop(self) {
        let PortDriver { ports, task, .. } = self;
        // The task returns when its channel closes.
        drop(ports);
        let abort = task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }

    /// What `show overlay` says of the tree and each port, by port name.
    pub fn status(&self) -> Value {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

struct Rstp {
    bridge: Bridge,
    socket: BpduSocket,
    mac: [u8; 6],
    /// Each port's state, by port number, as the core reported it.
    states: BTreeMap<u16, PortState>,
    /// The states last applied.
    applied: Option<PortStates>,
    /// When they are set again (also after a failure: not sooner).
    next_refresh: Instant,
}

struct Port {
    spec: PortSpec,
    number: u16,
    index: Option<u32>,
    liveness: Liveness,
    alive: bool,
}

struct Task {
    bridge: String,
    links: Links,
    rstp: Option<Rstp>,
    /// By port name.
    ports: BTreeMap<String, Port>,
    /// By tunnel interface, with the interface's index when the prober
    /// was bound (an interface made again needs a new one).
    probers: HashMap<String, (Prober, Option<u32>)>,
    /// When interface indexes are looked at again.
    next_index_check: Instant,
    /// Interfaces whose prober could not be made (said once).
    unprobed: std::collections::HashSet<String>,
    next_probe: Instant,
    status: Arc<Mutex<Value>>,
}

impl Task {
    async fn run(mut self, mut ports_rx: watch::Receiver<Vec<PortSpec>>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                changed = ports_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let wanted = ports_rx.borrow_and_update().clone();
                    self.set_ports(wanted, Instant::now()).await;
                }
                _ = tick.tick() => {}
            }
            self.step(Instant::now()).await;
        }
    }

    async fn set_ports(&mut self, wanted: Vec<PortSpec>, now: Instant) {
        let names: Vec<&str> = wanted.iter().map(|p| p.name.as_str()).collect();
        let gone: Vec<String> = self
            .ports
            .keys()
            .filter(|n| !names.contains(&n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(port) = self.ports.remove(&name)
                && let Some(rstp) = self.rstp.as_mut()
            {
                let _ = rstp.bridge.remove_port(port.number);
                rstp.states.remove(&port.number);
            }
        }
        for spec in wanted {
            if let Some(port) = self.ports.get_mut(&spec.name) {
                if port.spec != spec {
                    // Another tunnel under the same port: judged afresh,
                    // alive until its probes say otherwise.
                    port.liveness = Liveness::new(WIRE_LIVENESS);
                    port.spec = spec;
                    if !port.alive {
                        port.alive = true;
                        take_in(self.rstp.as_mut(), &self.links, port, now).await;
                    }
                }
                continue;
            }
            let Some(number) = (1..=4095u16).find(|n| self.ports.values().all(|p| p.number != *n))
            else {
                tracing::error!("overlay: more than 4095 ports; {} left out", spec.name);
                continue;
            };
            if let Some(rstp) = self.rstp.as_mut() {
                if let Err(e) = rstp.bridge.add_port(number, PATH_COST) {
                    tracing::error!("overlay: port {}: {e}", spec.name);
                    continue;
                }
                let _ = rstp.bridge.set_port_enabled(number, true, now);
            }
            self.ports.insert(
                spec.name.clone(),
                Port {
                    index: crate::transport::interface_index(&spec.name).ok(),
                    spec,
                    number,
                    liveness: Liveness::new(WIRE_LIVENESS),
                    alive: true,
                },
            );
        }
        if let Some(rstp) = self.rstp.as_mut() {
            // A new port set: applied at once, not at the next refresh.
            rstp.next_refresh = now;
        }
        self.publish(now);
    }

    async fn step(&mut self, now: Instant) {
        let mut changed = self.probe(now).await;
        let refresh = now >= self.next_index_check;
        if refresh {
            // Interface indexes follow ports made again; the counters in
            // `show` move.
            self.next_index_check = now + STATES_REFRESH;
            for port in self.ports.values_mut() {
                port.index = crate::transport::interface_index(&port.spec.name).ok();
            }
            changed = true;
        }
        let Some(rstp) = self.rstp.as_mut() else {
            if changed {
                self.publish(now);
            }
            return;
        };
        // BPDUs that arrived (a bounded number per tick: a flood does not
        // hold up the probes).
        let mut buf = [0u8; 1600];
        for _ in 0..MAX_BPDUS_PER_TICK {
            match rstp.socket.receive(&mut buf) {
                Ok(Some((index, n))) => {
                    let Some(port) = self.ports.values().find(|p| p.index == Some(index)) else {
                        continue;
                    };
                    let Some(llc) = bpdu_socket::llc_payload(&buf[..n]) else {
                        continue;
                    };
                    if let Err(e) = rstp.bridge.receive(port.number, llc, now) {
                        tracing::debug!("overlay: BPDU on {} ignored: {e}", port.spec.name);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("overlay: reading BPDUs: {e}");
                    break;
                }
            }
        }
        if rstp.bridge.poll_timeout().is_some_and(|t| t <= now) {
            rstp.bridge.handle_timeout(now);
        }
        let mut flush = Vec::new();
        while let Some(event) = rstp.bridge.poll_event() {
            changed = true;
            match event {
                Event::PortState { port, state } => {
                    rstp.states.insert(port, state);
                }
                Event::Flush { port } => flush.push(port),
                Event::PortRole { port, role } => {
                    if let Some(p) = self.ports.values().find(|p| p.number == port) {
                        tracing::info!("overlay: {} ({}) is {role:?}", p.spec.name, p.spec.label);
                    }
                }
                Event::Root { root, root_port } => {
                    let port = root_port
                        .and_then(|n| self.ports.values().find(|p| p.number == n))
                        .map(|p| p.spec.name.as_str())
                        .unwrap_or("none: this bridge is the root");
                    tracing::info!("overlay: root bridge {root}, root port {port}");
                }
            }
        }
        // The states are applied before the BPDUs that follow from them go
        // out: an agreement must not reach a neighbour (which then
        // forwards) while our own ports still forward.
        let wanted = PortStates {
            forwarding: self.named(PortState::Forwarding),
            learning: self.named(PortState::Learning),
            hold: STATES_HOLD,
        };
        let Some(rstp) = self.rstp.as_mut() else {
            return;
        };
        let due = now >= rstp.next_refresh;
        if due || (rstp.applied.is_some() && rstp.applied.as_ref() != Some(&wanted)) {
            let bridge = self.bridge.clone();
            let states = wanted.clone();
            let result =
                tokio::task::spawn_blocking(move || set_port_states(&bridge, Some(&states))).await;
            match result {
                Ok(Ok(())) => rstp.applied = Some(wanted),
                Ok(Err(e)) => {
                    // Tried again at the next refresh, not at every tick.
                    tracing::error!("overlay: {e:#}");
                    rstp.applied = None;
                }
                Err(e) => {
                    tracing::error!("overlay: setting the port states: {e}");
                    rstp.applied = None;
                }
            }
            rstp.next_refresh = now + STATES_REFRESH;
        }
        while let Some((number, bytes)) = rstp.bridge.poll_transmit() {
            let Some(port) = self.ports.values().find(|p| p.number == number) else {
                continue;
            };
            let Some(index) = port.index else { continue };
            let frame = bpdu_socket::frame(rstp.mac, &bytes);
            if let Err(e) = rstp.socket.send(index, &frame) {
                tracing::debug!("overlay: sending a BPDU on {}: {e}", port.spec.name);
            }
        }
        for number in flush {
            if let Some(port) = self.ports.values().find(|p| p.number == number)
                && let Err(e) = self.links.overlay().flush_port(&port.spec.name).await
            {
                tracing::debug!("overlay: {e:#}");
            }
        }
        if changed {
            self.publish(now);
        }
    }

    /// The names of the ports in `state`.
    fn named(&self, state: PortState) -> Vec<String> {
        let Some(rstp) = self.rstp.as_ref() else {
            return Vec::new();
        };
        self.ports
            .values()
            .filter(|p| rstp.states.get(&p.number) == Some(&state))
            .map(|p| p.spec.name.clone())
            .collect()
    }

    /// Probes the wires' far ends and acts on the ones that died or came
    /// back; true when one did.
    async fn probe(&mut self, now: Instant) -> bool {
        for (via, (prober, _)) in &mut self.probers {
            for answer in prober.answers() {
                for port in self.ports.values_mut() {
                    if &port.spec.via == via && port.spec.remote == answer.from {
                        port.liveness.answered(now);
                    }
                }
            }
        }
        if now >= self.next_probe {
            let check_index = now >= self.next_index_check;
            self.next_probe = now + PROBE_EVERY;
            let vias: Vec<String> = self.ports.values().map(|p| p.spec.via.clone()).collect();
            self.probers.retain(|via, (_, index)| {
                vias.contains(via)
                    && (!check_index || crate::transport::interface_index(via).ok() == *index)
            });
            for port in self.ports.values_mut() {
                if !self.probers.contains_key(&port.spec.via) {
                    let index = crate::transport::interface_index(&port.spec.via).ok();
                    match Prober::new(&port.spec.via) {
                        Ok(p) => {
                            self.probers.insert(port.spec.via.clone(), (p, index));
                        }
                        Err(e) => {
                            // Said once; the wire is judged by its BPDUs
                            // alone meanwhile.
                            if self.unprobed.insert(port.spec.via.clone()) {
                                tracing::warn!("overlay: probing through {}: {e}", port.spec.via);
                            }
                            continue;
                        }
                    }
                }
                if let Some((prober, _)) = self.probers.get_mut(&port.spec.via) {
                    prober.send(port.spec.remote);
                    port.liveness.sent(now);
                }
            }
        }
        let mut changed = false;
        for port in self.ports.values_mut() {
            let Some(alive) = port.liveness.update(now) else {
                continue;
            };
            changed = true;
            port.alive = alive;
            tracing::info!(
                "overlay: {} ({}): the far end {} {}",
                port.spec.name,
                port.spec.label,
                port.spec.remote,
                if alive {
                    "answers again"
                } else {
                    "stopped answering"
                }
            );
            take_in(self.rstp.as_mut(), &self.links, port, now).await;
        }
        changed
    }

    /// Puts what `show overlay` says where it reads it.
    fn publish(&self, now: Instant) {
        let ports: serde_json::Map<String, Value> = self
            .ports
            .values()
            .map(|p| {
                let mut v = json!({ "alive": p.alive, "number": p.number });
                if let Some(rstp) = &self.rstp
                    && let Some(s) = rstp
                        .bridge
                        .status()
                        .ports
                        .iter()
                        .find(|s| s.number == p.number)
                {
                    v["state"] = json!(state_name(s.state, s.enabled));
                    v["role"] = json!(role_name(s.role));
                    v["protocol"] = json!(match s.protocol {
                        Protocol::Rstp => "rstp",
                        Protocol::Stp => "stp",
                    });
                    v["designated_bridge"] = json!(s.designated_bridge.to_string());
                    v["bpdus_sent"] = json!(s.bpdus_sent);
                    v["bpdus_received"] = json!(s.bpdus_received);
                    v["bpdus_bad"] = json!(s.bpdus_bad);
                }
                (p.spec.name.clone(), v)
            })
            .collect();
        let mut status = json!({ "ports": ports });
        if let Some(rstp) = &self.rstp {
            let s = rstp.bridge.status();
            status["bridge_id"] = json!(s.bridge_id.to_string());
            status["root"] = json!(s.root_id.to_string());
            status["root_port"] = json!(s.root_port.and_then(|n| {
                self.ports
                    .values()
                    .find(|p| p.number == n)
                    .map(|p| p.spec.name.clone())
            }));
            status["root_path_cost"] = json!(s.root_path_cost);
            status["topology_changes"] = json!(s.topology_changes);
            status["last_topology_change_at"] = json!(s.last_topology_change.map(|t| {
                let ago = now.saturating_duration_since(t);
                std::time::SystemTime::now()
                    .checked_sub(ago)
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            }));
        }
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = status;
    }
}

/// Puts `port` in use or out of it as `port.alive` says: our spanning
/// tree enables or disables it; the kernel's sees its link up or down.
async fn take_in(rstp: Option<&mut Rstp>, links: &Links, port: &Port, now: Instant) {
    match rstp {
        Some(rstp) => {
            let _ = rstp.bridge.set_port_enabled(port.number, port.alive, now);
        }
        None => {
            if let Err(e) = links
                .overlay()
                .set_port_up(&port.spec.name, port.alive)
                .await
            {
                tracing::warn!("overlay: {e:#}");
            }
        }
    }
}

fn state_name(state: PortState, enabled: bool) -> &'static str {
    match (enabled, state) {
        (false, _) => "down",
        (true, PortState::Discarding) => "discarding",
        (true, PortState::Learning) => "learning",
        (true, PortState::Forwarding) => "forwarding",
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Root => "root",
        Role::Designated => "designated",
        Role::Alternate => "alternate",
        Role::Backup => "backup",
        Role::Disabled => "disabled",
    }
}
