//! What a device should be (`DeviceConfig`, the reconciler's desired
//! state), the changes one request makes (`SetRequest`, what a UAPI `set=1`
//! carries), and what a device reports (`DeviceStatus`).

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
}

impl DeviceStatus {
    pub fn peer(&self, public_key: &Key) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| &p.public_key == public_key)
    }
}
