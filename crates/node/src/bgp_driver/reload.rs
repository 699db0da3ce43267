//! `bgp4mesh bgp reload` and SIGHUP: the config file read again and the
//! difference applied, without touching what did not change.

use std::time::Instant;

use super::BgpDriver;

impl BgpDriver {
    /// Re-reads the config file and applies the difference.
    pub(super) fn reload(&mut self, now: Instant) -> Result<(), String> {
        let loaded =
            crate::config::NodeConfig::load(&self.config_path).map_err(|e| format!("{e:#}"))?;
        let Some(mut bgp) = loaded.bgp else {
            return Err("the new config has no [bgp] section; keeping the running one".into());
        };
        if !bgp.next_hop_ipv6_auto.is_empty() {
            // A few netlink requests, waited for here: the new config is
            // not applied without them.
            use tokio::runtime::{Handle, RuntimeFlavor};
            let handle = Handle::current();
            if handle.runtime_flavor() != RuntimeFlavor::MultiThread {
                return Err(
                    "next_hop_ipv6 = \"auto\" is looked up on reload only by the daemon".into(),
                );
            }
            tokio::task::block_in_place(|| {
                handle.block_on(super::kernel::resolve_next_hop_ipv6(&mut bgp))
            })
            .map_err(|e| format!("{e:#}"))?;
        }
        if bgp.listen != self.config.listen {
            tracing::warn!("bgp.listen changed: takes effect at the next start");
        }
        for warning in &bgp.warnings {
            tracing::warn!("{warning}");
        }
        let old = self.connections.set_transports(&bgp);
        self.speaker.reconfigure(now, bgp.speaker.clone());
        // Changed socket options take effect on a new connection.
        for (name, t) in self.connections.transports() {
            if old.get(name).is_some_and(|o| o != t)
                && let Some(id) = self.speaker.neighbor_by_name(name)
            {
                self.speaker.restart(now, id, "transport settings changed");
            }
        }
        self.config = bgp;
        self.mesh
            .reconfigure_export(&self.speaker, self.config.mesh_export.clone());
        self.mesh.send_export();
        if let Err(e) = self.bfd.sync(now, &self.config) {
            tracing::warn!("bfd: {e}");
        }
        tracing::info!("configuration reloaded from {}", self.config_path.display());
        Ok(())
    }
}
