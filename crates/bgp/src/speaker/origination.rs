//! Routes we originate: static routes (which may be held back), the
//! networks of our interfaces, and routes learnt from the kernel.

use std::net::IpAddr;
use std::time::Instant;

use hashbrown::{HashMap, HashSet};
use ipnet::IpNet;

use super::{Speaker, StaticKind, StaticRoute};
use crate::rib::{Attrs, PathSource};
use crate::wire::{NextHop, Origin, PathAttributes};

impl Speaker {
    /// Keeps the static routes out of the Loc-RIB (so nothing announces
    /// them) until [`Speaker::release_origination`]: a border announces its
    /// block only once the mesh behind it is ready to take the traffic.
    ///
    /// Before [`Speaker::start`] the statics are simply not originated.
    /// After it, the ones originated are withdrawn as if a reload had
    /// removed them: gone from the Loc-RIB (an [`Event::Route`] for each)
    /// and withdrawn from every neighbour they were announced to. While
    /// held, a session that comes up is sent none of them, and statics a
    /// reload adds wait for the release. Holding what is held does
    /// nothing.
    ///
    /// [`Event::Route`]: super::Event::Route
    pub fn hold_origination(&mut self, now: Instant) {
        if self.hold_statics {
            return;
        }
        self.hold_statics = true;
        if self.started {
            for i in 0..self.statics.len() {
                if let Some(route) = &self.statics[i] {
                    let prefix = route.prefix;
                    self.rib_update(prefix, PathSource::Static(i as u32), None);
                }
            }
            self.flush();
            self.drain_sessions(now);
        }
    }

    /// Originates the held static routes (the current ones, reloads
    /// included) and announces them to the established sessions. Releasing
    /// what is not held does nothing; hold and release may alternate any
    /// number of times.
    pub fn release_origination(&mut self, now: Instant) {
        if !self.hold_statics {
            return;
        }
        self.hold_statics = false;
        if self.started {
            self.originate_statics();
            self.flush();
            self.drain_sessions(now);
        }
    }

    /// Whether the static routes are held back ([`Speaker::hold_origination`]).
    pub fn origination_held(&self) -> bool {
        self.hold_statics
    }

    pub(super) fn originate_statics(&mut self) {
        for i in 0..self.statics.len() {
            if let Some(route) = self.statics[i].clone() {
                self.originate_static(i, &route);
            }
        }
    }

    fn static_attrs(&mut self, route: &StaticRoute) -> Attrs {
        let next_hop = match route.kind {
            StaticKind::Via(IpAddr::V4(a)) => Some(NextHop::V4(a)),
            StaticKind::Via(IpAddr::V6(a)) => Some(NextHop::V6 {
                global: a,
                link_local: None,
            }),
            _ => None,
        };
        self.interner.intern(PathAttributes {
            origin: Origin::Igp,
            next_hop,
            ..PathAttributes::default()
        })
    }

    pub(super) fn originate_static(&mut self, index: usize, route: &StaticRoute) {
        let attrs = self.static_attrs(route);
        self.rib_update(route.prefix, PathSource::Static(index as u32), Some(attrs));
    }

    /// The networks of our interfaces to originate (BIRD's `protocol
    /// direct`): new ones are added, missing ones withdrawn.
    pub fn set_connected(&mut self, now: Instant, prefixes: &[IpNet]) {
        let wanted: HashSet<IpNet> = prefixes.iter().copied().collect();
        let gone: Vec<IpNet> = self.connected.difference(&wanted).copied().collect();
        let new: Vec<IpNet> = wanted.difference(&self.connected).copied().collect();
        if gone.is_empty() && new.is_empty() {
            return;
        }
        for prefix in gone {
            self.connected.remove(&prefix);
            self.rib_update(prefix, PathSource::Connected, None);
        }
        let attrs = self.interner.intern(PathAttributes {
            origin: Origin::Igp,
            ..PathAttributes::default()
        });
        for prefix in new {
            self.connected.insert(prefix);
            self.rib_update(prefix, PathSource::Connected, Some(attrs.clone()));
        }
        self.flush();
        self.drain_sessions(now);
    }

    /// Routes learnt from the kernel's table (`[kernel] learn`): prefix and
    /// gateway. New ones are originated, missing or changed ones updated.
    pub fn set_kernel_routes(&mut self, now: Instant, routes: &[(IpNet, Option<IpAddr>)]) {
        let wanted: HashMap<IpNet, Option<IpAddr>> = routes.iter().copied().collect();
        if wanted == self.kernel_routes {
            return;
        }
        let gone: Vec<IpNet> = self
            .kernel_routes
            .keys()
            .filter(|p| !wanted.contains_key(*p))
            .copied()
            .collect();
        for prefix in gone {
            self.kernel_routes.remove(&prefix);
            self.rib_update(prefix, PathSource::Kernel, None);
        }
        for (prefix, gateway) in wanted {
            if self.kernel_routes.get(&prefix) == Some(&gateway) {
                continue;
            }
            let next_hop = gateway.map(|g| match g {
                IpAddr::V4(a) => NextHop::V4(a),
                IpAddr::V6(a) => NextHop::V6 {
                    global: a,
                    link_local: None,
                },
            });
            let attrs = self.interner.intern(PathAttributes {
                origin: Origin::Incomplete,
                next_hop,
                ..PathAttributes::default()
            });
            self.kernel_routes.insert(prefix, gateway);
            self.rib_update(prefix, PathSource::Kernel, Some(attrs));
        }
        self.flush();
        self.drain_sessions(now);
    }
}
