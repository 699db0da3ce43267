//! The WireGuard interfaces the config makes, kept in step with it:
//! `[[peering]]` (one peer, a BGP neighbour over it) and `[[wireguard]]`
//! (many peers, their allowed IPs routed into the interface). Each is a
//! device (our userspace one, or the kernel module), its link's MTU,
//! addresses and routes, and its peers.
//!
//! The device is the `wireguard` crate's ([`AnyDevice`]), the link's
//! addresses, MTU, state and routes the `kernel` crate's ([`Links`]); this
//! module only says what they should be. Both kinds go through one
//! lifecycle: made whole or not at all, reconciled on reload, removed on
//! stop. A peering's BGP session is an ordinary neighbour of the BGP
//! driver (config parsing made it one).
//!
//! On reload the daemon calls [`Devices::apply`] before the BGP driver
//! reloads (a new session finds its tunnel up, a new `[[bgp.static]]
//! device` its interface) and [`Devices::remove_absent`] after (a removed
//! session's Cease still goes through its tunnel).

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bgp4mesh_kernel::links::Links;
use bgp4mesh_wireguard::{
    AnyDevice, Backend, ClusterOptions, ClusterStatus, DeviceConfig, DeviceOptions, Key,
    PeerConfig, PeerStatus,
};
use ipnet::IpNet;
use serde_json::{Value, json};

use crate::config::{
    KeySource, NodeConfig, Peering, Wireguard, load_or_create_private_key, read_cluster_key,
    read_preshared_key,
};

/// One interface the config asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    Peering(Peering),
    Wireguard(Wireguard),
}

/// Every interface of a config: peerings, then `[[wireguard]]`.
pub fn specs(config: &NodeConfig) -> Vec<Spec> {
    config
        .peerings
        .iter()
        .cloned()
        .map(Spec::Peering)
        .chain(config.wireguard.iter().cloned().map(Spec::Wireguard))
        .collect()
}

impl Spec {
    /// What it is called in messages, and what finds it again on reload.
    fn id(&self) -> String {
        match self {
            Spec::Peering(p) => format!("peering {}", p.name),
            Spec::Wireguard(w) => format!("wireguard {}", w.interface),
        }
    }

    /// The cluster the interface is in, its key read (at start and on
    /// every reload).
    fn cluster(&self) -> Result<Option<ClusterOptions>> {
        let Spec::Wireguard(Wireguard {
            cluster: Some(c), ..
        }) = self
        else {
            return Ok(None);
        };
        let key = read_cluster_key(&c.key_file)
            .with_context(|| format!("{}: cluster.key_file", self.id()))?;
        Ok(Some(ClusterOptions {
            listen: c.listen,
            members: c.members.clone(),
            key,
        }))
    }

    fn interface(&self) -> &str {
        match self {
            Spec::Peering(p) => &p.interface,
            Spec::Wireguard(w) => &w.interface,
        }
    }

    fn backend(&self) -> Backend {
        match self {
            Spec::Peering(p) => p.backend,
            Spec::Wireguard(w) => w.backend,
        }
    }

    fn mtu(&self) -> u16 {
        match self {
            Spec::Peering(p) => p.mtu,
            Spec::Wireguard(w) => w.mtu,
        }
    }

    fn address(&self) -> &[IpNet] {
        match self {
            Spec::Peering(p) => &p.address,
            Spec::Wireguard(w) => &w.address,
        }
    }

    /// Routes into the interface besides its own networks: a peering has
    /// none (BGP's), a `[[wireguard]]` its peers' allowed IPs.
    fn routes(&self) -> Vec<IpNet> {
        match self {
            Spec::Peering(_) => Vec::new(),
            Spec::Wireguard(w) => w.routes(),
        }
    }

    /// The private key; a key file is made when missing.
    fn private_key(&self) -> Result<Key> {
        let (source, field) = match self {
            Spec::Peering(p) => (
                KeySource::File(p.private_key_file.clone()),
                "private_key_file",
            ),
            Spec::Wireguard(w) => (w.private_key.clone(), "private_key_file"),
        };
        match source {
            KeySource::Given(key) => Ok(key),
            KeySource::File(path) => {
                load_or_create_private_key(&path).with_context(|| format!("{}: {field}", self.id()))
            }
        }
    }

    /// The device's whole desired state (preshared key files read now).
    fn desired(&self, private: Key) -> Result<DeviceConfig> {
        let (listen_port, fwmark, peers) = match self {
            Spec::Peering(p) => {
                let mut peer = PeerConfig::new(p.peer_public_key);
                peer.endpoint = p.endpoint;
                peer.allowed_ips = Peering::allowed_ips();
                peer.persistent_keepalive = p.persistent_keepalive;
                (p.listen_port, 0, vec![peer])
            }
            Spec::Wireguard(w) => {
                let mut peers = Vec::with_capacity(w.peers.len());
                for (k, p) in w.peers.iter().enumerate() {
                    let preshared_key = match &p.preshared_key {
                        None => None,
                        Some(KeySource::Given(key)) => Some(*key),
                        Some(KeySource::File(path)) => {
                            Some(read_preshared_key(path).with_context(|| {
                                format!("{}: peer[{k}].preshared_key_file", self.id())
                            })?)
                        }
                    };
                    peers.push(PeerConfig {
                        public_key: p.public_key,
                        preshared_key,
                        endpoint: p.endpoint,
                        allowed_ips: p.allowed_ips.clone(),
                        persistent_keepalive: p.persistent_keepalive,
                    });
                }
                (w.listen_port, w.fwmark, peers)
            }
        };
        Ok(DeviceConfig {
            private_key: Some(private),
            listen_port,
            fwmark,
            peers,
        })
    }
}

struct Running {
    spec: Spec,
    private: Key,
    /// What the device was last configured to.
    desired: DeviceConfig,
    device: AnyDevice,
    /// The cluster it is in, key included.
    cluster: Option<ClusterOptions>,
}

/// The running interfaces.
pub struct Devices {
    links: Links,
    running: Vec<Running>,
}

fn backend_name(device: &AnyDevice) -> &'static str {
    match device.backend() {
        Backend::Kernel => "kernel",
        _ => "userspace",
    }
}

/// What changed between two desired device states, for the log.
fn device_changes(old: &DeviceConfig, new: &DeviceConfig) -> Vec<String> {
    let mut changed = Vec::new();
    if old.private_key != new.private_key {
        changed.push("private key".to_string());
    }
    if old.listen_port != new.listen_port {
        changed.push("listen_port".into());
    }
    if old.fwmark != new.fwmark {
        changed.push("fwmark".into());
    }
    let find = |list: &[PeerConfig], key: &Key| list.iter().position(|p| &p.public_key == key);
    let added = new
        .peers
        .iter()
        .filter(|p| find(&old.peers, &p.public_key).is_none())
        .count();
    let removed = old
        .peers
        .iter()
        .filter(|p| find(&new.peers, &p.public_key).is_none())
        .count();
    let modified = new
        .peers
        .iter()
        .filter(|p| find(&old.peers, &p.public_key).is_some_and(|i| &old.peers[i] != *p))
        .count();
    for (n, what) in [
        (added, "added"),
        (removed, "removed"),
        (modified, "changed"),
    ] {
        if n > 0 {
            changed.push(format!("{n} peer(s) {what}"));
        }
    }
    changed
}

impl Devices {
    /// Makes every interface of `wanted`; if one fails, those made are
    /// removed again and the error names the one that failed.
    pub async fn start(wanted: &[Spec]) -> Result<Devices> {
        let mut devices = Devices {
            links: Links::connect()?,
            running: Vec::new(),
        };
        for spec in wanted {
            match devices.create(spec).await {
                Ok(running) => devices.running.push(running),
                Err(e) => {
                    devices.stop().await;
                    return Err(e);
                }
            }
        }
        Ok(devices)
    }

    /// Makes one interface whole, or nothing of it.
    async fn create(&self, spec: &Spec) -> Result<Running> {
        let at = spec.id();
        let private = spec.private_key()?;
        let desired = spec.desired(private)?;
        let mut options = DeviceOptions::new(spec.interface());
        options.mtu = spec.mtu();
        let device = AnyDevice::create(options, spec.backend()).with_context(|| {
            format!(
                "{at}: creating the WireGuard interface {}",
                spec.interface()
            )
        })?;
        let running = Running {
            spec: spec.clone(),
            private,
            desired,
            device,
            cluster: spec.cluster()?,
        };
        if let Err(e) = self.bring_up(&running).await {
            self.remove(running).await;
            return Err(e.context(at));
        }
        if let Err(e) = join_cluster(&running).await {
            self.remove(running).await;
            return Err(e.context(at));
        }
        tracing::info!(
            "{at}: {} up ({}, public key {}, port {}, {} peer(s))",
            spec.interface(),
            backend_name(&running.device),
            private.public_key(),
            running.desired.listen_port,
            running.desired.peers.len()
        );
        Ok(running)
    }

    async fn bring_up(&self, r: &Running) -> Result<()> {
        let interface = r.spec.interface();
        r.device.configure(&r.desired).with_context(|| {
            format!(
                "configuring {interface} (listen_port {})",
                r.desired.listen_port
            )
        })?;
        self.links
            .up(interface, Some(u32::from(r.spec.mtu())))
            .await?;
        self.links
            .set_addresses(interface, r.spec.address())
            .await?;
        let routes = r.spec.routes();
        if !routes.is_empty() {
            self.links.set_device_routes(interface, &routes).await?;
        }
        Ok(())
    }

    /// Removes an interface (its routes go with it).
    async fn remove(&self, r: Running) {
        let name = r.spec.interface().to_string();
        let kernel = r.device.backend() == Backend::Kernel;
        // The userspace device removes its interface when dropped; a
        // kernel one stays until deleted.
        drop(r.device);
        if kernel && let Err(e) = self.links.delete(&name).await {
            tracing::warn!("{}: {e:#}", r.spec.id());
        }
    }

    /// Brings the interfaces to `wanted`, except removals (see
    /// [`Devices::remove_absent`]): new ones are made, changed ones get
    /// only what changed (an interface or backend changed is a new
    /// interface). Every one is tried; the errors are returned together,
    /// and one that failed is left out whole (the next reload tries again).
    pub async fn apply(&mut self, wanted: &[Spec]) -> Result<()> {
        let mut errors = Vec::new();
        for spec in wanted {
            let id = spec.id();
            let at = self.running.iter().position(|r| r.spec.id() == id);
            let result = match at {
                None => self.create(spec).await.map(|r| self.running.push(r)),
                Some(i) => self.change(i, spec).await,
            };
            if let Err(e) = result {
                tracing::error!("{e:#}");
                errors.push(format!("{e:#}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("{}", errors.join("; "))
        }
    }

    async fn change(&mut self, i: usize, spec: &Spec) -> Result<()> {
        let at = spec.id();
        let old = &self.running[i].spec;
        if old.interface() != spec.interface() || old.backend() != spec.backend() {
            let r = self.running.remove(i);
            tracing::info!(
                "{at}: interface {} → {}: made anew",
                r.spec.interface(),
                spec.interface()
            );
            self.remove(r).await;
            let r = self.create(spec).await?;
            self.running.push(r);
            return Ok(());
        }
        // Key files are read again: a new key there is a change too.
        let private = spec.private_key()?;
        let desired = spec.desired(private)?;
        let r = &mut self.running[i];
        let mut changed = device_changes(&r.desired, &desired);
        if !changed.is_empty() {
            r.device
                .configure(&desired)
                .with_context(|| format!("{at}: configuring {}", spec.interface()))?;
        }
        let cluster = spec.cluster()?;
        if cluster.as_ref() != r.cluster.as_ref() {
            r.device
                .set_cluster(cluster.clone())
                .with_context(|| format!("{at}: cluster"))?;
            changed.push("cluster".into());
            r.cluster = cluster;
        }
        let interface = spec.interface();
        if spec.mtu() != r.spec.mtu() {
            self.links
                .up(interface, Some(u32::from(spec.mtu())))
                .await?;
            changed.push("mtu".into());
        }
        if spec.address() != r.spec.address() {
            self.links.set_addresses(interface, spec.address()).await?;
            changed.push("address".into());
        }
        let routes = spec.routes();
        if matches!(spec, Spec::Wireguard(_))
            && (routes != r.spec.routes() || spec.address() != r.spec.address())
        {
            self.links.set_device_routes(interface, &routes).await?;
            if routes != r.spec.routes() {
                changed.push("routes".into());
            }
        }
        if let (Spec::Peering(new), Spec::Peering(old)) = (spec, &r.spec)
            && new.peer_address != old.peer_address
        {
            changed.push("peer_address".into());
        }
        if !changed.is_empty() {
            tracing::info!("{at}: changed {}", changed.join(", "));
        }
        r.private = private;
        r.desired = desired;
        r.spec = spec.clone();
        Ok(())
    }

    /// Removes the interfaces `wanted` no longer has: interface, addresses
    /// and the routes through it.
    pub async fn remove_absent(&mut self, wanted: &[Spec]) {
        let ids: Vec<String> = wanted.iter().map(Spec::id).collect();
        let (keep, gone): (Vec<Running>, Vec<Running>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|r| ids.contains(&r.spec.id()));
        self.running = keep;
        for r in gone {
            tracing::info!("{}: removed, {} deleted", r.spec.id(), r.spec.interface());
            self.remove(r).await;
        }
    }

    /// Removes every interface (the daemon stops).
    pub async fn stop(&mut self) {
        for r in std::mem::take(&mut self.running) {
            self.remove(r).await;
        }
    }

    /// `show peerings`: a JSON object per peering, without its session
    /// (the daemon adds that from `show protocols`).
    pub fn peerings(&self) -> Vec<Value> {
        self.running
            .iter()
            .filter_map(|r| match &r.spec {
                Spec::Peering(p) => Some((r, p)),
                Spec::Wireguard(_) => None,
            })
            .map(|(r, p)| {
                let status = r.device.status().ok();
                let peer = status.as_ref().and_then(|s| s.peer(&p.peer_public_key));
                let mut object = json!({
                    "name": p.name,
                    "interface": p.interface,
                    "backend": backend_name(&r.device),
                    "public_key": r.private.public_key().to_base64(),
                    "listen_port": status.as_ref().map(|s| s.listen_port).unwrap_or(p.listen_port),
                    "peer_public_key": p.peer_public_key.to_base64(),
                    "endpoint": peer
                        .and_then(|s| s.endpoint)
                        .or(p.endpoint)
                        .map(|e| e.to_string()),
                    "address": p.address.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                    "peer_address": p.session_address.to_string(),
                    "mtu": p.mtu,
                });
                add_traffic(&mut object, peer);
                object
            })
            .collect()
    }

    /// `show wireguard`: a JSON object per `[[wireguard]]` interface with
    /// its peers (keys public only).
    pub fn wireguard(&self) -> Vec<Value> {
        self.running
            .iter()
            .filter_map(|r| match &r.spec {
                Spec::Wireguard(w) => Some((r, w)),
                Spec::Peering(_) => None,
            })
            .map(|(r, w)| {
                let status = r.device.status().ok();
                let peers: Vec<Value> = w
                    .peers
                    .iter()
                    .map(|p| {
                        let peer = status.as_ref().and_then(|s| s.peer(&p.public_key));
                        let mut object = json!({
                            "public_key": p.public_key.to_base64(),
                            "endpoint": peer
                                .and_then(|s| s.endpoint)
                                .or(p.endpoint)
                                .map(|e| e.to_string()),
                            "allowed_ips": p.allowed_ips.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                            "persistent_keepalive": p.persistent_keepalive,
                            "preshared_key": p.preshared_key.is_some(),
                        });
                        add_traffic(&mut object, peer);
                        object
                    })
                    .collect();
                json!({
                    "cluster": r.device.cluster_status().map(|c| cluster_json(&c)),
                    "interface": w.interface,
                    "backend": backend_name(&r.device),
                    "config": w.config.as_ref().map(|c| c.display().to_string()),
                    "public_key": r.private.public_key().to_base64(),
                    "listen_port": status.as_ref().map(|s| s.listen_port).unwrap_or(w.listen_port),
                    "fwmark": w.fwmark,
                    "address": w.address.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                    "mtu": w.mtu,
                    "peers": peers,
                })
            })
            .collect()
    }
}

/// Joins the interface's cluster, if it is in one, and waits until the
/// cluster is synced (every other server sent its sessions, or stayed
/// silent): the daemon announces the VIP only after, so a server that
/// (re)starts takes traffic only once it can take over every client.
async fn join_cluster(r: &Running) -> Result<()> {
    let Some(options) = r.cluster.clone() else {
        return Ok(());
    };
    let listen = options.listen;
    r.device
        .set_cluster(Some(options))
        .with_context(|| format!("cluster: listening on {listen}"))?;
    // The cluster counts itself synced after at most 3 × SYNC_WAIT.
    let deadline = tokio::time::Instant::now()
        + bgp4mesh_wireguard::device::cluster_sync_deadline()
        + std::time::Duration::from_secs(1);
    while !r.device.cluster_status().is_some_and(|c| c.synced) {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!("{}: cluster not synced; going on", r.spec.id());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(())
}

fn cluster_json(c: &ClusterStatus) -> Value {
    json!({
        "listen": c.listen.to_string(),
        "synced": c.synced,
        "sessions_held": c.sessions_held,
        "handovers": c.handovers,
        "refused": c.refused,
        "members": c.members.iter().map(|m| {
            let heard = m.last_heard
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs());
            json!({
                "address": m.address.to_string(),
                "connected": m.connected,
                "synced": m.synced,
                "sessions": m.sessions,
                "last_heard": heard.map(crate::show::utc_text),
                "last_heard_unix": heard,
            })
        }).collect::<Vec<_>>(),
    })
}

/// A peer's latest handshake and transfer, as `show peerings` and `show
/// wireguard` give them.
fn add_traffic(object: &mut Value, peer: Option<&PeerStatus>) {
    let handshake = peer
        .and_then(|s| s.last_handshake)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    object["last_handshake"] = json!(handshake.map(crate::show::utc_text));
    object["last_handshake_unix"] = json!(handshake);
    object["handshake_age"] = json!(handshake.map(|h| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|n| n.as_secs().saturating_sub(h))
            .unwrap_or(0)
    }));
    object["local_address"] = json!(peer.and_then(|s| s.local_address).map(|a| a.to_string()));
    object["rx_bytes"] = json!(peer.map(|s| s.rx_bytes).unwrap_or(0));
    object["tx_bytes"] = json!(peer.map(|s| s.tx_bytes).unwrap_or(0));
}
