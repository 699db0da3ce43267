//! What the kernel's routing table says to the device, asked over
//! rtnetlink by the timer thread, never on the data path:
//!
//! - **sticky sources that left their route.** The kernel module sends
//!   from a peer's remembered source only while the route to the peer's
//!   endpoint, looked up from that source, leaves by the interface the
//!   peer's packets came in on (`send4` in its `socket.c`: another output
//!   interface, or EINVAL, and the source is dropped for the kernel's
//!   choice). A userspace send cannot see the route it takes, so the timer
//!   thread asks the kernel (`RTM_GETROUTE` to the endpoint, from the
//!   source, with the device's fwmark) for each peer whose (endpoint,
//!   source) it has not checked yet, and forgets a source whose route
//!   leaves by another interface. A verdict holds until the routes change.
//!   IPv4 only, as the kernel module: an IPv6 source is dropped there only
//!   when the address is gone, which the send itself tells
//!   ([`super::Peer::source_refused`]).
//! - **routes through the device with an MTU** (`ip route add … dev wg0
//!   mtu 1299`). The kernel module pads a packet up to the MTU of the route
//!   it took (its dst), ours up to the interface's; the timer thread keeps
//!   the routes whose output interface is the device and which carry an
//!   MTU metric ([`RouteMtus`]), and the transmit path pads a packet to the
//!   smaller of the interface's MTU and the MTU of the most specific of
//!   them containing its destination. Normally there is none, and the
//!   data path then reads one atomic per TUN read. Policy routing is
//!   ignored: the routes of every table count, whichever rules select
//!   them, and a more specific route through the device without an MTU
//!   does not hide a less specific one with an MTU. Both can only make the
//!   padding smaller than the kernel's, never larger than the path:
//!   padding is for privacy, a datagram too big for its path is lost.
//!   Multipath routes are ignored.
//!
//! Both are redone when the kernel announces a change of routes, rules,
//! addresses or links (a netlink subscription the timer thread also waits
//! on, so a new route is seen within milliseconds), at most once a second
//! while announcements flood in (a BGP table being loaded: more than
//! [`FLOOD`] a second), and every
//! [`RECHECK`] whatever happens (an IPv4 link going down flushes its
//! routes without a word).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use gotatun::tun::MtuWatcher;
use ip_network::IpNetwork;
use ip_network_table::IpNetworkTable;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::link::{LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::Socket;
use netlink_sys::protocols::NETLINK_ROUTE;
use tracing::{debug, info};

use super::udp::Source;
use super::{Peer, Shared, lock, packet_address, read};
use crate::kernel_backend::read_replies;
use crate::key::Key;

/// Everything is looked at again this often, changes announced or not.
const RECHECK: Duration = Duration::from_secs(10);
/// While changes keep coming, they are acted on at most this often.
const CHANGES_EVERY: Duration = Duration::from_secs(1);
/// More announcements than this in a second are a flood (a routing table
/// being loaded): changes are then acted on every [`CHANGES_EVERY`] only.
/// Fewer (an operator, wg-quick, a test) are acted on at once.
const FLOOD: u32 = 100;

// rtnetlink multicast groups (linux/rtnetlink.h, enum rtnetlink_groups).
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV4_RULE: u32 = 8;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;
const RTNLGRP_IPV6_RULE: u32 = 19;
// linux/netlink.h: the kernel filters dumps by the request's attributes.
const NETLINK_GET_STRICT_CHK: libc::c_int = 12;

/// The routes through the device that carry an MTU: prefix → the smallest
/// MTU among the routes of that prefix.
#[derive(Default)]
pub(super) struct RouteMtus {
    table: IpNetworkTable<u16>,
}

impl RouteMtus {
    fn insert(&mut self, network: IpNetwork, mtu: u16) {
        let mtu = match self.table.exact_match(network) {
            Some(&known) => known.min(mtu),
            None => mtu,
        };
        self.table.insert(network, mtu);
    }

    fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The MTU of the most specific route containing `destination`.
    pub(super) fn lookup(&self, destination: IpAddr) -> Option<u16> {
        self.table.longest_match(destination).map(|(_, &mtu)| mtu)
    }
}

/// [`RouteMtus`] as the transmit path reads it: one relaxed load while
/// there are none.
#[derive(Default)]
pub(super) struct RouteMtuCell {
    any: AtomicBool,
    table: RwLock<Option<Arc<RouteMtus>>>,
}

impl RouteMtuCell {
    pub(super) fn get(&self) -> Option<Arc<RouteMtus>> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, table: RouteMtus) {
        let table = (!table.is_empty()).then(|| Arc::new(table));
        self.any.store(table.is_some(), Ordering::Relaxed);
        *self.table.write().unwrap_or_else(PoisonError::into_inner) = table;
    }
}

/// What a run of packets is padded up to: the interface's MTU, or, for a
/// packet whose destination lies in a route through the device with a
/// smaller MTU, that one. Taken once per TUN read.
pub(super) struct Padding {
    interface: MtuWatcher,
    mtu: u16,
    routes: Option<Arc<RouteMtus>>,
    route: MtuWatcher,
}

impl Padding {
    pub(super) fn new(shared: &Shared) -> Padding {
        let mtu = shared.mtu.load(Ordering::Relaxed);
        Padding {
            interface: MtuWatcher::new(mtu),
            mtu,
            routes: shared.route_mtus.get(),
            route: MtuWatcher::new(mtu),
        }
    }

    /// What `packet` (an IP packet read from the TUN device) may be padded
    /// up to.
    pub(super) fn for_packet(&mut self, packet: &[u8]) -> &mut MtuWatcher {
        let Some(routes) = &self.routes else {
            return &mut self.interface;
        };
        match packet_address(packet, true).and_then(|d| routes.lookup(d)) {
            Some(mtu) if mtu < self.mtu => {
                self.route = MtuWatcher::new(mtu);
                &mut self.route
            }
            _ => &mut self.interface,
        }
    }
}

/// The timer thread's view of the routing table.
pub(super) struct RouteWatch {
    query: Socket,
    sequence: u32,
    /// Subscribed to route, rule, address and link changes; `None` if the
    /// kernel refused, and then only [`RECHECK`] applies.
    events: Option<Socket>,
    /// The device's interface index.
    ifindex: u32,
    /// A change was announced and not acted on yet.
    changed: bool,
    /// When changes were last acted on.
    acted: Option<Instant>,
    /// Announcements read since the start of the current second.
    announced: (Instant, u32),
    /// Each peer's (endpoint, source) as last checked, and whether the
    /// source was kept.
    checked: HashMap<Key, (SocketAddr, Source, bool)>,
}

impl RouteWatch {
    pub(super) fn new(shared: &Shared) -> io::Result<RouteWatch> {
        let ifindex = shared.tun.if_index()?;
        let mut query = Socket::new(NETLINK_ROUTE)?;
        query.bind_auto()?;
        query.connect(&netlink_sys::SocketAddr::new(0, 0))?;
        // A kernel that never answers must not stop the timers.
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        set_option(&query, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout)?;
        // Older kernels lack it and filter nothing: the dump is filtered
        // here as well.
        let _ = set_option(&query, libc::SOL_NETLINK, NETLINK_GET_STRICT_CHK, &1);
        let events = subscribe()
            .inspect_err(|e| {
                info!(interface = %shared.name, "no rtnetlink subscription ({e}); routes are looked at every {RECHECK:?}")
            })
            .ok();
        let mut watch = RouteWatch {
            query,
            sequence: 0,
            events,
            ifindex,
            changed: true,
            acted: None,
            announced: (Instant::now(), 0),
            checked: HashMap::new(),
        };
        watch.check_link(shared);
        Ok(watch)
    }

    /// Reads whether the interface is up, and has the device send what
    /// waited for it when it came up ([`Shared::came_up`]). Called when
    /// the kernel announced a change (links among others).
    fn check_link(&mut self, shared: &Shared) {
        // An error is mostly ENODEV: the interface moved into another
        // namespace (`ip link set netns`), where this socket cannot see
        // it; the device then works as if it were up.
        let down = self.link_down().unwrap_or(false);
        if shared.down.swap(down, Ordering::Relaxed) && !down {
            debug!(interface = %shared.name, "the interface came up");
            shared.came_up();
        }
    }

    /// Whether the interface is down (not administratively up).
    fn link_down(&mut self) -> io::Result<bool> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        // The acknowledgement ends the answer (a plain request has no
        // end mark).
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        header.sequence_number = self.sequence;
        let mut message = LinkMessage::default();
        message.header.index = self.ifindex;
        let payload = NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetLink(message));
        let mut packet = NetlinkMessage::new(header, payload);
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.query.send(&buf, 0)?;
        let mut up = None;
        read_replies::<RouteNetlinkMessage>(&self.query, self.sequence, |reply| {
            if let RouteNetlinkMessage::NewLink(link) = reply {
                up = Some(link.header.flags.contains(LinkFlags::Up));
            }
        })?;
        up.map(|up| !up)
            .ok_or_else(|| io::Error::other("no answer about the link"))
    }

    /// Waits out one timer tick, acting on route changes as they are
    /// announced (at most once in the tick, so a flood of announcements
    /// costs one drain per tick), then does what is due at the tick: acts
    /// on changes (or the periodic recheck) if due, and checks the sources
    /// of peers that have a new one.
    pub(super) fn wait_tick(&mut self, shared: &Shared, tick: Duration) {
        let end = Instant::now() + tick;
        let mut armed = self.events.is_some();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || shared.stopping.load(Ordering::Relaxed) {
                break;
            }
            let fd = self
                .events
                .as_ref()
                .filter(|_| armed)
                .map(|s| s.as_raw_fd());
            // Rounded up: poll counts whole milliseconds.
            shared.wait_readable(fd, Some(left + Duration::from_micros(999)));
            if armed && self.drain() {
                armed = false;
                self.check_link(shared);
                self.act(shared);
            }
        }
        if self.drain() {
            self.check_link(shared);
        }
        self.act(shared);
    }

    /// Reads every pending announcement; true if there was one (or some
    /// were lost: the socket overflowed).
    fn drain(&mut self) -> bool {
        let Some(events) = &self.events else {
            return false;
        };
        let mut buf = [0u8; 8192];
        let mut read = 0u32;
        loop {
            match events.recv(&mut &mut buf[..], libc::MSG_DONTWAIT) {
                Ok(_) => read += 1,
                // Some were lost: a flood.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => read += FLOOD,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if self.announced.0.elapsed() >= Duration::from_secs(1) {
            self.announced = (Instant::now(), 0);
        }
        self.announced.1 = self.announced.1.saturating_add(read);
        self.changed |= read > 0;
        read > 0
    }

    fn act(&mut self, shared: &Shared) {
        let due = match self.acted {
            None => true,
            Some(at) => {
                let flood = self.announced.1 > FLOOD;
                (self.changed && (!flood || at.elapsed() >= CHANGES_EVERY))
                    || at.elapsed() >= RECHECK
            }
        };
        if due {
            self.changed = false;
            self.acted = Some(Instant::now());
            self.checked.clear();
            match self.route_mtus() {
                Ok(table) => shared.route_mtus.set(table),
                Err(e) => debug!(interface = %shared.name, "routes through the device: {e}"),
            }
        }
        self.check_sources(shared);
    }

    /// Forgets the sources of peers whose route leaves by another
    /// interface than the one their packets come in on.
    fn check_sources(&mut self, shared: &Shared) {
        let (peers, fwmark) = {
            let iface = read(&shared.iface);
            (iface.peers.clone(), iface.fwmark)
        };
        let mut checked = HashMap::with_capacity(self.checked.len());
        for peer in peers {
            let (endpoint, source) = {
                let state = lock(&peer.state);
                match (state.endpoint, state.source) {
                    (Some(endpoint), Some(source)) => (endpoint, source),
                    _ => continue,
                }
            };
            let (IpAddr::V4(to), IpAddr::V4(from)) = (endpoint.ip().to_canonical(), source.ip())
            else {
                continue;
            };
            if source.ifindex() == 0 {
                continue;
            }
            let kept = match self.checked.get(&peer.public_key) {
                Some(&(e, s, kept)) if e == endpoint && s == source => kept,
                _ => {
                    let route = self.output_interface(to.into(), from.into(), fwmark);
                    let kept = keeps(source.ifindex(), &route);
                    if !kept {
                        debug!(interface = %shared.name, peer = ?peer.public_key, %endpoint,
                            source = %from, "the route leaves by another interface ({route:?}) \
                            than the peer's packets came in on; the kernel chooses the source");
                    }
                    kept
                }
            };
            if !kept {
                forget(&peer, endpoint, source);
            }
            checked.insert(peer.public_key, (endpoint, source, kept));
        }
        self.checked = checked;
    }

    /// The interface the kernel's route to `to` from `from` leaves by.
    fn output_interface(&mut self, to: IpAddr, from: IpAddr, fwmark: u32) -> io::Result<u32> {
        let mut message = RouteMessage::default();
        message.header.address_family = family(to);
        message.header.destination_prefix_length = prefix_length(to);
        message.header.source_prefix_length = prefix_length(from);
        message
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::from(to)));
        message
            .attributes
            .push(RouteAttribute::Source(RouteAddress::from(from)));
        if fwmark != 0 {
            message.attributes.push(RouteAttribute::Mark(fwmark));
        }
        let mut oif = None;
        self.request(message, NLM_F_REQUEST | NLM_F_ACK, |route| {
            for attribute in &route.attributes {
                if let RouteAttribute::Oif(index) = attribute {
                    oif = Some(*index);
                }
            }
        })?;
        oif.ok_or_else(|| io::Error::other("the route names no output interface"))
    }

    /// The routes of either family whose output interface is the device
    /// and which carry an MTU.
    fn route_mtus(&mut self) -> io::Result<RouteMtus> {
        let mut table = RouteMtus::default();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut message = RouteMessage::default();
            message.header.address_family = family;
            message.attributes.push(RouteAttribute::Oif(self.ifindex));
            let ifindex = self.ifindex;
            self.request(message, NLM_F_REQUEST | NLM_F_DUMP, |route| {
                if let Some((network, mtu)) = route_mtu(&route, ifindex) {
                    table.insert(network, mtu);
                }
            })?;
        }
        Ok(table)
    }

    fn request(
        &mut self,
        message: RouteMessage,
        flags: u16,
        mut each: impl FnMut(RouteMessage),
    ) -> io::Result<()> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.sequence;
        let payload = NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetRoute(message));
        let mut packet = NetlinkMessage::new(header, payload);
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.query.send(&buf, 0)?;
        read_replies::<RouteNetlinkMessage>(&self.query, self.sequence, |reply| {
            if let RouteNetlinkMessage::NewRoute(route) = reply {
                each(route);
            }
        })
    }
}

/// Whether a source that came in on `ifindex` is kept, given the route
/// lookup from it: yes unless the route leaves by another interface or
/// the kernel calls the source invalid (the kernel module's test). Other
/// failures (no route at all) keep it: the send fails either way.
fn keeps(ifindex: u32, route: &io::Result<u32>) -> bool {
    match route {
        Ok(oif) => *oif == ifindex,
        Err(e) => e.raw_os_error() != Some(libc::EINVAL),
    }
}

/// Forgets `peer`'s source, if it still has the one checked.
fn forget(peer: &Peer, endpoint: SocketAddr, source: Source) {
    let mut state = lock(&peer.state);
    if state.endpoint == Some(endpoint) && state.source == Some(source) {
        state.source = None;
    }
}

/// The destination and MTU of a unicast route leaving by `ifindex` with an
/// MTU metric.
fn route_mtu(route: &RouteMessage, ifindex: u32) -> Option<(IpNetwork, u16)> {
    if route.header.kind != RouteType::Unicast {
        return None;
    }
    let mut oif = None;
    let mut destination = None;
    let mut mtu = None;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Oif(index) => oif = Some(*index),
            RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                destination = Some(IpAddr::V4(*a))
            }
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                destination = Some(IpAddr::V6(*a))
            }
            RouteAttribute::Metrics(metrics) => {
                for metric in metrics {
                    if let RouteMetric::Mtu(m) = metric {
                        mtu = Some(*m);
                    }
                }
            }
            _ => {}
        }
    }
    if oif != Some(ifindex) {
        return None;
    }
    let mtu = u16::try_from(mtu?).ok().filter(|&m| m > 0)?;
    // No destination: the default route.
    let destination = match (destination, route.header.address_family) {
        (Some(d), _) => d,
        (None, AddressFamily::Inet) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        (None, AddressFamily::Inet6) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        (None, _) => return None,
    };
    let network =
        IpNetwork::new_truncate(destination, route.header.destination_prefix_length).ok()?;
    Some((network, mtu))
}

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn prefix_length(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// A non-blocking rtnetlink socket subscribed to the changes that can
/// move a route: routes, rules, addresses and links. Its buffer is kept
/// small: what overflows only says "changed" once more.
fn subscribe() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    for group in [
        RTNLGRP_LINK,
        RTNLGRP_IPV4_IFADDR,
        RTNLGRP_IPV4_ROUTE,
        RTNLGRP_IPV4_RULE,
        RTNLGRP_IPV6_IFADDR,
        RTNLGRP_IPV6_ROUTE,
        RTNLGRP_IPV6_RULE,
    ] {
        socket.add_membership(group)?;
    }
    socket.set_non_blocking(true)?;
    let _ = set_option(&socket, libc::SOL_SOCKET, libc::SO_RCVBUF, &(32 << 10));
    Ok(socket)
}

pub(super) fn set_option<T>(
    socket: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live `T` and its size, as setsockopt
    // expects for the options used here (int, timeval).
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn the_most_specific_route_and_the_smallest_mtu_of_a_prefix() {
        let mut table = RouteMtus::default();
        table.insert(net("0.0.0.0/0"), 1400);
        table.insert(net("10.0.0.0/8"), 1350);
        table.insert(net("10.1.2.3/32"), 1299);
        table.insert(net("10.1.2.3/32"), 1320);
        table.insert(net("fd00::/64"), 1280);
        assert_eq!(table.lookup("10.1.2.3".parse().unwrap()), Some(1299));
        assert_eq!(table.lookup("10.1.2.4".parse().unwrap()), Some(1350));
        assert_eq!(table.lookup("192.0.2.1".parse().unwrap()), Some(1400));
        assert_eq!(table.lookup("fd00::9".parse().unwrap()), Some(1280));
        assert_eq!(table.lookup("fd01::9".parse().unwrap()), None);
    }

    #[test]
    fn an_empty_table_costs_one_load() {
        let cell = RouteMtuCell::default();
        assert!(cell.get().is_none());
        let mut table = RouteMtus::default();
        table.insert(net("10.0.0.0/8"), 1300);
        cell.set(table);
        assert_eq!(
            cell.get()
                .and_then(|t| t.lookup("10.9.9.9".parse().unwrap())),
            Some(1300)
        );
        cell.set(RouteMtus::default());
        assert!(cell.get().is_none());
    }

    #[test]
    fn routes_through_other_interfaces_or_without_mtu_do_not_count() {
        let mut route = RouteMessage::default();
        route.header.address_family = AddressFamily::Inet;
        route.header.kind = RouteType::Unicast;
        route.header.destination_prefix_length = 32;
        route.attributes = vec![
            RouteAttribute::Destination(RouteAddress::Inet("192.168.241.2".parse().unwrap())),
            RouteAttribute::Oif(7),
            RouteAttribute::Metrics(vec![RouteMetric::Mtu(1299)]),
        ];
        assert_eq!(route_mtu(&route, 7), Some((net("192.168.241.2/32"), 1299)));
        assert_eq!(route_mtu(&route, 8), None);
        route.attributes.pop();
        assert_eq!(route_mtu(&route, 7), None);
        // The default route has no destination attribute.
        route.attributes = vec![
            RouteAttribute::Oif(7),
            RouteAttribute::Metrics(vec![RouteMetric::Mtu(1280)]),
        ];
        route.header.destination_prefix_length = 0;
        assert_eq!(route_mtu(&route, 7), Some((net("0.0.0.0/0"), 1280)));
        route.header.kind = RouteType::Local;
        assert_eq!(route_mtu(&route, 7), None);
    }

    #[test]
    fn a_source_goes_when_its_route_leaves_by_another_interface() {
        assert!(keeps(3, &Ok(3)));
        assert!(!keeps(3, &Ok(4)));
        assert!(!keeps(3, &Err(io::Error::from_raw_os_error(libc::EINVAL))));
        assert!(keeps(
            3,
            &Err(io::Error::from_raw_os_error(libc::ENETUNREACH))
        ));
    }
}
