//! Whether the speaker can route to the outside: some eBGP session is up
//! and what it sent up to its End-of-RIB is installed.

use super::{Event, Speaker};
use crate::rib::NeighborId;
use crate::session::State;

impl Speaker {
    /// The driver has installed everything it was given up to the
    /// [`Event::EndOfRib`] of `neighbor` (a driver without a forwarding
    /// table says so at once). An eBGP neighbour counts for
    /// [`Event::UpstreamReady`] from then until its session goes down.
    pub fn end_of_rib_installed(&mut self, neighbor: NeighborId) {
        if let Some(n) = self.neighbors.get_mut(neighbor)
            && std::mem::take(&mut n.eor_installing)
        {
            n.eor_installed = true;
        }
        self.update_upstream();
    }

    /// Whether some eBGP neighbour is up with its End-of-RIB installed
    /// (the last [`Event::UpstreamReady`]).
    pub fn upstream_ready(&self) -> bool {
        self.upstream_ready
    }

    /// Forgets End-of-RIBs of sessions that are gone, and reports a change
    /// of [`Speaker::upstream_ready`].
    pub(super) fn update_upstream(&mut self) {
        let asn = self.config.asn;
        let mut ready = false;
        for n in self.neighbors.iter_mut() {
            if n.removed || n.session.state() != State::Established {
                n.eor_installing = false;
                n.eor_installed = false;
            }
            ready |= n.eor_installed && n.config.remote_as != asn;
        }
        if ready != self.upstream_ready {
            self.upstream_ready = ready;
            self.events.push_back(Event::UpstreamReady(ready));
        }
    }
}
