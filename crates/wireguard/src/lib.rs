//! The WireGuard device of bgp4mesh — the only code that owns one.
//!
//! - [`Device`]: the userspace device (TUN + UDP with offloads, protocol by
//!   gotatun), with a Rust API for the node daemon ([`Device::configure`],
//!   [`Device::status`]).
//! - [`uapi`] and [`uapi_server`]: the `wg`-compatible control socket.
//! - [`kernel_backend`]: the kernel module over generic netlink, where it
//!   exists; [`AnyDevice`] picks a backend ([`Backend::Auto`]).
//! - [`Key`]: keys in base64 and hex.
//! - [`allowed_ips`]: which peer has which networks, linear to change.

pub mod allowed_ips;
pub mod backend;
pub mod config;
pub mod device;
pub mod kernel_backend;
pub mod key;
pub mod uapi;
pub mod uapi_server;

pub use backend::{AnyDevice, Backend};
pub use config::{
    AllowedIpChange, DeviceConfig, DeviceStatus, PeerChange, PeerConfig, PeerStatus, SetRequest,
};
pub use device::{
    ClusterOptions, ClusterStatus, DEFAULT_MTU, Device, DeviceOptions, MemberStatus, Stopper,
    bind_udp_any,
};
pub use gotatun::noise::TimerParams;
pub use key::Key;
pub use uapi_server::UapiServer;
