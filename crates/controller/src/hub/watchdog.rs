//! The pulse watchdog: a gateway whose pulses stop is marked unhealthy, a
//! relay whose pulses stop is no longer live, and either change is
//! published as a change every node of its network sees (retried when the
//! store failed to record it). It also hands the pairs behind NAT fresh
//! relay credentials every `relays::REFRESH_HOURS`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::{Controller, Failure, now, unreachable_view};
use crate::store::NodeRow;

impl Controller {
    /// Marks gateways whose pulses stopped as unhealthy (and relays as not
    /// live), every 50 ms, for as long as the controller runs.
    pub async fn watch_pulses(self: Arc<Self>) {
        const EVERY: Duration = Duration::from_millis(50);
        /// How often the relay credentials' age is looked at.
        const CREDENTIALS_EVERY: Duration = Duration::from_secs(60);
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        let mut credentials_checked = Instant::now();
        loop {
            tick.tick().await;
            if credentials_checked.elapsed() >= CREDENTIALS_EVERY {
                credentials_checked = Instant::now();
                self.refresh_relay_credentials().await;
            }
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

    /// Pairs behind NAT whose relay credentials were handed out
    /// `REFRESH_HOURS` ago get new ones (valid 24 to 25 hours), one change
    /// per network.
    async fn refresh_relay_credentials(&self) {
        let t = now();
        let due = self.hub.relay_refresh_due(t);
        if due.is_empty() {
            return;
        }
        let _write = self.write.lock().await;
        for (netid, relay) in due {
            match self
                .store
                .note_change(&netid, &relay, "relay_credentials", t)
                .await
            {
                Ok(revision) => {
                    self.catch_up(revision).await;
                    self.hub.refresh_relays(revision, &netid, &relay, t);
                }
                Err(e) => tracing::warn!(network = %netid, "refreshing relay credentials: {e}"),
            }
        }
    }

    /// A gateway's health changed, or a relay came or went: a change every
    /// node of the network sees.
    pub(crate) async fn publish_health(&self, node: &NodeRow) -> Result<(), Failure> {
        let key = (node.network.clone(), node.id.clone());
        let view = self.hub.node(&node.network, &node.id);
        let gateway = view.as_ref().is_none_or(|v| v.gateway.is_some());
        let why = if gateway { "gateway_health" } else { "relay" };
        let revision = match self
            .store
            .note_change(&node.network, &node.id, why, now())
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
        self.catch_up(revision).await;
        self.hub
            .node_changed(revision, &node.network, &node.id, |old| {
                old.unwrap_or_else(|| unreachable_view(&id))
            });
        if gateway {
            tracing::info!(node = %node.name, "gateway health changed");
        }
        if let Some(v) = view
            && v.published.relay != v.live_relay()
        {
            match v.live_relay() {
                Some(address) => tracing::info!(node = %node.name, %address, "relay live"),
                None => tracing::info!(node = %node.name, "relay no longer live"),
            }
        }
        Ok(())
    }
}
