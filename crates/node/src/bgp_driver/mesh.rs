//! What a border's BGP tells its mesh agent, and what it waits for from
//! it: whether an upstream is ready (`watch_upstream`), the prefixes the
//! `[mesh] export` policy takes (`export_to_mesh`), and the gate that
//! holds our static routes back while the mesh does not carry traffic
//! (`hold_announcements_until`).

use std::sync::Arc;

use bgp4mesh_api::UpstreamFamilies;
use bgp4mesh_bgp::export_set::ExportSet;
use bgp4mesh_bgp::policy::Policy;
use bgp4mesh_bgp::speaker::{RouteChange, Speaker, Upstream};
use ipnet::IpNet;
use tokio::sync::watch;

/// The speaker's upstream as the agent takes it.
fn families(up: Upstream) -> UpstreamFamilies {
    UpstreamFamilies {
        ipv4: up.ipv4,
        ipv6: up.ipv6,
    }
}

/// A border's BGP-learned prefixes for its mesh, sent to the agent.
struct MeshExport {
    set: ExportSet,
    tx: watch::Sender<Vec<IpNet>>,
    /// `set.left_out()` when we last warned about it.
    warned_left_out: usize,
}

/// The channels to and from the mesh agent (all unset without a mesh).
#[derive(Default)]
pub(super) struct MeshLink {
    /// Per family, whether an eBGP session is up and has sent its routes
    /// (End-of-RIB), for the mesh agent of a border.
    upstream: Option<watch::Sender<UpstreamFamilies>>,
    /// Static routes are announced while this is true and held back while
    /// it is false (`hold_announcements_until`); None without a gate, or
    /// once the agent dropped its sender.
    pub(super) announce_gate: Option<watch::Receiver<bool>>,
    /// `[mesh] export`: what the mesh is offered, and where it goes.
    export: Option<MeshExport>,
}

impl MeshLink {
    /// A channel that follows [`Speaker::upstream_ready`].
    pub(super) fn watch_upstream(&mut self, ready: Upstream) -> watch::Receiver<UpstreamFamilies> {
        let (tx, rx) = watch::channel(families(ready));
        self.upstream = Some(tx);
        rx
    }

    /// From [`bgp4mesh_bgp::speaker::Event::UpstreamReady`].
    pub(super) fn upstream_ready(&self, up: Upstream) {
        let up = families(up);
        if let Some(tx) = &self.upstream {
            tx.send_if_modified(|v| std::mem::replace(v, up) != up);
        }
    }

    /// Waits until the announcement gate differs from `held` (the
    /// speaker's [`Speaker::origination_held`]): `Some(open)` then, or None
    /// once the agent dropped its sender. Never returns without a gate.
    /// Cancel-safe: it compares the gate's current value, so a change seen
    /// by a cancelled wait is found again by the next.
    pub(super) async fn announce_gate_moved(&mut self, held: bool) -> Option<bool> {
        let Some(gate) = self.announce_gate.as_mut() else {
            return std::future::pending().await;
        };
        // Open while held, or closed while announcing.
        let moved = gate.wait_for(|open| *open == held).await.map(|open| *open);
        // Gone, whatever its last word: announce, as without a gate.
        if gate.has_changed().is_err() {
            return None;
        }
        moved.ok()
    }

    /// Starts the export to the mesh: what `policy` takes of the speaker's
    /// best routes, at most `limit` prefixes.
    pub(super) fn start_export(
        &mut self,
        speaker: &Speaker,
        policy: Arc<Policy>,
        limit: usize,
    ) -> watch::Receiver<Vec<IpNet>> {
        let (tx, rx) = watch::channel(Vec::new());
        let mut set = ExportSet::new(policy.clone(), limit);
        set.rebuild(speaker, policy, limit);
        self.export = Some(MeshExport {
            set,
            tx,
            warned_left_out: 0,
        });
        rx
    }

    /// After a reload: the export follows the new `[mesh] export`.
    pub(super) fn reconfigure_export(
        &mut self,
        speaker: &Speaker,
        new: Option<(Arc<Policy>, usize)>,
    ) {
        match (&mut self.export, new) {
            // Neighbour numbers may have changed with the policy: start over.
            (Some(export), Some((policy, limit))) => {
                export.set.rebuild(speaker, policy, limit);
                export.warned_left_out = 0;
            }
            (Some(export), None) => {
                let none = Arc::new(Policy::reject_all());
                export.set.rebuild(speaker, none, 1);
                tracing::warn!(
                    "mesh.export removed: the mesh is offered nothing until the next start"
                );
            }
            (None, Some(_)) => {
                tracing::warn!("mesh.export added: takes effect at the next start");
            }
            (None, None) => {}
        }
    }

    /// A best-route change, for the export set.
    pub(super) fn route_changed(&mut self, speaker: &Speaker, change: &RouteChange) {
        if let Some(export) = self.export.as_mut() {
            export.set.route_changed(speaker, change);
        }
    }

    /// Hands a changed mesh export to the agent.
    pub(super) fn send_export(&mut self) {
        let Some(export) = self.export.as_mut() else {
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
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    use super::*;

    /// Polls a future once: whether it is done without waiting.
    fn poll_once<F: Future>(f: F) -> Poll<F::Output> {
        let mut f = std::pin::pin!(f);
        f.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn the_announce_gate_is_followed_both_ways_until_the_agent_lets_go() {
        let mut link = MeshLink::default();
        assert!(
            poll_once(link.announce_gate_moved(true)).is_pending(),
            "no gate: nothing to follow"
        );
        let (tx, rx) = watch::channel(false);
        link.announce_gate = Some(rx);
        assert!(poll_once(link.announce_gate_moved(true)).is_pending());
        tx.send_replace(true);
        assert_eq!(
            poll_once(link.announce_gate_moved(true)),
            Poll::Ready(Some(true)),
            "opened while held: announce"
        );
        assert!(poll_once(link.announce_gate_moved(false)).is_pending());
        tx.send_replace(false);
        assert_eq!(
            poll_once(link.announce_gate_moved(false)),
            Poll::Ready(Some(false)),
            "closed while announcing: withdraw"
        );
        // A change a dropped wait saw is found again by the next one.
        assert!(poll_once(link.announce_gate_moved(true)).is_pending());
        tx.send_replace(true);
        assert_eq!(
            poll_once(link.announce_gate_moved(true)),
            Poll::Ready(Some(true))
        );
        // A flap that ends where it began asks for nothing.
        tx.send_replace(false);
        tx.send_replace(true);
        assert!(poll_once(link.announce_gate_moved(false)).is_pending());
        // The agent gone: announce (whatever the gate said last).
        tx.send_replace(false);
        drop(tx);
        assert_eq!(
            poll_once(link.announce_gate_moved(false)),
            Poll::Ready(None)
        );
    }
}
