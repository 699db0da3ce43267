//! The probe thread: ICMP echo through the mesh ([`crate::probe`]) judged
//! by [`crate::liveness`], for the two questions the controller's pulses
//! cannot answer (they prove only that the controller link works):
//!
//! - **a gateway's own mesh**: every [`PROBE_EVERY`] it probes up to
//!   [`MESH_PROBES`] peers, those with a recent handshake first, in turn;
//!   its mesh carries traffic while any of them answers. When none has for
//!   600 ms the gateway says so in its pulses (the controller moves the
//!   nodes to another exit) and a border withdraws its block (the ISP
//!   sends the traffic to the other border); both come back after 1 s of
//!   answers.
//! - **a node's exit**: it probes the gateway of its default route; when
//!   that gateway stops answering for 600 ms the node distrusts it and
//!   moves its default route to the next healthy gateway on its own. It
//!   goes on probing the distrusted gateway, and trusts it again after 1 s
//!   of answers.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use crate::liveness::{DEFAULT_PARAMS, Liveness, PROBE_EVERY};
use crate::probe::Prober;

/// Peers a gateway probes per round.
pub const MESH_PROBES: usize = 3;
/// A peer whose last handshake is younger than this is probed first.
const RECENT_HANDSHAKE: Duration = Duration::from_secs(180);
/// How often the probe thread wakes to read answers.
const POLL: Duration = Duration::from_millis(10);

/// What to probe, set by the mesh on every apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Targets {
    /// On a gateway: each peer's public key (base64) and mesh address.
    pub mesh: Vec<(String, IpAddr)>,
    /// The gateways this node's default routes go to: node id → address.
    pub exits: Vec<(String, IpAddr)>,
}

/// What the probes say of the gateways, for the choice of exits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    /// Stopped answering: no exit, whatever the controller says.
    pub distrusted: BTreeSet<String>,
    /// Answering now: an exit even while the controller does not hear it
    /// (its link to the controller is cut, not its data plane).
    pub answering: BTreeSet<String>,
}

/// The probe thread's side of the agent.
#[derive(Clone)]
pub struct Probing {
    targets: Arc<Mutex<Targets>>,
    /// Gateways this node stopped trusting as exits (node ids).
    distrusted: Arc<Mutex<BTreeSet<String>>>,
    /// Exits whose probes are answered now (node ids).
    answering: Arc<Mutex<BTreeSet<String>>>,
    /// The gateway's mesh carries traffic (true until probes say not).
    mesh_ok: watch::Sender<bool>,
    /// Notified when the distrusted gateways change: the mesh is applied
    /// again.
    pub exits_changed: Arc<Notify>,
    stop: Arc<AtomicBool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Probing {
    pub fn new() -> Probing {
        Probing {
            targets: Arc::default(),
            distrusted: Arc::default(),
            answering: Arc::default(),
            mesh_ok: watch::channel(true).0,
            exits_changed: Arc::new(Notify::new()),
            stop: Arc::default(),
        }
    }

    pub fn set_targets(&self, targets: Targets) {
        *lock(&self.targets) = targets;
    }

    /// What the probes say of the gateways (node ids).
    pub fn trust(&self) -> Trust {
        Trust {
            distrusted: lock(&self.distrusted).clone(),
            answering: lock(&self.answering).clone(),
        }
    }

    fn distrusted(&self) -> BTreeSet<String> {
        lock(&self.distrusted).clone()
    }

    pub fn mesh_ok(&self) -> watch::Receiver<bool> {
        self.mesh_ok.subscribe()
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Starts the probe thread on `interface`. `recent` says which peers
    /// (public keys, base64) had a handshake within [`RECENT_HANDSHAKE`]
    /// (asked every few seconds). Without raw sockets (not root) there is nothing to
    /// probe with: the judges then stay as the controller says.
    pub fn start(
        &self,
        interface: &str,
        recent: impl Fn(Duration) -> BTreeSet<String> + Send + 'static,
    ) {
        let prober = match Prober::new(interface) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(
                    "no ICMP probes through {interface} ({e}): exits and the mesh are judged by the controller alone"
                );
                return;
            }
        };
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("mesh-probes".into())
            .spawn(move || me.run(prober, recent));
        if let Err(e) = spawned {
            tracing::warn!("no probe thread: {e}");
        }
    }

    fn run(self, mut prober: Prober, recent: impl Fn(Duration) -> BTreeSet<String>) {
        let mut mesh = Liveness::new(DEFAULT_PARAMS);
        let mut mesh_probed: BTreeSet<IpAddr> = BTreeSet::new();
        let mut exits: HashMap<String, (IpAddr, Liveness)> = HashMap::new();
        let mut turn = 0usize;
        let mut live: BTreeSet<String> = BTreeSet::new();
        let mut live_at: Option<Instant> = None;
        let mut next_round = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(POLL);
            let now = Instant::now();
            for answer in prober.answers() {
                if mesh_probed.contains(&answer.from) {
                    mesh.answered(now);
                }
                for (address, live) in exits.values_mut() {
                    if *address == answer.from {
                        live.answered(now);
                    }
                }
            }
            if now < next_round {
                continue;
            }
            next_round = now + PROBE_EVERY;
            let targets = lock(&self.targets).clone();

            // A gateway's mesh: a few peers a round, recent ones first.
            if targets.mesh.is_empty() {
                mesh_probed.clear();
            } else {
                if live_at.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
                    live = recent(RECENT_HANDSHAKE);
                    live_at = Some(now);
                }
                // Only peers we had a handshake with lately: a peer that
                // never answered (down, not yet up) says nothing of our
                // mesh. With none, no verdict: the state stays as it was
                // (a cut underlay outlasts the handshakes' 180 s).
                let pool: Vec<IpAddr> = targets
                    .mesh
                    .iter()
                    .filter(|(key, _)| live.contains(key))
                    .map(|(_, a)| *a)
                    .collect();
                let n = pool.len().min(MESH_PROBES);
                for k in 0..n {
                    let to = pool[(turn + k) % pool.len()];
                    prober.send(to);
                    mesh_probed.insert(to);
                }
                turn = turn.wrapping_add(n);
                // Two peers at least: one that does not answer may be down
                // itself, and says nothing of our mesh.
                if n >= 2 {
                    mesh.sent(now);
                }
                if let Some(ok) = mesh.update(now) {
                    if ok {
                        tracing::info!("the mesh answers again: this gateway carries traffic");
                    } else {
                        tracing::warn!(
                            "no mesh peer answered for {:?}: this gateway does not carry traffic",
                            DEFAULT_PARAMS.lost
                        );
                    }
                    self.mesh_ok.send_replace(ok);
                }
            }

            // The node's exits: the current ones and the distrusted ones.
            let distrusted = self.distrusted();
            exits.retain(|id, _| {
                targets.exits.iter().any(|(e, _)| e == id) || distrusted.contains(id)
            });
            for (id, address) in &targets.exits {
                exits
                    .entry(id.clone())
                    .or_insert_with(|| (*address, Liveness::new(DEFAULT_PARAMS)));
            }
            let mut changed = false;
            for (id, (address, live)) in exits.iter_mut() {
                prober.send(*address);
                live.sent(now);
                match live.update(now) {
                    Some(false) => {
                        tracing::warn!(
                            gateway = %id,
                            "the exit stopped answering for {:?}: moving to the next one",
                            DEFAULT_PARAMS.lost
                        );
                        changed |= lock(&self.distrusted).insert(id.clone());
                    }
                    Some(true) => {
                        tracing::info!(gateway = %id, "the exit answers again");
                        changed |= lock(&self.distrusted).remove(id);
                    }
                    None => {}
                }
            }
            let answering: BTreeSet<String> = exits
                .iter()
                .filter(|(_, (_, live))| live.answering(now))
                .map(|(id, _)| id.clone())
                .collect();
            changed |=
                std::mem::replace(&mut *lock(&self.answering), answering.clone()) != answering;
            if changed {
                self.exits_changed.notify_one();
            }
        }
    }
}

impl Default for Probing {
    fn default() -> Probing {
        Probing::new()
    }
}
