//! The pulse watchdog: a gateway whose pulses stop is marked unhealthy,
//! and a gateway's health change is published as a change every node of
//! its network sees (retried when the store failed to record it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::{Controller, Failure, now, unreachable_view};
use crate::store::NodeRow;

impl Controller {
    /// Marks gateways whose pulses stopped as unhealthy, every 50 ms, for
    /// as long as the controller runs.
    pub async fn watch_pulses(self: Arc<Self>) {
        const EVERY: Duration = Duration::from_millis(50);
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        loop {
            tick.tick().await;
            // A watchdog that was itself held up (an overloaded runtime)
            // saw nothing: pulses may be waiting to be handled.
            let late = last.elapsed() > EVERY * 3;
            last = Instant::now();
            if late {
                continue;
            }
            let quiet = self
                .hub
                .silence_quiet_gateways(Instant::now(), bgp4mesh_api::PULSE_LOST);
            let retry: Vec<(String, String)> = self
                .unpublished
                .lock()
                .map(|left| left.iter().cloned().collect())
                .unwrap_or_default();
            if quiet.is_empty() && retry.is_empty() {
                continue;
            }
            let _write = self.write.lock().await;
            let marked = quiet.iter().map(|q| (q, true));
            for ((netid, id), silenced) in marked.chain(retry.iter().map(|r| (r, false))) {
                let Some(node) = self.hub.node(netid, id) else {
                    if let Ok(mut left) = self.unpublished.lock() {
                        left.remove(&(netid.clone(), id.clone()));
                    }
                    continue;
                };
                if silenced {
                    tracing::warn!(
                        node = %node.row.name,
                        "no pulse for {:?}: taken as dead",
                        bgp4mesh_api::PULSE_LOST
                    );
                }
                if let Err(e) = self.publish_health(&node.row).await {
                    tracing::warn!(node = %node.row.name, "publishing its health: {}", e.message);
                }
            }
        }
    }

    /// A gateway's health changed: a change every node of the network sees.
    pub(crate) async fn publish_health(&self, node: &NodeRow) -> Result<(), Failure> {
        let key = (node.network.clone(), node.id.clone());
        let revision = match self
            .store
            .note_change(&node.network, &node.id, "gateway_health", now())
            .await
        {
            Ok(r) => r,
            Err(e) => {
                if let Ok(mut left) = self.unpublished.lock() {
                    left.insert(key);
                }
                return Err(e.into());
            }
        };
        if let Ok(mut left) = self.unpublished.lock() {
            left.remove(&key);
        }
        let id = node.id.clone();
        self.hub
            .node_changed(revision, &node.network, &node.id, |old| {
                old.unwrap_or_else(|| unreachable_view(&id))
            });
        tracing::info!(node = %node.name, "gateway health changed");
        Ok(())
    }
}
