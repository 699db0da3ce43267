//! Whether the speaker can route to the outside, per address family: some
//! eBGP session of that family is up and what it sent up to its
//! End-of-RIB is installed.

use super::{Event, Speaker};
use crate::rib::NeighborId;
use crate::session::State;
use crate::wire::AFI_IPV6;

/// Which address families the speaker can route to the outside
/// ([`Event::UpstreamReady`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Upstream {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl Upstream {
    /// Ready for some family.
    pub fn any(&self) -> bool {
        self.ipv4 || self.ipv6
    }
}

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

    /// Per family, whether some eBGP neighbour that negotiated it is up
    /// with its End-of-RIB installed (the last [`Event::UpstreamReady`]).
    pub fn upstream_ready(&self) -> Upstream {
        self.upstream_ready
    }

    /// Forgets End-of-RIBs of sessions that are gone, and reports a change
    /// of [`Speaker::upstream_ready`].
    pub(super) fn update_upstream(&mut self) {
        let asn = self.config.asn;
        let mut ready = Upstream::default();
        for n in self.neighbors.iter_mut() {
            if n.removed || n.session.state() != State::Established {
                n.eor_installing = false;
                n.eor_installed = false;
            }
            if !(n.eor_installed && n.config.remote_as != asn) {
                continue;
            }
            // The families it carries: an IPv4 session with IPv6 unicast
            // is an IPv6 upstream too.
            for family in n.session.negotiated().map_or(&[][..], |x| &x.families[..]) {
                if family.afi == AFI_IPV6 {
                    ready.ipv6 = true;
                } else {
                    ready.ipv4 = true;
                }
            }
        }
        if ready != self.upstream_ready {
            self.upstream_ready = ready;
            self.events.push_back(Event::UpstreamReady(ready));
        }
    }
}
