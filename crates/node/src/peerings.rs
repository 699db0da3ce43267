//! `[[peering]]` at run time: one WireGuard interface per peering (our
//! userspace device, or the kernel module), its addresses, MTU and its one
//! peer, kept in step with the config. The BGP session over each tunnel is
//! an ordinary neighbour of the BGP driver (config parsing made it one).
//!
//! The device is the `wireguard` crate's ([`AnyDevice`]), the link's
//! addresses, MTU and state the `kernel` crate's ([`Links`]); this module
//! only says what they should be.
//!
//! On reload the daemon calls [`Peerings::apply`] before the BGP driver
//! reloads (a new session finds its tunnel up) and
//! [`Peerings::remove_absent`] after (a removed session's Cease still goes
//! through its tunnel).

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bgp4mesh_kernel::links::Links;
use bgp4mesh_wireguard::{AnyDevice, Backend, DeviceConfig, DeviceOptions, Key, PeerConfig};
use serde_json::{Value, json};

use crate::config::{Peering, load_or_create_private_key};

struct Running {
    config: Peering,
    private: Key,
    device: AnyDevice,
}

/// The running peerings, by name.
pub struct Peerings {
    links: Links,
    running: Vec<Running>,
}

fn desired(p: &Peering, private: Key) -> DeviceConfig {
    let mut peer = PeerConfig::new(p.peer_public_key);
    peer.endpoint = p.endpoint;
    peer.allowed_ips = Peering::allowed_ips();
    peer.persistent_keepalive = p.persistent_keepalive;
    DeviceConfig {
        private_key: Some(private),
        listen_port: p.listen_port,
        fwmark: 0,
        peers: vec![peer],
    }
}

impl Peerings {
    /// Makes every peering of `wanted`; if one fails, those made are
    /// removed again and the error names the peering.
    pub async fn start(wanted: &[Peering]) -> Result<Peerings> {
        let mut peerings = Peerings {
            links: Links::connect()?,
            running: Vec::new(),
        };
        for p in wanted {
            match peerings.create(p).await {
                Ok(running) => peerings.running.push(running),
                Err(e) => {
                    peerings.stop().await;
                    return Err(e);
                }
            }
        }
        Ok(peerings)
    }

    /// Makes one peering whole, or nothing of it.
    async fn create(&self, p: &Peering) -> Result<Running> {
        let at = format!("peering {}", p.name);
        let private = load_or_create_private_key(&p.private_key_file)
            .with_context(|| format!("{at}: private_key_file"))?;
        let mut options = DeviceOptions::new(&p.interface);
        options.mtu = p.mtu;
        let device = AnyDevice::create(options, p.backend)
            .with_context(|| format!("{at}: creating the WireGuard interface {}", p.interface))?;
        let running = Running {
            config: p.clone(),
            private,
            device,
        };
        if let Err(e) = self.bring_up(&running).await {
            self.remove(running).await;
            return Err(e.context(at));
        }
        tracing::info!(
            "peering {}: {} up ({}, public key {}, port {})",
            p.name,
            p.interface,
            match running.device.backend() {
                Backend::Kernel => "kernel",
                _ => "userspace",
            },
            private.public_key(),
            p.listen_port
        );
        Ok(running)
    }

    async fn bring_up(&self, r: &Running) -> Result<()> {
        let p = &r.config;
        r.device
            .configure(&desired(p, r.private))
            .with_context(|| {
                format!(
                    "configuring {} (listen_port {})",
                    p.interface, p.listen_port
                )
            })?;
        self.links.up(&p.interface, Some(u32::from(p.mtu))).await?;
        self.links.set_addresses(&p.interface, &p.address).await?;
        Ok(())
    }

    /// Removes a peering's interface (its routes go with it).
    async fn remove(&self, r: Running) {
        let name = r.config.interface.clone();
        let kernel = r.device.backend() == Backend::Kernel;
        // The userspace device removes its interface when dropped; a
        // kernel one stays until deleted.
        drop(r.device);
        if kernel && let Err(e) = self.links.delete(&name).await {
            tracing::warn!("peering {}: {e:#}", r.config.name);
        }
    }

    /// Brings the peerings to `wanted`, except removals (see
    /// [`Peerings::remove_absent`]): new ones are made, changed ones get
    /// only what changed (an interface or backend changed is a new
    /// interface). Every peering is tried; the errors are returned
    /// together, and a peering that failed is left out whole (the next
    /// reload tries again).
    pub async fn apply(&mut self, wanted: &[Peering]) -> Result<()> {
        let mut errors = Vec::new();
        for p in wanted {
            let at = self.running.iter().position(|r| r.config.name == p.name);
            let result = match at {
                None => self.create(p).await.map(|r| self.running.push(r)),
                Some(i) => self.change(i, p).await,
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

    async fn change(&mut self, i: usize, p: &Peering) -> Result<()> {
        let at = format!("peering {}", p.name);
        let old = &self.running[i].config;
        if old.interface != p.interface || old.backend != p.backend {
            let r = self.running.remove(i);
            tracing::info!(
                "{at}: interface {} → {}: made anew",
                r.config.interface,
                p.interface
            );
            self.remove(r).await;
            let r = self.create(p).await?;
            self.running.push(r);
            return Ok(());
        }
        // The key file is read again: a new key there is a change too.
        let private = load_or_create_private_key(&p.private_key_file)
            .with_context(|| format!("{at}: private_key_file"))?;
        let r = &mut self.running[i];
        let mut changed = Vec::new();
        if private != r.private {
            changed.push("private key");
        }
        if p.listen_port != r.config.listen_port {
            changed.push("listen_port");
        }
        if p.peer_public_key != r.config.peer_public_key {
            changed.push("peer_public_key");
        }
        if p.endpoint != r.config.endpoint {
            changed.push("endpoint");
        }
        if p.persistent_keepalive != r.config.persistent_keepalive {
            changed.push("persistent_keepalive");
        }
        if !changed.is_empty() {
            r.device
                .configure(&desired(p, private))
                .with_context(|| format!("{at}: configuring {}", p.interface))?;
        }
        if p.mtu != r.config.mtu {
            self.links.up(&p.interface, Some(u32::from(p.mtu))).await?;
            changed.push("mtu");
        }
        if p.address != r.config.address {
            self.links.set_addresses(&p.interface, &p.address).await?;
            changed.push("address");
        }
        if p.peer_address != r.config.peer_address {
            changed.push("peer_address");
        }
        if !changed.is_empty() {
            tracing::info!("{at}: changed {}", changed.join(", "));
        }
        r.private = private;
        r.config = p.clone();
        Ok(())
    }

    /// Removes the peerings `wanted` no longer has: interface, addresses
    /// and the routes through it.
    pub async fn remove_absent(&mut self, wanted: &[Peering]) {
        let (keep, gone): (Vec<Running>, Vec<Running>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|r| wanted.iter().any(|p| p.name == r.config.name));
        self.running = keep;
        for r in gone {
            tracing::info!(
                "peering {}: removed, {} deleted",
                r.config.name,
                r.config.interface
            );
            self.remove(r).await;
        }
    }

    /// Removes every peering (the daemon stops).
    pub async fn stop(&mut self) {
        for r in std::mem::take(&mut self.running) {
            self.remove(r).await;
        }
    }

    /// `show peerings`: a JSON object per peering, without its session
    /// (the daemon adds that from `show protocols`).
    pub fn status(&self) -> Vec<Value> {
        self.running
            .iter()
            .map(|r| {
                let p = &r.config;
                let status = r.device.status().ok();
                let peer = status.as_ref().and_then(|s| s.peer(&p.peer_public_key));
                let handshake = peer
                    .and_then(|s| s.last_handshake)
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs());
                json!({
                    "name": p.name,
                    "interface": p.interface,
                    "backend": match r.device.backend() {
                        Backend::Kernel => "kernel",
                        _ => "userspace",
                    },
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
                    "last_handshake": handshake.map(crate::show::utc_text),
                    "last_handshake_unix": handshake,
                    "handshake_age": handshake.map(|h| {
                        SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map(|n| n.as_secs().saturating_sub(h))
                            .unwrap_or(0)
                    }),
                    "rx_bytes": peer.map(|s| s.rx_bytes).unwrap_or(0),
                    "tx_bytes": peer.map(|s| s.tx_bytes).unwrap_or(0),
                })
            })
            .collect()
    }
}
