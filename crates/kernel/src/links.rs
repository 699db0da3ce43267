//! Interfaces the mesh uses: bring a link up with its MTU, make its
//! addresses exactly the wanted ones, and keep routes out of it for the
//! ranges its peers carry (protocol `static`, so ours are told apart).

use std::net::IpAddr;

use anyhow::{Context, Result};
use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::route::{RouteAttribute, RouteProtocol, RouteScope};
use rtnetlink::packet_route::rule::{RuleAttribute, RuleFlags, RuleMessage};
use rtnetlink::{Handle, IpVersion, LinkUnspec, RouteMessageBuilder};

/// Rule priorities of the default route through a tunnel (below the
/// kernel's `main` at 32766, above anything `ip rule add` picks by
/// default for a first rule).
const SUPPRESS_PRIORITY: u32 = 30999;
const MARK_PRIORITY: u32 = 31000;

/// Writes a sysctl (`net.ipv4.ip_forward`, ...).
pub fn sysctl(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&path, value).with_context(|| format!("sysctl {key}={value}"))
}

pub struct Links {
    handle: Handle,
}

impl Links {
    /// Opens a netlink connection (its task runs on the current runtime).
    pub fn connect() -> Result<Links> {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("cannot open a netlink socket")?;
        tokio::spawn(connection);
        Ok(Links { handle })
    }

    /// The overlay's links (bridge, VXLAN ports) over this connection.
    pub fn overlay(&self) -> crate::overlay::OverlayLinks<'_> {
        crate::overlay::OverlayLinks {
            handle: &self.handle,
        }
    }

    pub async fn index(&self, name: &str) -> Result<u32> {
        crate::link_index(&self.handle, name).await
    }

    /// Sets the link up, with this MTU when given.
    pub async fn up(&self, name: &str, mtu: Option<u32>) -> Result<()> {
        let index = self.index(name).await?;
        let mut message = LinkUnspec::new_with_index(index).up();
        if let Some(mtu) = mtu {
            message = message.mtu(mtu);
        }
        self.handle
            .link()
            .set(message.build())
            .execute()
            .await
            .with_context(|| format!("setting {name} up"))
    }

    /// Deletes the link `name`; one that is gone already is fine.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let Ok(index) = self.index(name).await else {
            return Ok(());
        };
        crate::delete_link(&self.handle, index, name).await
    }

    /// The host's addresses of global scope on every interface but
    /// `except` (by name): where else a peer may reach this host. Loopback,
    /// link-local and unspecified addresses are left out.
    pub async fn host_addresses(&self, except: &str) -> Result<Vec<IpAddr>> {
        let skip = self.index(except).await.ok();
        let all: Vec<_> = self.handle.address().get().execute().try_collect().await?;
        Ok(all
            .iter()
            .filter(|m| Some(m.header.index) != skip)
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            })
            .filter(|ip| {
                !ip.is_loopback()
                    && !ip.is_unspecified()
                    && !ip.is_multicast()
                    && match ip {
                        IpAddr::V4(v4) => !v4.is_link_local(),
                        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 != 0xfe80,
                    }
            })
            .collect())
    }

    /// Makes the interface's addresses exactly `wanted` (IPv6 link-local
    /// addresses are left alone).
    pub async fn set_addresses(&self, name: &str, wanted: &[IpNet]) -> Result<()> {
        let index = self.index(name).await?;
        let current: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await?;
        let mut have = Vec::new();
        for message in current {
            let addr = message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            let Some(addr) = addr else { continue };
            if let IpAddr::V6(v6) = addr
                && v6.segments()[0] & 0xffc0 == 0xfe80
            {
                continue;
            }
            let net = IpNet::new(addr, message.header.prefix_len)
                .with_context(|| format!("address {addr}/{}", message.header.prefix_len))?;
            if wanted.contains(&net) {
                have.push(net);
            } else {
                self.handle
                    .address()
                    .del(message)
                    .execute()
                    .await
                    .with_context(|| format!("removing {net} from {name}"))?;
            }
        }
        for net in wanted.iter().filter(|n| !have.contains(n)) {
            self.handle
                .address()
                .add(index, net.addr(), net.prefix_len())
                .replace()
                .execute()
                .await
                .with_context(|| format!("adding {net} to {name}"))?;
        }
        Ok(())
    }

    /// Makes the routes out of `name` with protocol `static` exactly
    /// `wanted` (in the main table).
    pub async fn set_device_routes(&self, name: &str, wanted: &[IpNet]) -> Result<()> {
        let index = self.index(name).await?;
        let mut have = Vec::new();
        for family in [rtnetlink::IpVersion::V4, rtnetlink::IpVersion::V6] {
            let filter = match family {
                rtnetlink::IpVersion::V4 => {
                    RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
                }
                rtnetlink::IpVersion::V6 => {
                    RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
                }
            };
            let routes: Vec<_> = self
                .handle
                .route()
                .get(filter)
                .execute()
                .try_collect()
                .await?;
            for route in routes {
                let ours = route.header.protocol == RouteProtocol::Static
                    && route
                        .attributes
                        .iter()
                        .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index));
                if !ours {
                    continue;
                }
                let dest = route.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(d) => Some(d.clone()),
                    _ => None,
                });
                let net = match dest {
                    Some(rtnetlink::packet_route::route::RouteAddress::Inet(v4)) => {
                        IpNet::new(v4.into(), route.header.destination_prefix_length).ok()
                    }
                    Some(rtnetlink::packet_route::route::RouteAddress::Inet6(v6)) => {
                        IpNet::new(v6.into(), route.header.destination_prefix_length).ok()
                    }
                    None if route.header.destination_prefix_length == 0 => Some(
                        if route.header.address_family
                            == rtnetlink::packet_route::AddressFamily::Inet6
                        {
                            "::/0".parse().context("::/0")?
                        } else {
                            "0.0.0.0/0".parse().context("0/0")?
                        },
                    ),
                    _ => None,
                };
                match net {
                    Some(net) if wanted.contains(&net) => have.push(net),
                    _ => {
                        self.handle
                            .route()
                            .del(route)
                            .execute()
                            .await
                            .with_context(|| format!("removing a route from {name}"))?;
                    }
                }
            }
        }
        for net in wanted.iter().filter(|n| !have.contains(n)) {
            let mut message = match net {
                IpNet::V4(v4) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                    .destination_prefix(v4.addr(), v4.prefix_len())
                    .output_interface(index)
                    .protocol(RouteProtocol::Static)
                    .scope(RouteScope::Link)
                    .build(),
                IpNet::V6(v6) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                    .destination_prefix(v6.addr(), v6.prefix_len())
                    .output_interface(index)
                    .protocol(RouteProtocol::Static)
                    .scope(RouteScope::Link)
                    .build(),
            };
            message.header.table = 254;
            self.handle
                .route()
                .add(message)
                .replace()
                .execute()
                .await
                .with_context(|| format!("adding the route {net} dev {name}"))?;
        }
        Ok(())
    }

    /// A default route into the tunnel `name`, the way wg-quick makes one:
    /// the tunnel's own packets carry `mark` and keep using the main table;
    /// every other packet looks in `table`, which routes everything into
    /// the tunnel, except that the main table's more specific routes still
    /// win (`suppress_prefixlength 0`). `v4`/`v6` false removes it.
    pub async fn set_default_through(
        &self,
        name: &str,
        table: u32,
        mark: u32,
        v4: bool,
        v6: bool,
    ) -> Result<()> {
        let index = self.index(name).await?;
        for (version, wanted) in [(IpVersion::V4, v4), (IpVersion::V6, v6)] {
            self.set_rules(version.clone(), wanted, table, mark).await?;
            let mut route = match version {
                IpVersion::V4 => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                    .output_interface(index)
                    .protocol(RouteProtocol::Static)
                    .scope(RouteScope::Link)
                    .build(),
                IpVersion::V6 => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                    .output_interface(index)
                    .protocol(RouteProtocol::Static)
                    .scope(RouteScope::Link)
                    .build(),
            };
            set_route_table(&mut route, table);
            if wanted {
                self.handle
                    .route()
                    .add(route)
                    .replace()
                    .execute()
                    .await
                    .with_context(|| format!("default route dev {name} table {table}"))?;
            } else {
                // Absent already is fine.
                let _ = self.handle.route().del(route).execute().await;
            }
        }
        if v4 {
            // Marked packets must pass reverse-path filtering.
            let _ = sysctl("net.ipv4.conf.all.src_valid_mark", "1");
        }
        Ok(())
    }

    async fn set_rules(
        &self,
        version: IpVersion,
        wanted: bool,
        table: u32,
        mark: u32,
    ) -> Result<()> {
        let rules: Vec<RuleMessage> = self
            .handle
            .rule()
            .get(version.clone())
            .execute()
            .try_collect()
            .await?;
        let find = |priority: u32| {
            rules
                .iter()
                .find(|r| r.attributes.contains(&RuleAttribute::Priority(priority)))
                .cloned()
        };
        for priority in [SUPPRESS_PRIORITY, MARK_PRIORITY] {
            match (find(priority), wanted) {
                (Some(rule), false) => {
                    self.handle.rule().del(rule).execute().await?;
                }
                (None, true) => {
                    let request = self
                        .handle
                        .rule()
                        .add()
                        .priority(priority)
                        .action(rtnetlink::packet_route::rule::RuleAction::ToTable);
                    let mut request = if priority == SUPPRESS_PRIORITY {
                        request.table_id(254)
                    } else {
                        request.table_id(table).fw_mark(mark)
                    };
                    {
                        let message = request.message_mut();
                        message.header.family = match version {
                            IpVersion::V4 => rtnetlink::packet_route::AddressFamily::Inet,
                            IpVersion::V6 => rtnetlink::packet_route::AddressFamily::Inet6,
                        };
                        if priority == SUPPRESS_PRIORITY {
                            message.attributes.push(RuleAttribute::SuppressPrefixLen(0));
                        } else {
                            message.header.flags |= RuleFlags::Invert;
                        }
                    }
                    request
                        .execute()
                        .await
                        .with_context(|| format!("adding rule priority {priority}"))?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn set_route_table(route: &mut rtnetlink::packet_route::route::RouteMessage, table: u32) {
    if table < 256 {
        route.header.table = table as u8;
    } else {
        route.header.table = 252; // RT_TABLE_COMPAT: the real id is the attribute
        route.attributes.push(RouteAttribute::Table(table));
    }
}
