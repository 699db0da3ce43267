//! The kernel backend: where the WireGuard module exists, the device is a
//! `wireguard` link configured over generic netlink (family "wireguard",
//! commands WG_CMD_GET_DEVICE and WG_CMD_SET_DEVICE), the way `wg` does it.
//!
//! The messages are built and read here ([`set_device_messages`],
//! [`status_from_replies`]); [`KernelDevice`] sends them. The test
//! machines have no WireGuard module, so the messages are tested against
//! bytes written from the kernel's UAPI header (`linux/wireguard.h`), and
//! the only kernel path exercised for real is the one that finds no module.

use std::io;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAllowedIpFlags,
    WireguardAttribute, WireguardCmd, WireguardDeviceFlags, WireguardMessage, WireguardPeer,
    WireguardPeerAttribute, WireguardPeerFlags,
};
use netlink_sys::Socket;
use netlink_sys::protocols::{NETLINK_GENERIC, NETLINK_ROUTE};

use crate::config::{AllowedIpChange, DeviceStatus, PeerStatus, SetRequest};
use crate::key::Key;

/// Allowed IPs per message: keeps each message well under the kernel's
/// limits, like `wg` splitting large configurations.
const ALLOWED_IPS_PER_MESSAGE: usize = 512;

/// The WG_CMD_SET_DEVICE messages for one change request. A peer with more
/// allowed IPs than fit in one message continues in the next (without
/// "replace allowed IPs" there, so the second half adds to the first).
pub fn set_device_messages(ifname: &str, request: &SetRequest) -> Vec<WireguardMessage> {
    let mut device = vec![WireguardAttribute::IfName(ifname.to_string())];
    match request.private_key {
        Some(Some(key)) => device.push(WireguardAttribute::PrivateKey(key.0)),
        Some(None) => device.push(WireguardAttribute::PrivateKey([0; 32])),
        None => {}
    }
    if let Some(port) = request.listen_port {
        device.push(WireguardAttribute::ListenPort(port));
    }
    if let Some(mark) = request.fwmark {
        device.push(WireguardAttribute::Fwmark(mark));
    }
    if request.replace_peers {
        device.push(WireguardAttribute::Flags(
            WireguardDeviceFlags::ReplacePeers,
        ));
    }
    let mut messages = Vec::new();
    let mut peers: Vec<WireguardPeer> = Vec::new();
    let mut budget = ALLOWED_IPS_PER_MESSAGE;
    let mut flush = |device: &mut Vec<WireguardAttribute>, peers: &mut Vec<WireguardPeer>| {
        let mut attributes =
            std::mem::replace(device, vec![WireguardAttribute::IfName(ifname.to_string())]);
        if !peers.is_empty() {
            attributes.push(WireguardAttribute::Peers(std::mem::take(peers)));
        }
        messages.push(WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes,
        });
    };
    for change in &request.peers {
        let mut attrs = vec![WireguardPeerAttribute::PublicKey(change.public_key.0)];
        let mut flags = WireguardPeerFlags::empty();
        if change.remove {
            flags |= WireguardPeerFlags::RemoveMe;
        }
        if change.update_only {
            flags |= WireguardPeerFlags::UpdateOnly;
        }
        if change.replace_allowed_ips {
            flags |= WireguardPeerFlags::ReplaceAllowedIps;
        }
        if !flags.is_empty() {
            attrs.push(WireguardPeerAttribute::Flags(flags));
        }
        match change.preshared_key {
            Some(Some(key)) => attrs.push(WireguardPeerAttribute::PresharedKey(key.0)),
            Some(None) => attrs.push(WireguardPeerAttribute::PresharedKey([0; 32])),
            None => {}
        }
        if let Some(endpoint) = change.endpoint {
            attrs.push(WireguardPeerAttribute::Endpoint(endpoint));
        }
        if let Some(keepalive) = change.persistent_keepalive {
            attrs.push(WireguardPeerAttribute::PersistentKeepalive(keepalive));
        }
        let mut ips = change.allowed_ips.iter().peekable();
        if ips.peek().is_none() {
            peers.push(WireguardPeer(attrs));
            continue;
        }
        while ips.peek().is_some() {
            if budget == 0 {
                flush(&mut device, &mut peers);
                budget = ALLOWED_IPS_PER_MESSAGE;
                // The continuation only adds allowed IPs to the same peer.
                attrs = vec![WireguardPeerAttribute::PublicKey(change.public_key.0)];
            }
            let chunk: Vec<WireguardAllowedIp> =
                ips.by_ref().take(budget).map(allowed_ip).collect();
            budget -= chunk.len();
            let mut peer = std::mem::take(&mut attrs);
            peer.push(WireguardPeerAttribute::AllowedIps(chunk));
            peers.push(WireguardPeer(peer));
        }
    }
    flush(&mut device, &mut peers);
    messages
}

fn allowed_ip(change: &AllowedIpChange) -> WireguardAllowedIp {
    let (net, remove) = match *change {
        AllowedIpChange::Add(net) => (net, false),
        AllowedIpChange::Remove(net) => (net, true),
    };
    let family = match net {
        IpNet::V4(_) => WireguardAddressFamily::Ipv4,
        IpNet::V6(_) => WireguardAddressFamily::Ipv6,
    };
    let mut attrs = vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(net.addr()),
        WireguardAllowedIpAttr::Cidr(net.prefix_len()),
    ];
    if remove {
        attrs.push(WireguardAllowedIpAttr::Flags(
            WireguardAllowedIpFlags::RemoveMe,
        ));
    }
    WireguardAllowedIp(attrs)
}

/// The WG_CMD_GET_DEVICE request (sent with NLM_F_DUMP).
pub fn get_device_message(ifname: &str) -> WireguardMessage {
    WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![WireguardAttribute::IfName(ifname.to_string())],
    }
}

/// Reads the replies to a GET_DEVICE dump. The kernel splits a device with
/// many peers or allowed IPs over several messages; a peer continued in
/// the next message repeats its public key.
pub fn status_from_replies(name: &str, replies: &[WireguardMessage]) -> DeviceStatus {
    let mut status = DeviceStatus {
        name: name.to_string(),
        private_key: None,
        public_key: None,
        listen_port: 0,
        fwmark: 0,
        fragmented_datagrams: 0,
        peers: Vec::new(),
    };
    for reply in replies {
        for attribute in &reply.attributes {
            match attribute {
                WireguardAttribute::PrivateKey(k) if *k != [0; 32] => {
                    status.private_key = Some(Key(*k))
                }
                WireguardAttribute::PublicKey(k) if *k != [0; 32] => {
                    status.public_key = Some(Key(*k))
                }
                WireguardAttribute::ListenPort(p) => status.listen_port = *p,
                WireguardAttribute::Fwmark(m) => status.fwmark = *m,
                WireguardAttribute::Peers(peers) => {
                    for peer in peers {
                        merge_peer(&mut status.peers, peer);
                    }
                }
                _ => {}
            }
        }
    }
    status
}

fn merge_peer(peers: &mut Vec<PeerStatus>, peer: &WireguardPeer) {
    let Some(key) = peer.0.iter().find_map(|a| match a {
        WireguardPeerAttribute::PublicKey(k) => Some(Key(*k)),
        _ => None,
    }) else {
        return;
    };
    // A peer split over several messages comes in consecutive ones: look
    // at the last peer first, so a peer's thousands of allowed-IP messages
    // do not each search the list.
    let continued = peers
        .last()
        .filter(|p| p.public_key == key)
        .map(|_| peers.len() - 1);
    let index = match continued.or_else(|| peers.iter().position(|p| p.public_key == key)) {
        Some(i) => i,
        None => {
            peers.push(PeerStatus {
                local_address: None,
                public_key: key,
                preshared_key: None,
                endpoint: None,
                allowed_ips: Vec::new(),
                persistent_keepalive: None,
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
            });
            peers.len() - 1
        }
    };
    let status = &mut peers[index];
    for attribute in &peer.0 {
        match attribute {
            WireguardPeerAttribute::PresharedKey(k) if *k != [0; 32] => {
                status.preshared_key = Some(Key(*k))
            }
            WireguardPeerAttribute::Endpoint(e) => status.endpoint = Some(*e),
            WireguardPeerAttribute::PersistentKeepalive(k) => {
                status.persistent_keepalive = (*k > 0).then_some(*k)
            }
            WireguardPeerAttribute::LastHandshake(t) => {
                status.last_handshake = (t.seconds > 0 || t.nano_seconds > 0).then(|| {
                    SystemTime::UNIX_EPOCH
                        + Duration::new(
                            u64::try_from(t.seconds).unwrap_or(0),
                            u32::try_from(t.nano_seconds).unwrap_or(0),
                        )
                })
            }
            WireguardPeerAttribute::RxBytes(b) => status.rx_bytes = *b,
            WireguardPeerAttribute::TxBytes(b) => status.tx_bytes = *b,
            WireguardPeerAttribute::AllowedIps(ips) => {
                for ip in ips {
                    let addr = ip.0.iter().find_map(|a| match a {
                        WireguardAllowedIpAttr::IpAddr(a) => Some(*a),
                        _ => None,
                    });
                    let cidr = ip.0.iter().find_map(|a| match a {
                        WireguardAllowedIpAttr::Cidr(c) => Some(*c),
                        _ => None,
                    });
                    if let Some(net) = addr.zip(cidr).and_then(|(a, c)| IpNet::new(a, c).ok()) {
                        status.allowed_ips.push(net);
                    }
                }
            }
            _ => {}
        }
    }
}

/// A netlink request as bytes: header, generic netlink header, message.
pub fn encode(family_id: u16, sequence: u32, message: WireguardMessage, dump: bool) -> Vec<u8> {
    let mut genl = GenlMessage::from_payload(message);
    genl.set_resolved_family_id(family_id);
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | if dump { NLM_F_DUMP } else { 0 };
    header.sequence_number = sequence;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(genl));
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    buf
}

/// A kernel WireGuard interface, configured over generic netlink.
pub struct KernelDevice {
    name: String,
    family: u16,
    socket: Mutex<(Socket, u32)>,
}

impl KernelDevice {
    /// Creates the `wireguard` link `name` (or adopts an existing one) and
    /// resolves the generic netlink family. Fails with a clear message
    /// where the kernel has no WireGuard module.
    pub fn create(name: &str) -> io::Result<KernelDevice> {
        let mut socket = Socket::new(NETLINK_GENERIC)?;
        socket.bind_auto()?;
        socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
        let family = resolve_family(&socket)?;
        create_link(name)?;
        Ok(KernelDevice {
            name: name.to_string(),
            family,
            socket: Mutex::new((socket, 1)),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn apply(&self, request: &SetRequest) -> io::Result<()> {
        let mut guard = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        let (socket, sequence) = &mut *guard;
        for message in set_device_messages(&self.name, request) {
            *sequence = sequence.wrapping_add(1);
            socket.send(&encode(self.family, *sequence, message, false), 0)?;
            read_replies::<GenlMessage<WireguardMessage>>(socket, *sequence, |_| {})?;
        }
        Ok(())
    }

    pub fn status(&self) -> io::Result<DeviceStatus> {
        let mut guard = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        let (socket, sequence) = &mut *guard;
        *sequence = sequence.wrapping_add(1);
        socket.send(
            &encode(self.family, *sequence, get_device_message(&self.name), true),
            0,
        )?;
        let mut replies = Vec::new();
        read_replies::<GenlMessage<WireguardMessage>>(socket, *sequence, |m| {
            replies.push(m.payload)
        })?;
        Ok(status_from_replies(&self.name, &replies))
    }
}

/// Whether this kernel has WireGuard: the generic netlink family resolves.
pub fn kernel_module_available() -> bool {
    Socket::new(NETLINK_GENERIC)
        .and_then(|mut s| {
            s.bind_auto()?;
            s.connect(&netlink_sys::SocketAddr::new(0, 0))?;
            resolve_family(&s)
        })
        .is_ok()
}

fn resolve_family(socket: &Socket) -> io::Result<u16> {
    let mut genl = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName("wireguard".to_string())],
    });
    genl.finalize();
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = 1;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(genl));
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut family = None;
    let result = read_replies::<GenlMessage<GenlCtrl>>(socket, 1, |m| {
        for nla in &m.payload.nlas {
            if let GenlCtrlAttrs::FamilyId(id) = nla {
                family = Some(*id);
            }
        }
    });
    match (result, family) {
        (_, Some(id)) => Ok(id),
        (Err(e), None) if e.raw_os_error() == Some(libc::ENOENT) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no WireGuard kernel module: the generic netlink family \"wireguard\" is unknown",
        )),
        (Err(e), None) => Err(e),
        (Ok(()), None) => Err(io::Error::other("the kernel did not name a family id")),
    }
}

fn create_link(name: &str) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    let mut link = LinkMessage::default();
    link.attributes
        .push(LinkAttribute::IfName(name.to_string()));
    link.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
            InfoKind::Wireguard,
        )]));
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    header.sequence_number = 1;
    let mut packet = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)),
    );
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    match read_replies::<RouteNetlinkMessage>(&socket, 1, |_| {}) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// Reads replies to `sequence` until the ACK, NLMSG_DONE or an error.
pub(crate) fn read_replies<I>(
    socket: &Socket,
    sequence: u32,
    mut each: impl FnMut(I),
) -> io::Result<()>
where
    I: netlink_packet_core::NetlinkDeserializable + std::fmt::Debug,
{
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < n {
            let message = NetlinkMessage::<I>::deserialize(&buf[offset..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let length = message.header.length as usize;
            if length == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "netlink message of length 0",
                ));
            }
            offset += (length + 3) & !3;
            if message.header.sequence_number != sequence {
                continue;
            }
            match message.payload {
                NetlinkPayload::InnerMessage(inner) => each(inner),
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        None => Ok(()),
                        Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                    };
                }
                NetlinkPayload::Done(_) => return Ok(()),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeerChange;

    // From the kernel's include/uapi/linux/wireguard.h.
    const WG_CMD_SET_DEVICE: u8 = 1;
    const WGDEVICE_A_IFNAME: u16 = 2;
    const WGDEVICE_A_PRIVATE_KEY: u16 = 3;
    const WGDEVICE_A_FLAGS: u16 = 5;
    const WGDEVICE_A_LISTEN_PORT: u16 = 6;
    const WGDEVICE_A_FWMARK: u16 = 7;
    const WGDEVICE_A_PEERS: u16 = 8;
    const WGDEVICE_F_REPLACE_PEERS: u32 = 1;
    const WGPEER_A_PUBLIC_KEY: u16 = 1;
    const WGPEER_A_FLAGS: u16 = 3;
    const WGPEER_A_ENDPOINT: u16 = 4;
    const WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL: u16 = 5;
    const WGPEER_A_ALLOWEDIPS: u16 = 9;
    const WGPEER_F_REMOVE_ME: u32 = 1;
    const WGPEER_F_REPLACE_ALLOWEDIPS: u32 = 2;
    const WGALLOWEDIP_A_FAMILY: u16 = 1;
    const WGALLOWEDIP_A_IPADDR: u16 = 2;
    const WGALLOWEDIP_A_CIDR_MASK: u16 = 3;
    const NLA_F_NESTED: u16 = 0x8000;

    /// One netlink attribute: length, type, payload, padded to 4 bytes.
    fn nla(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = ((4 + payload.len()) as u16).to_ne_bytes().to_vec();
        out.extend(kind.to_ne_bytes());
        out.extend_from_slice(payload);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    fn nested(kind: u16, children: &[Vec<u8>]) -> Vec<u8> {
        nla(kind | NLA_F_NESTED, &children.concat())
    }

    /// nlmsghdr (type = family id, flags REQUEST|ACK) + genlmsghdr.
    fn message(family: u16, sequence: u32, cmd: u8, attributes: &[Vec<u8>]) -> Vec<u8> {
        let body = attributes.concat();
        let mut out = ((16 + 4 + body.len()) as u32).to_ne_bytes().to_vec();
        out.extend(family.to_ne_bytes());
        out.extend((libc::NLM_F_REQUEST as u16 | libc::NLM_F_ACK as u16).to_ne_bytes());
        out.extend(sequence.to_ne_bytes());
        out.extend(0u32.to_ne_bytes());
        out.extend([cmd, 1, 0, 0]);
        out.extend(body);
        out
    }

    fn sockaddr_in(ip: [u8; 4], port: u16) -> Vec<u8> {
        let mut out = (libc::AF_INET as u16).to_ne_bytes().to_vec();
        out.extend(port.to_be_bytes());
        out.extend(ip);
        out.extend([0u8; 8]);
        out
    }

    fn allowed(family: i32, addr: &[u8], cidr: u8) -> Vec<u8> {
        nested(
            0,
            &[
                nla(WGALLOWEDIP_A_FAMILY, &(family as u16).to_ne_bytes()),
                nla(WGALLOWEDIP_A_IPADDR, addr),
                nla(WGALLOWEDIP_A_CIDR_MASK, &[cidr]),
            ],
        )
    }

    /// A whole configuration — what `wg setconf` sends — byte for byte as
    /// the kernel's UAPI header lays it out.
    #[test]
    fn set_device_bytes_match_the_kernel_uapi() {
        let mut peer = PeerChange::new(Key([0x22; 32]));
        peer.replace_allowed_ips = true;
        peer.endpoint = Some("192.0.2.7:51821".parse().expect("endpoint"));
        peer.persistent_keepalive = Some(25);
        peer.allowed_ips = vec![
            AllowedIpChange::Add("10.9.0.2/32".parse().expect("net")),
            AllowedIpChange::Add("fd00::/64".parse().expect("net")),
        ];
        let mut gone = PeerChange::new(Key([0x33; 32]));
        gone.remove = true;
        let request = SetRequest {
            private_key: Some(Some(Key([0x11; 32]))),
            listen_port: Some(51820),
            fwmark: Some(42),
            replace_peers: true,
            peers: vec![peer, gone],
        };
        let messages = set_device_messages("wg0", &request);
        assert_eq!(messages.len(), 1);
        let got = encode(0x1c, 7, messages.into_iter().next().expect("one"), false);

        let mut v6 = [0u8; 16];
        v6[0] = 0xfd;
        let expected = message(
            0x1c,
            7,
            WG_CMD_SET_DEVICE,
            &[
                nla(WGDEVICE_A_IFNAME, b"wg0\0"),
                nla(WGDEVICE_A_PRIVATE_KEY, &[0x11; 32]),
                nla(WGDEVICE_A_LISTEN_PORT, &51820u16.to_ne_bytes()),
                nla(WGDEVICE_A_FWMARK, &42u32.to_ne_bytes()),
                nla(WGDEVICE_A_FLAGS, &WGDEVICE_F_REPLACE_PEERS.to_ne_bytes()),
                nested(
                    WGDEVICE_A_PEERS,
                    &[
                        nested(
                            0,
                            &[
                                nla(WGPEER_A_PUBLIC_KEY, &[0x22; 32]),
                                nla(WGPEER_A_FLAGS, &WGPEER_F_REPLACE_ALLOWEDIPS.to_ne_bytes()),
                                nla(WGPEER_A_ENDPOINT, &sockaddr_in([192, 0, 2, 7], 51821)),
                                nla(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, &25u16.to_ne_bytes()),
                                nested(
                                    WGPEER_A_ALLOWEDIPS,
                                    &[
                                        allowed(libc::AF_INET, &[10, 9, 0, 2], 32),
                                        allowed(libc::AF_INET6, &v6, 64),
                                    ],
                                ),
                            ],
                        ),
                        nested(
                            0,
                            &[
                                nla(WGPEER_A_PUBLIC_KEY, &[0x33; 32]),
                                nla(WGPEER_A_FLAGS, &WGPEER_F_REMOVE_ME.to_ne_bytes()),
                            ],
                        ),
                    ],
                ),
            ],
        );
        assert_eq!(got, expected);
    }

    /// Many allowed IPs are split over several messages; the continuation
    /// does not replace what the first message set.
    #[test]
    fn large_peers_continue_in_the_next_message() {
        let mut peer = PeerChange::new(Key([0x22; 32]));
        peer.replace_allowed_ips = true;
        peer.allowed_ips = (0..1200u32)
            .map(|i| {
                let ip = std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8));
                AllowedIpChange::Add(IpNet::new(ip.into(), 24).expect("net"))
            })
            .collect();
        let request = SetRequest {
            peers: vec![peer],
            ..SetRequest::default()
        };
        let messages = set_device_messages("wg0", &request);
        assert_eq!(messages.len(), 3);
        let mut total = 0;
        for (i, m) in messages.iter().enumerate() {
            let Some(WireguardAttribute::Peers(peers)) = m.attributes.last() else {
                panic!("message {i} has no peers: {m:?}");
            };
            assert_eq!(peers.len(), 1);
            let replaces = peers[0].0.iter().any(|a| {
                matches!(a, WireguardPeerAttribute::Flags(f) if f.contains(WireguardPeerFlags::ReplaceAllowedIps))
            });
            assert_eq!(replaces, i == 0, "message {i}");
            for a in &peers[0].0 {
                if let WireguardPeerAttribute::AllowedIps(ips) = a {
                    total += ips.len();
                }
            }
        }
        assert_eq!(total, 1200);
    }

    /// A dump split over two messages (the kernel does this for big
    /// devices) reads as one device.
    #[test]
    fn status_merges_a_split_dump() {
        let peer = |ips: &[&str]| {
            WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey([0x22; 32]),
                WireguardPeerAttribute::RxBytes(10),
                WireguardPeerAttribute::AllowedIps(
                    ips.iter()
                        .map(|n| allowed_ip(&AllowedIpChange::Add(n.parse().expect("net"))))
                        .collect(),
                ),
            ])
        };
        let replies = vec![
            WireguardMessage {
                cmd: WireguardCmd::GetDevice,
                attributes: vec![
                    WireguardAttribute::ListenPort(51820),
                    WireguardAttribute::PublicKey([0x44; 32]),
                    WireguardAttribute::Peers(vec![peer(&["10.0.0.0/24"])]),
                ],
            },
            WireguardMessage {
                cmd: WireguardCmd::GetDevice,
                attributes: vec![WireguardAttribute::Peers(vec![peer(&["10.0.1.0/24"])])],
            },
        ];
        let status = status_from_replies("wg0", &replies);
        assert_eq!(status.listen_port, 51820);
        assert_eq!(status.public_key, Some(Key([0x44; 32])));
        assert_eq!(status.peers.len(), 1);
        assert_eq!(status.peers[0].allowed_ips.len(), 2);
        assert_eq!(status.peers[0].rx_bytes, 10);
    }

    /// This kernel has no WireGuard module: creating a kernel device says
    /// so instead of failing obscurely. (Where the module exists, the test
    /// checks the opposite.)
    #[test]
    fn without_the_module_the_kernel_backend_says_so() {
        if std::path::Path::new("/sys/module/wireguard").exists() {
            assert!(kernel_module_available());
            return;
        }
        assert!(!kernel_module_available());
        let err = KernelDevice::create("wgkernel0")
            .err()
            .expect("no module, no device");
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        assert!(
            err.to_string().contains("no WireGuard kernel module"),
            "{err}"
        );
    }
}
