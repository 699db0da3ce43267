//! Home and mobile routers for the lab: a node behind a NAT on a switch,
//! as nodes "anywhere" are (seed 003's roaming pi0, seed 004's laptops).

use anyhow::Result;

use crate::{Iface, Lab, Node};

/// How a NAT maps a private address and port to a public one, in the
/// terms of RFC 4787.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Endpoint-independent: one public port per private socket whatever
    /// the destination (Linux `masquerade`, most home routers). Its
    /// filtering is still address- and port-dependent: a packet gets in
    /// only from where the inside sent to.
    EndpointIndependent,
    /// Endpoint-dependent ("symmetric"): a new random public port for
    /// each destination (`masquerade random-fully`, carrier-grade NATs).
    EndpointDependent,
}

/// A router with a NAT between the Internet and one node behind it.
pub struct Nat {
    pub router: Node,
    /// The router's public end, on its link to the Internet router: the
    /// address the outside sees the node behind it from.
    pub public: Iface,
    /// The node behind the NAT, with its default route through the router.
    pub inside: Node,
    /// The inside node's end of its link to the router.
    pub lan: Iface,
}

impl Lab {
    /// Adds `name` with a link to `internet`, a router (forwarding is
    /// turned on), and its default route through it: a host on the
    /// Internet. Returns the node and its end of the link.
    pub fn add_on_internet(&self, internet: &Node, name: &str) -> Result<(Node, Iface)> {
        self.enable_forwarding(internet)?;
        let node = self.add_node(name)?;
        let (up, end) = self.link(internet, &node)?;
        self.add_route(&node, &["default", "via", &up.ipv4.to_string()])?;
        Ok((node, end))
    }

    /// Adds `name` behind a new router `name-nat` on `internet` (see
    /// [`Lab::add_on_internet`]), which translates its IPv4 traffic with
    /// `mapping`. The inside node reaches the Internet only through the
    /// router; nothing outside has a route to the inside. Between two such
    /// routers there is one router hop, as between any two homes.
    pub fn add_behind_nat(&self, internet: &Node, name: &str, mapping: Mapping) -> Result<Nat> {
        let (router, public) = self.add_on_internet(internet, &format!("{name}-nat"))?;
        let inside = self.add_node(name)?;
        let (router_lan, lan) = self.link(&router, &inside)?;
        self.add_route(&inside, &["default", "via", &router_lan.ipv4.to_string()])?;
        self.enable_forwarding(&router)?;
        let random = match mapping {
            Mapping::EndpointIndependent => "",
            Mapping::EndpointDependent => " fully-random",
        };
        self.nft_table(
            &router,
            "nat",
            Some(&format!(
                "  chain postrouting {{\n    type nat hook postrouting priority srcnat;\n    \
                 oifname \"{}\" ip saddr {} masquerade{random}\n  }}",
                public.name,
                lan.cidr4()
            )),
        )?;
        Ok(Nat {
            router,
            public,
            inside,
            lan,
        })
    }
}
