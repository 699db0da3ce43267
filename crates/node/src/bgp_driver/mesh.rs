//! What a border's BGP tells its mesh agent, and what it waits for from
//! it: whether an upstream is ready (`watch_upstream`), the prefixes the
//! `[mesh] export` policy takes (`export_to_mesh`), and the gate that
//! holds our static routes back until the mesh carries traffic
//! (`hold_announcements_until`).

use std::sync::Arc;

use bgp4mesh_bgp::export_set::ExportSet;
use bgp4mesh_bgp::policy::Policy;
use bgp4mesh_bgp::speaker::{RouteChange, Speaker};
use ipnet::IpNet;
use tokio::sync::watch;

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
    /// Whether an eBGP session is up and has sent its routes (End-of-RIB),
    /// for the mesh agent of a border.
    upstream: Option<watch::Sender<bool>>,
    /// Static routes wait until this is true (`hold_announcements_until`).
    pub(super) announce_gate: Option<watch::Receiver<bool>>,
    /// `[mesh] export`: what the mesh is offered, and where it goes.
    export: Option<MeshExport>,
}

impl MeshLink {
    /// A channel that follows [`Speaker::upstream_ready`].
    pub(super) fn watch_upstream(&mut self, ready: bool) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(ready);
        self.upstream = Some(tx);
        rx
    }

    /// From [`bgp4mesh_bgp::speaker::Event::UpstreamReady`].
    pub(super) fn upstream_ready(&self, up: bool) {
        if let Some(tx) = &self.upstream {
            tx.send_if_modified(|v| std::mem::replace(v, up) != up);
        }
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
