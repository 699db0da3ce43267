//! Following the other controllers on one PostgreSQL: every change any
//! controller commits has a revision from the database (writes take the
//! store's write lock, so revisions are committed in order), and each
//! controller applies them all to its hub in revision order. Its own
//! writes first catch up with what others committed before them; a task
//! looks for others' changes every [`FOLLOW_EVERY`].
//!
//! A change of a node is applied as the database has that node now (its
//! row and gateway; gone, it is removed); what a controller keeps in
//! memory only (reports, pulses, relay keys) stays with the controller the
//! node's agent talks to, and reaches the others as a change with nothing
//! new in it. SQLite has one controller: nothing to follow.

use std::sync::Arc;
use std::time::Duration;

use crate::api::Controller;
use crate::hub::NodeView;
use crate::store::{ChangeRow, Dialect, StoreError};

/// How often a controller looks for the others' changes.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(100);

impl Controller {
    /// Applies the other controllers' changes as they are committed, for
    /// as long as the controller runs (PostgreSQL only).
    pub async fn follow_others(self: Arc<Self>) {
        if self.store.dialect() != Dialect::Postgres {
            return;
        }
        let mut tick = tokio::time::interval(FOLLOW_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let latest = match self.store.revision().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("following the other controllers: {e}");
                    continue;
                }
            };
            if latest <= self.hub.revision() {
                continue;
            }
            let _write = self.write.lock().await;
            self.catch_up(latest + 1).await;
        }
    }

    /// Applies every change the others committed so far (the caller holds
    /// the write lock): before an admin write looks a node up, so a node
    /// made through another controller a moment ago is there.
    pub(crate) async fn catch_up_all(&self) {
        if self.store.dialect() != Dialect::Postgres {
            return;
        }
        match self.store.revision().await {
            Ok(latest) => self.catch_up(latest + 1).await,
            Err(e) => tracing::warn!("following the other controllers: {e}"),
        }
    }

    /// Applies the changes committed before revision `before` that the hub
    /// does not have (the caller holds the write lock). A failure is logged
    /// and left to the next call.
    pub(crate) async fn catch_up(&self, before: u64) {
        if self.store.dialect() != Dialect::Postgres {
            return;
        }
        let from = self.hub.revision();
        if before <= from + 1 {
            return;
        }
        let changes = match self.store.changes(from, before - 1).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("reading the other controllers' changes: {e}");
                return;
            }
        };
        for change in changes {
            if let Err(e) = self.apply_other(&change).await {
                tracing::warn!(
                    revision = change.revision,
                    "applying another controller's change: {e}"
                );
                return;
            }
        }
    }

    async fn apply_other(&self, change: &ChangeRow) -> Result<(), StoreError> {
        let revision = change.revision;
        let Some(id) = &change.node_id else {
            // A network's own change: made or deleted.
            match self.store.network(&change.network).await? {
                Some(network) if !self.hub.has_network(&network.netid) => {
                    self.hub.network_created(revision, network);
                }
                Some(_) => self.hub.advance(revision),
                None => self.hub.network_deleted(revision, &change.network),
            }
            return Ok(());
        };
        match self.store.node(id).await? {
            Some(row) => {
                let gateway = self.store.gateway(id).await?;
                let netid = row.network.clone();
                self.hub
                    .node_changed(revision, &netid, id, |old| match old {
                        Some(mut view) => {
                            view.row = row;
                            view.gateway = gateway;
                            view
                        }
                        None => NodeView::new(row, gateway),
                    });
            }
            None => self.hub.node_removed(revision, &change.network, id),
        }
        Ok(())
    }
}
