//! What a device should be (`DeviceConfig`, the reconciler's desired
//! state), the changes one request makes (`SetRequest`, what a UAPI `set=1`
//! carries), and what a device reports (`DeviceStatus`).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::SystemTime;

use ipnet::IpNet;

use crate::key::Key;

/// The whole desired state of a device. [`crate::Device::configure`] brings
/// the device to it and may be called again with the same value at no cost:
/// peers whose settings did not change keep their sessions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    pub private_key: Option<Key>,
    /// 0: any free port.
    pub listen_port: u16,
    /// 0: no mark. Set on every packet the device sends, so that policy
    /// routing can keep the tunnel's own traffic out of the tunnel.
    pub fwmark: u32,
    pub peers: Vec<PeerConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    /// Where to send until the peer is heard from elsewhere (roaming).
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    /// Seconds; 0 or `None`: off.
    pub persistent_keepalive: Option<u16>,
}

impl PeerConfig {
    pub fn new(public_key: Key) -> PeerConfig {
        PeerConfig {
            public_key,
            preshared_key: None,
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: None,
        }
    }
}

/// One change request, with the semantics of the cross-platform UAPI
/// (`set=1`): fields left `None` are left as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetRequest {
    /// `Some(None)` removes the private key.
    pub private_key: Option<Option<Key>>,
    pub listen_port: Option<u16>,
    /// `Some(0)` removes the mark.
    pub fwmark: Option<u32>,
    /// Remove every peer before applying `peers`.
    pub replace_peers: bool,
    pub peers: Vec<PeerChange>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerChange {
    pub public_key: Key,
    pub remove: bool,
    /// Only change the peer if it exists; never create it.
    pub update_only: bool,
    /// `Some(None)` removes the preshared key.
    pub preshared_key: Option<Option<Key>>,
    pub endpoint: Option<SocketAddr>,
    /// `Some(0)` turns it off.
    pub persistent_keepalive: Option<u16>,
    /// Remove the peer's allowed IPs before applying `allowed_ips`.
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<AllowedIpChange>,
}

impl PeerChange {
    pub fn new(public_key: Key) -> PeerChange {
        PeerChange {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowedIpChange {
    Add(IpNet),
    /// `allowed_ip=-PREFIX` (wireguard-tools 1.0.20250521 and later).
    Remove(IpNet),
}

/// What a device is and has done, as `wg show` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    pub name: String,
    pub private_key: Option<Key>,
    pub public_key: Option<Key>,
    /// The port actually bound (0 while the device has no socket).
    pub listen_port: u16,
    pub fwmark: u32,
    /// Datagrams the device sent larger than the path to their endpoint
    /// allows, for the kernel to fragment (the device's MTU is too large
    /// for that path). Counted where the device learns it: a GSO send
    /// refused as too large, and what it sends to that peer alone after
    /// that; a lone datagram the kernel fragments unasked is not seen.
    /// Always 0 for the kernel backend.
    pub fragmented_datagrams: u64,
    pub peers: Vec<PeerStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    /// The current endpoint: the configured one, or where the peer was
    /// last heard from.
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
    pub last_handshake: Option<SystemTime>,
    /// Bytes of WireGuard datagrams received from and sent to this peer.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// The local address the peer's last packet came to, which we answer
    /// from ("sticky source"); `None` when the kernel chooses (no packet
    /// yet, or the address went away), and on the kernel backend, which
    /// does not say.
    pub local_address: Option<std::net::IpAddr>,
}

impl DeviceStatus {
    pub fn peer(&self, public_key: &Key) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| &p.public_key == public_key)
    }
}

/// The change request that brings a device from `current` to `desired`,
/// touching only what differs: peers whose key, preshared key and
/// keepalive are unchanged keep their sessions; an endpoint is only set
/// when the desired one differs from the one last asked for
/// (`configured_endpoints`), so a roamed peer is not pulled back on every
/// reconcile. `configured_port` is the listen port as configured (0 =
/// any), which may differ from the bound one in `current`.
pub fn plan_changes(
    current: &DeviceStatus,
    configured_port: u16,
    configured_endpoints: &HashMap<Key, SocketAddr>,
    desired: &DeviceConfig,
) -> SetRequest {
    let mut request = SetRequest::default();
    // Both backends report the key clamped: an unclamped desired key that
    // clamps to the current one is no change.
    let private_key = desired.private_key.map(Key::clamped);
    if current.private_key != private_key {
        request.private_key = Some(desired.private_key);
    }
    if configured_port != desired.listen_port {
        request.listen_port = Some(desired.listen_port);
    }
    if current.fwmark != desired.fwmark {
        request.fwmark = Some(desired.fwmark);
    }
    // Peers found by key in maps, not by searching lists: thousands of
    // peers cost no more than linear.
    let wanted: HashSet<&Key> = desired.peers.iter().map(|p| &p.public_key).collect();
    let existing: HashMap<&Key, &PeerStatus> =
        current.peers.iter().map(|p| (&p.public_key, p)).collect();
    for peer in &current.peers {
        if !wanted.contains(&peer.public_key) {
            let mut change = PeerChange::new(peer.public_key);
            change.remove = true;
            request.peers.push(change);
        }
    }
    for want in &desired.peers {
        let have = existing.get(&want.public_key).copied();
        let mut change = PeerChange::new(want.public_key);
        if have.map(|h| h.preshared_key) != Some(want.preshared_key) {
            change.preshared_key = Some(want.preshared_key);
        }
        let keepalive = want.persistent_keepalive.filter(|k| *k > 0);
        if have.map(|h| h.persistent_keepalive) != Some(keepalive) {
            change.persistent_keepalive = Some(keepalive.unwrap_or(0));
        }
        let configured = configured_endpoints.get(&want.public_key).copied();
        let endpoint_unknown = have.is_none_or(|h| h.endpoint.is_none());
        if want.endpoint.is_some() && (want.endpoint != configured || endpoint_unknown) {
            change.endpoint = want.endpoint;
        }
        let mut have_ips = have.map(|h| h.allowed_ips.clone()).unwrap_or_default();
        let mut want_ips: Vec<IpNet> = want.allowed_ips.iter().map(IpNet::trunc).collect();
        have_ips.sort();
        want_ips.sort();
        want_ips.dedup();
        if have.is_none() || have_ips != want_ips {
            change.replace_allowed_ips = true;
            change.allowed_ips = want_ips.into_iter().map(AllowedIpChange::Add).collect();
        }
        let unchanged = have.is_some()
            && change.preshared_key.is_none()
            && change.persistent_keepalive.is_none()
            && change.endpoint.is_none()
            && !change.replace_allowed_ips;
        if !unchanged {
            request.peers.push(change);
        }
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(peers: Vec<PeerStatus>) -> DeviceStatus {
        DeviceStatus {
            name: "wg0".into(),
            // As the device reports it: clamped.
            private_key: Some(Key([1; 32]).clamped()),
            public_key: None,
            listen_port: 51820,
            fwmark: 0,
            fragmented_datagrams: 0,
            peers,
        }
    }

    fn peer_status(key: u8, endpoint: &str, ips: &[&str]) -> PeerStatus {
        PeerStatus {
            local_address: None,
            public_key: Key([key; 32]),
            preshared_key: None,
            endpoint: Some(endpoint.parse().expect("endpoint")),
            allowed_ips: ips.iter().map(|i| i.parse().expect("net")).collect(),
            persistent_keepalive: None,
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    fn peer_config(key: u8, endpoint: &str, ips: &[&str]) -> PeerConfig {
        let mut p = PeerConfig::new(Key([key; 32]));
        p.endpoint = Some(endpoint.parse().expect("endpoint"));
        p.allowed_ips = ips.iter().map(|i| i.parse().expect("net")).collect();
        p
    }

    #[test]
    fn nothing_to_do_when_the_device_already_is_as_desired() {
        let current = status(vec![peer_status(2, "192.0.2.2:51820", &["10.0.0.2/32"])]);
        let desired = DeviceConfig {
            private_key: Some(Key([1; 32])),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![peer_config(2, "192.0.2.2:51820", &["10.0.0.2/32"])],
        };
        let endpoints = HashMap::from([(Key([2; 32]), "192.0.2.2:51820".parse().expect("a"))]);
        assert_eq!(
            plan_changes(&current, 51820, &endpoints, &desired),
            SetRequest::default()
        );
    }

    /// The device reports its key clamped; the desired one need not be.
    #[test]
    fn an_unclamped_private_key_is_no_change_and_another_key_is() {
        let current = status(Vec::new());
        let mut desired = DeviceConfig {
            private_key: Some(Key([1; 32])),
            listen_port: 51820,
            fwmark: 0,
            peers: Vec::new(),
        };
        let none = HashMap::new();
        assert_eq!(
            plan_changes(&current, 51820, &none, &desired).private_key,
            None
        );
        desired.private_key = Some(Key([9; 32]));
        assert_eq!(
            plan_changes(&current, 51820, &none, &desired).private_key,
            Some(Some(Key([9; 32])))
        );
    }

    #[test]
    fn a_roamed_peer_is_left_where_it_is_and_others_change_in_place() {
        // Peer 2 roamed to .99; the desired endpoint did not change.
        let current = status(vec![
            peer_status(2, "192.0.2.99:4000", &["10.0.0.2/32"]),
            peer_status(3, "192.0.2.3:51820", &["10.0.0.3/32"]),
        ]);
        let desired = DeviceConfig {
            private_key: Some(Key([1; 32])),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![
                peer_config(2, "192.0.2.2:51820", &["10.0.0.2/32"]),
                peer_config(4, "192.0.2.4:51820", &["10.0.0.4/32", "10.0.1.0/24"]),
            ],
        };
        let endpoints = HashMap::from([(Key([2; 32]), "192.0.2.2:51820".parse().expect("a"))]);
        let request = plan_changes(&current, 51820, &endpoints, &desired);
        assert_eq!(request.private_key, None);
        assert_eq!(request.peers.len(), 2, "{request:?}");
        assert!(request.peers[0].remove && request.peers[0].public_key == Key([3; 32]));
        let added = &request.peers[1];
        assert_eq!(added.public_key, Key([4; 32]));
        assert!(added.replace_allowed_ips);
        assert_eq!(added.allowed_ips.len(), 2);
        assert_eq!(added.endpoint, Some("192.0.2.4:51820".parse().expect("a")));
    }
}
