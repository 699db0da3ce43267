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
    /// Call before [`Speaker::start`].
    pub fn hold_origination(&mut self) {
        self.hold_statics = true;
    }

    /// Originates the held static routes (once; later calls do nothing).
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
