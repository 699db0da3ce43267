//! The one place bgp4mesh changes the kernel: routes over rtnetlink.
//!
//! [`Fib`] installs routes with protocol `bgp` in a configured table and
//! metric, replacing in place (never delete-then-add), as one multipath
//! route for ECMP, with a preferred source when configured. It remembers
//! what it installed, so `show route` can say so and a restart can remove
//! what a previous run left ([`Fib::remove_stale`]). Requests are pipelined
//! (many in flight) so a full table does not wait for one ACK at a time.

#![forbid(unsafe_code)]

pub mod links;
pub mod nat;
pub mod overlay;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, bail};
use futures::stream::{self, StreamExt, TryStreamExt};
use ipnet::IpNet;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol, RouteType};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder, RouteNextHopBuilder};

/// The index of the interface called `name`.
pub(crate) async fn link_index(handle: &Handle, name: &str) -> Result<u32> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    let link = links
        .try_next()
        .await
        .with_context(|| format!("no interface named {name}"))?
        .with_context(|| format!("no interface named {name}"))?;
    Ok(link.header.index)
}

/// Deletes the link with `index` (called `name` in messages).
pub(crate) async fn delete_link(handle: &Handle, index: u32, name: &str) -> Result<()> {
    handle
        .link()
        .del(index)
        .execute()
        .await
        .with_context(|| format!("deleting {name}"))
}

/// How many netlink requests may be in flight at once.
const PIPELINE: usize = 256;

/// Where routes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FibConfig {
    /// Routing table (254 = main).
    pub table: u32,
    /// Route priority (`ip route … metric N`).
    pub metric: u32,
    /// Preferred source address for IPv4 / IPv6 routes (`src` in `ip route`).
    pub prefsrc_ipv4: Option<Ipv4Addr>,
    pub prefsrc_ipv6: Option<Ipv6Addr>,
}

impl Default for FibConfig {
    fn default() -> Self {
        FibConfig {
            table: 254,
            metric: 32,
            prefsrc_ipv4: None,
            prefsrc_ipv6: None,
        }
    }
}

/// What a route does with packets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// Forward via these gateways (more than one: ECMP). An IPv6 gateway for
    /// an IPv4 prefix is RFC 8950's case and needs Linux 5.2.
    Via(Vec<IpAddr>),
    /// Via these gateways out of this interface: IPv6 link-local gateways,
    /// which mean something only with their interface (a BGP session over
    /// a link-local address, as DN42 peerings run).
    ViaOn(Vec<IpAddr>, String),
    /// Out of this interface, no gateway.
    Device(String),
    Blackhole,
    Unreachable,
}

/// Counts of one [`Fib::apply`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyReport {
    pub installed: usize,
    pub removed: usize,
    pub failed: usize,
}

pub struct Fib {
    handle: Handle,
    config: FibConfig,
    installed: HashMap<IpNet, Target>,
    /// Routes a previous run left, kept through a graceful restart until
    /// `flush_stale` (those installed again stop being stale).
    stale: std::collections::HashSet<IpNet>,
    ifindex: HashMap<String, u32>,
}

impl Fib {
    /// Opens a netlink connection (its task runs on the current tokio
    /// runtime).
    pub fn connect(config: FibConfig) -> Result<Fib> {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("cannot open a netlink socket")?;
        tokio::spawn(connection);
        Ok(Fib {
            handle,
            config,
            installed: HashMap::new(),
            stale: Default::default(),
            ifindex: HashMap::new(),
        })
    }

    pub fn config(&self) -> &FibConfig {
        &self.config
    }

    /// Routes this process installed, by prefix.
    pub fn installed(&self) -> &HashMap<IpNet, Target> {
        &self.installed
    }

    /// Takes over the `proto bgp` routes a previous run left in our table
    /// without touching them (graceful restart: forwarding goes on). They
    /// stay until installed again or `flush_stale`. Returns how many.
    pub async fn adopt_stale(&mut self) -> Result<usize> {
        let routes = self.list_ours().await?;
        self.stale = routes.iter().filter_map(route_prefix).collect();
        Ok(self.stale.len())
    }

    /// Deletes the adopted routes that were not installed again.
    pub async fn flush_stale(&mut self) -> ApplyReport {
        let stale: Vec<(IpNet, Option<Target>)> = self.stale.iter().map(|p| (*p, None)).collect();
        self.apply(stale).await
    }

    async fn list_ours(&self) -> Result<Vec<RouteMessage>> {
        let table = self.config.table;
        Ok(dump_routes(&self.handle)
            .await?
            .into_iter()
            .filter(|r| r.header.protocol == RouteProtocol::Bgp && table_of(r) == table)
            .collect())
    }

    /// Deletes every `proto bgp` route in our table: what a previous run
    /// left behind. Returns how many.
    pub async fn remove_stale(&mut self) -> Result<usize> {
        let stale = self.list_ours().await?;
        let count = stale.len();
        let handle = self.handle.clone();
        stream::iter(stale)
            .map(|route| {
                let handle = handle.clone();
                async move { handle.route().del(route).execute().await }
            })
            .buffer_unordered(PIPELINE)
            .for_each(|_| async {})
            .await;
        self.installed.clear();
        Ok(count)
    }

    /// Installs (Some) or removes (None) routes, all requests pipelined.
    /// A route already installed the same way is not touched.
    pub async fn apply(&mut self, changes: Vec<(IpNet, Option<Target>)>) -> ApplyReport {
        let mut report = ApplyReport::default();
        let mut requests: Vec<(IpNet, Option<Target>, RouteMessage)> =
            Vec::with_capacity(changes.len());
        for (prefix, target) in changes {
            // Nothing to do, unless it is a stale route of a previous run
            // to remove (never in `installed`).
            let stale_removal = target.is_none() && self.stale.contains(&prefix);
            if self.installed.get(&prefix) == target.as_ref() && !stale_removal {
                continue;
            }
            let message = match &target {
                Some(t) => match self.message(prefix, t).await {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!("kernel: cannot build route {prefix}: {e:#}");
                        report.failed += 1;
                        continue;
                    }
                },
                None => {
                    if !self.installed.contains_key(&prefix) && !self.stale.contains(&prefix) {
                        continue;
                    }
                    self.delete_message(prefix)
                }
            };
            requests.push((prefix, target, message));
        }
        let results = match tokio::task::spawn_blocking(move || send_batched(requests)).await {
            Ok(Ok(results)) => results,
            Ok(Err(e)) => {
                tracing::warn!("kernel: netlink batch failed: {e}");
                report.failed += 1;
                return report;
            }
            Err(e) => {
                tracing::warn!("kernel: netlink batch task failed: {e}");
                report.failed += 1;
                return report;
            }
        };
        for (prefix, target, result) in results {
            if result.is_ok() || target.is_none() {
                self.stale.remove(&prefix);
            }
            match (target, result) {
                (Some(t), Ok(())) => {
                    self.installed.insert(prefix, t);
                    report.installed += 1;
                }
                (None, Ok(())) => {
                    self.installed.remove(&prefix);
                    report.removed += 1;
                }
                (None, Err(errno)) if errno == ESRCH => {
                    self.installed.remove(&prefix);
                    report.removed += 1;
                }
                (t, Err(errno)) => {
                    let what = if t.is_some() { "install" } else { "remove" };
                    let error = std::io::Error::from_raw_os_error(errno);
                    tracing::warn!("kernel: cannot {what} {prefix}: {error}");
                    report.failed += 1;
                }
            }
        }
        report
    }

    /// Removes every route this process installed (at shutdown, unless
    /// routes should survive a restart).
    pub async fn remove_all(&mut self) -> ApplyReport {
        let all: Vec<(IpNet, Option<Target>)> = self.installed.keys().map(|p| (*p, None)).collect();
        self.apply(all).await
    }

    async fn interface_index(&mut self, name: &str) -> Result<u32> {
        if let Some(i) = self.ifindex.get(name) {
            return Ok(*i);
        }
        let index = link_index(&self.handle, name).await?;
        self.ifindex.insert(name.to_string(), index);
        Ok(index)
    }

    fn base(&self, prefix: IpNet) -> RouteMessage {
        let message = match prefix {
            IpNet::V4(p) => {
                let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(p.network(), p.prefix_len());
                if let Some(src) = self.config.prefsrc_ipv4 {
                    b = b.pref_source(src);
                }
                b.build()
            }
            IpNet::V6(p) => {
                let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(p.network(), p.prefix_len());
                if let Some(src) = self.config.prefsrc_ipv6 {
                    b = b.pref_source(src);
                }
                b.build()
            }
        };
        let mut message = message;
        message.header.protocol = RouteProtocol::Bgp;
        set_table(&mut message, self.config.table);
        message
            .attributes
            .push(RouteAttribute::Priority(self.config.metric));
        message
    }

    fn delete_message(&self, prefix: IpNet) -> RouteMessage {
        let mut message = self.base(prefix);
        message
            .attributes
            .retain(|a| !matches!(a, RouteAttribute::PrefSource(_)));
        message
    }

    async fn message(&mut self, prefix: IpNet, target: &Target) -> Result<RouteMessage> {
        let mut message = self.base(prefix);
        let family = if prefix.addr().is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        match target {
            Target::Blackhole => message.header.kind = RouteType::BlackHole,
            Target::Unreachable => message.header.kind = RouteType::Unreachable,
            Target::Device(name) => {
                let index = self.interface_index(name).await?;
                message.header.scope = rtnetlink::packet_route::route::RouteScope::Link;
                message.attributes.push(RouteAttribute::Oif(index));
            }
            Target::Via(gateways) if gateways.is_empty() => bail!("no gateway"),
            Target::Via(gateways) if gateways.len() == 1 => {
                let hop = RouteNextHopBuilder::new(family)
                    .via(gateways[0])
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?
                    .build();
                message.attributes.extend(hop.attributes);
            }
            Target::Via(gateways) => {
                let hops = gateways
                    .iter()
                    .map(|g| RouteNextHopBuilder::new(family).via(*g).map(|b| b.build()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                message.attributes.push(RouteAttribute::MultiPath(hops));
            }
            Target::ViaOn(gateways, _) if gateways.is_empty() => bail!("no gateway"),
            Target::ViaOn(gateways, name) => {
                let index = self.interface_index(name).await?;
                let hops = gateways
                    .iter()
                    .map(|g| {
                        RouteNextHopBuilder::new(family)
                            .interface(index)
                            .via(*g)
                            .map(|b| b.build())
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                match <[_; 1]>::try_from(hops) {
                    Ok([hop]) => {
                        message.attributes.extend(hop.attributes);
                        message.attributes.push(RouteAttribute::Oif(index));
                    }
                    Err(hops) => message.attributes.push(RouteAttribute::MultiPath(hops)),
                }
            }
        }
        Ok(message)
    }
}

/// Every IPv4 and IPv6 route of every table.
async fn dump_routes(handle: &Handle) -> Result<Vec<RouteMessage>> {
    let mut all = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let message = match version {
            IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
            IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        };
        let mut routes = handle.route().get(message).execute();
        while let Some(route) = routes
            .try_next()
            .await
            .context("cannot list kernel routes")?
        {
            all.push(route);
        }
    }
    Ok(all)
}

/// The destination of a route message.
fn route_prefix(route: &RouteMessage) -> Option<IpNet> {
    let len = route.header.destination_prefix_length;
    let addr = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(d) => route_address(d),
        _ => None,
    });
    let addr = addr.or(match route.header.address_family {
        AddressFamily::Inet if len == 0 => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        AddressFamily::Inet6 if len == 0 => Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        _ => None,
    })?;
    IpNet::new(addr, len).ok()
}

fn set_table(message: &mut RouteMessage, table: u32) {
    if table > 255 {
        message.header.table = 252; // RT_TABLE_COMPAT: the attribute holds the id
        message.attributes.push(RouteAttribute::Table(table));
    } else {
        message.header.table = table as u8;
    }
}

fn table_of(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(route.header.table as u32)
}

/// How many bytes of route messages go in one send.
const BATCH_BYTES: usize = 64 * 1024;

type Outcome = (IpNet, Option<Target>, Result<(), i32>);

/// Sends route requests many to a send (like one `ip -batch` line each, but
/// without waiting for each answer), asking for an acknowledgement only on
/// the last of each send; the kernel still answers every failing request
/// with its errno. Returns each request's outcome (`Err(errno)`).
fn send_batched(
    requests: Vec<(IpNet, Option<Target>, RouteMessage)>,
) -> std::io::Result<Vec<Outcome>> {
    use rtnetlink::packet_core::{
        NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
    };
    use rtnetlink::packet_route::RouteNetlinkMessage;
    use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    // Room for the error answers of a batch that fails as a whole.
    let _ = socket.set_rx_buf_sz(8 * 1024 * 1024);

    let mut outcomes: Vec<Outcome> = Vec::with_capacity(requests.len());
    let mut send = Vec::with_capacity(BATCH_BYTES + 4096);
    let mut receive = vec![0u8; 256 * 1024];
    let mut requests = requests.into_iter().peekable();
    let mut seq: u32 = 0;
    while requests.peek().is_some() {
        let first = outcomes.len();
        let first_seq = seq.wrapping_add(1);
        send.clear();
        while let Some((prefix, target, message)) = requests.next_if(|_| send.len() < BATCH_BYTES) {
            let add = target.is_some();
            let payload = if add {
                RouteNetlinkMessage::NewRoute(message)
            } else {
                RouteNetlinkMessage::DelRoute(message)
            };
            let mut packet = NetlinkMessage::from(payload);
            seq = seq.wrapping_add(1);
            packet.header.sequence_number = seq;
            packet.header.flags =
                NLM_F_REQUEST | if add { NLM_F_CREATE | NLM_F_REPLACE } else { 0 };
            // The last of the send asks for an ACK: its answer ends the wait.
            if requests.peek().is_none() || send.len() + packet.buffer_len() >= BATCH_BYTES {
                packet.header.flags |= NLM_F_ACK;
            }
            packet.finalize();
            let start = send.len();
            send.resize(start + packet.buffer_len(), 0);
            packet.serialize(&mut send[start..]);
            outcomes.push((prefix, target, Ok(())));
            if packet.header.flags & NLM_F_ACK != 0 {
                break;
            }
        }
        let last_seq = seq;
        socket.send(&send, 0)?;
        // Answers: errors for failed requests, then the ACK of the last.
        'answers: loop {
            let n = socket.recv(&mut &mut receive[..], 0)?;
            let mut offset = 0;
            while offset + 16 <= n {
                let len = u32::from_ne_bytes([
                    receive[offset],
                    receive[offset + 1],
                    receive[offset + 2],
                    receive[offset + 3],
                ]) as usize;
                if len < 16 || offset + len > n {
                    break;
                }
                if let Ok(message) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(
                    &receive[offset..offset + len],
                ) && let NetlinkPayload::Error(error) = &message.payload
                {
                    let answer = message.header.sequence_number;
                    let code = error.raw_code();
                    if code != 0
                        && let Some(outcome) =
                            outcomes.get_mut(first + answer.wrapping_sub(first_seq) as usize)
                    {
                        outcome.2 = Err(-code);
                    }
                    if answer == last_seq {
                        break 'answers;
                    }
                }
                offset += len.next_multiple_of(4);
            }
        }
    }
    Ok(outcomes)
}

/// The kernel's answer for deleting a route that is not there.
const ESRCH: i32 = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_ids_above_255_go_in_an_attribute() {
        let mut m = RouteMessageBuilder::<Ipv4Addr>::new().build();
        set_table(&mut m, 1000);
        assert_eq!(m.header.table, 252);
        assert_eq!(table_of(&m), 1000);
        let mut m = RouteMessageBuilder::<Ipv4Addr>::new().build();
        set_table(&mut m, 254);
        assert_eq!(table_of(&m), 254);
    }
}

/// How the kernel reaches an address: what BGP next-hop tracking needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolution {
    /// A route other than our own BGP routes leads there.
    pub reachable: bool,
    /// That route's metric.
    pub metric: u32,
    /// The immediate gateway, when the address is not on a connected
    /// network (a recursive next hop is installed via this).
    pub gateway: Option<IpAddr>,
}

impl Resolution {
    pub const UNREACHABLE: Resolution = Resolution {
        reachable: false,
        metric: 0,
        gateway: None,
    };
}

/// Looks next hops up in the kernel's routing table (read only).
#[derive(Clone)]
pub struct Resolver {
    handle: Handle,
}

impl Resolver {
    pub fn connect() -> Result<Resolver> {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("cannot open a netlink socket")?;
        tokio::spawn(connection);
        Ok(Resolver { handle })
    }

    /// The FIB entry matching `addr` (`ip route get fibmatch ADDR`). Our
    /// own BGP routes do not count: a next hop must not resolve through the
    /// routes that depend on it.
    pub async fn resolve(&self, addr: IpAddr) -> Resolution {
        let mut message = match addr {
            IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        message.header.flags |= rtnetlink::packet_route::route::RouteFlags::FibMatch;
        let mut answers = self.handle.route().get(message).execute();
        let Ok(Some(route)) = answers.try_next().await else {
            return Resolution::UNREACHABLE;
        };
        let usable = matches!(route.header.kind, RouteType::Unicast | RouteType::Local);
        // A route through an interface without carrier is flagged linkdown.
        let down = route.header.flags.intersects(
            rtnetlink::packet_route::route::RouteFlags::Linkdown
                | rtnetlink::packet_route::route::RouteFlags::Dead,
        );
        if !usable || down || route.header.protocol == RouteProtocol::Bgp {
            return Resolution::UNREACHABLE;
        }
        let mut metric = 0;
        let mut gateway = None;
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Priority(p) => metric = *p,
                RouteAttribute::Gateway(g) => gateway = route_address(g),
                RouteAttribute::MultiPath(hops) if gateway.is_none() => {
                    gateway = hops
                        .iter()
                        .flat_map(|h| h.attributes.iter())
                        .find_map(|a| match a {
                            RouteAttribute::Gateway(g) => route_address(g),
                            _ => None,
                        });
                }
                _ => {}
            }
        }
        Resolution {
            reachable: true,
            metric,
            gateway,
        }
    }
}

fn route_address(a: &rtnetlink::packet_route::route::RouteAddress) -> Option<IpAddr> {
    use rtnetlink::packet_route::route::RouteAddress;
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

impl Resolver {
    /// The networks of our interfaces' addresses (`protocol direct`), with
    /// the interface name; loopback and link-local left out. Only
    /// interfaces matching `wanted` (names, or "*" for all) and up.
    pub async fn connected(&self, wanted: &[String]) -> Result<Vec<(IpNet, String)>> {
        use rtnetlink::packet_route::address::AddressAttribute;
        use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
        let mut names: HashMap<u32, (String, bool)> = HashMap::new();
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links.try_next().await.context("cannot list interfaces")? {
            let up = link.header.flags.contains(LinkFlags::Up);
            if let Some(name) = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            }) {
                names.insert(link.header.index, (name, up));
            }
        }
        let mut out = Vec::new();
        let mut addresses = self.handle.address().get().execute();
        while let Some(message) = addresses
            .try_next()
            .await
            .context("cannot list addresses")?
        {
            let Some((name, up)) = names.get(&message.header.index) else {
                continue;
            };
            if !up || !(wanted.iter().any(|w| w == "*" || w == name)) {
                continue;
            }
            let address = message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let address = address.or_else(|| {
                message.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            let Some(address) = address else { continue };
            let skip = match address {
                IpAddr::V4(a) => a.is_loopback() || a.is_link_local(),
                IpAddr::V6(a) => a.is_loopback() || a.is_unicast_link_local(),
            };
            if skip {
                continue;
            }
            if let Ok(net) = IpNet::new(address, message.header.prefix_len) {
                out.push((net.trunc(), name.clone()));
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// Tells when links, addresses or routes other than our own change, so
/// next hops and connected networks are looked at again at once rather
/// than at the next periodic scan. Each message is only a nudge.
pub fn watch_changes() -> Result<tokio::sync::mpsc::UnboundedReceiver<()>> {
    use futures::StreamExt as _;
    use rtnetlink::packet_core::NetlinkPayload;
    use rtnetlink::packet_route::RouteNetlinkMessage;
    use rtnetlink::sys::{AsyncSocket, SocketAddr};

    let (mut connection, _handle, mut messages) =
        rtnetlink::new_connection().context("cannot open a netlink socket")?;
    let groups = rtnetlink::constants::RTMGRP_LINK
        | rtnetlink::constants::RTMGRP_IPV4_IFADDR
        | rtnetlink::constants::RTMGRP_IPV6_IFADDR
        | rtnetlink::constants::RTMGRP_IPV4_ROUTE
        | rtnetlink::constants::RTMGRP_IPV6_ROUTE;
    connection
        .socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, groups))
        .context("cannot subscribe to netlink link and route events")?;
    tokio::spawn(connection);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((message, _)) = messages.next().await {
            let ours = match &message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r))
                | NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRoute(r)) => {
                    r.header.protocol == RouteProtocol::Bgp
                }
                _ => false,
            };
            if !ours && tx.send(()).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

impl Resolver {
    /// Routes of `table` put there by others (`ip route add`, static
    /// configuration, other daemons), for `[kernel] learn`: not ours
    /// (`proto bgp`) nor the kernel's own for interface addresses.
    pub async fn learn_routes(&self, table: u32) -> Result<Vec<(IpNet, Option<IpAddr>)>> {
        let mut out = Vec::new();
        for route in dump_routes(&self.handle).await? {
            let foreign = !matches!(
                route.header.protocol,
                RouteProtocol::Bgp | RouteProtocol::Kernel
            );
            if !foreign || route.header.kind != RouteType::Unicast || table_of(&route) != table {
                continue;
            }
            let Some(prefix) = route_prefix(&route) else {
                continue;
            };
            if matches!(prefix, IpNet::V6(p) if p.network().is_unicast_link_local() || p.network().is_multicast())
            {
                continue;
            }
            let gateway = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(g) => route_address(g),
                _ => None,
            });
            out.push((prefix, gateway));
        }
        out.sort();
        out.dedup_by_key(|(p, _)| *p);
        Ok(out)
    }
}

impl Resolver {
    /// A global IPv6 address of ours to give a neighbour at `neighbor` as
    /// next hop (IPv6 routes over an IPv4 session): one of the interface
    /// that holds `local` (our end of the session) when given, else of the
    /// interface the kernel routes `neighbor` through. Gives that
    /// interface's name, and its first IPv6 address that is not
    /// link-local, loopback, deprecated or failed duplicate detection
    /// (None when it has none). An error when no interface is found.
    pub async fn ipv6_address_towards(
        &self,
        neighbor: IpAddr,
        local: Option<IpAddr>,
    ) -> Result<(String, Option<Ipv6Addr>)> {
        use rtnetlink::packet_route::address::{
            AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
        };
        use rtnetlink::packet_route::link::LinkAttribute;
        let mut ours: Vec<AddressMessage> = Vec::new();
        let mut addresses = self.handle.address().get().execute();
        while let Some(message) = addresses
            .try_next()
            .await
            .context("cannot list addresses")?
        {
            ours.push(message);
        }
        let address_of = |m: &AddressMessage| {
            m.attributes
                .iter()
                .find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                })
                .or_else(|| {
                    m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                })
        };
        let index = match local {
            Some(local) => ours
                .iter()
                .find(|m| address_of(m) == Some(local))
                .map(|m| m.header.index)
                .with_context(|| format!("{local} is not an address of this machine"))?,
            None => {
                let message = match neighbor {
                    IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
                        .destination_prefix(a, 32)
                        .build(),
                    IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
                        .destination_prefix(a, 128)
                        .build(),
                };
                let mut answers = self.handle.route().get(message).execute();
                let route = answers.try_next().await.ok().flatten();
                route
                    .and_then(|r| {
                        r.attributes.iter().find_map(|a| match a {
                            RouteAttribute::Oif(i) => Some(*i),
                            _ => None,
                        })
                    })
                    .with_context(|| format!("no route to {neighbor}"))?
            }
        };
        let mut links = self.handle.link().get().match_index(index).execute();
        let name = links
            .try_next()
            .await
            .ok()
            .flatten()
            .and_then(|link| {
                link.attributes.into_iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n),
                    _ => None,
                })
            })
            .unwrap_or_else(|| format!("interface {index}"));
        let usable = |m: &AddressMessage| {
            let bad = m
                .header
                .flags
                .intersects(AddressHeaderFlags::Deprecated | AddressHeaderFlags::Dadfailed)
                || m.attributes.iter().any(|a| {
                    matches!(a, AddressAttribute::Flags(f)
                    if f.intersects(AddressFlags::Deprecated | AddressFlags::Dadfailed))
                });
            match address_of(m) {
                Some(IpAddr::V6(a)) if !bad && !a.is_loopback() && !a.is_unicast_link_local() => {
                    Some(a)
                }
                _ => None,
            }
        };
        let address = ours
            .iter()
            .filter(|m| m.header.index == index)
            .find_map(usable);
        Ok((name, address))
    }
}
