//! One type for either backend, chosen at creation: the kernel module
//! where it exists (`Backend::Auto`), else the userspace device.

use std::collections::HashMap;
use std::io;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use crate::config::{DeviceConfig, DeviceStatus, SetRequest, plan_changes};
use crate::device::{ClusterOptions, ClusterStatus, Device, DeviceOptions};
use crate::kernel_backend::{KernelDevice, kernel_module_available};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// The kernel module if this kernel has it, else userspace.
    #[default]
    Auto,
    Userspace,
    Kernel,
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Backend, String> {
        match s {
            "auto" => Ok(Backend::Auto),
            "userspace" => Ok(Backend::Userspace),
            "kernel" => Ok(Backend::Kernel),
            other => Err(format!(
                "{other:?} is not a WireGuard backend (auto, userspace, kernel)"
            )),
        }
    }
}

pub enum AnyDevice {
    Userspace(Arc<Device>, Option<crate::UapiServer>),
    Kernel {
        device: KernelDevice,
        listen_port: Mutex<u16>,
        endpoints: Mutex<HashMap<crate::Key, std::net::SocketAddr>>,
    },
}

impl AnyDevice {
    pub fn create(options: DeviceOptions, backend: Backend) -> io::Result<AnyDevice> {
        let kernel = match backend {
            Backend::Kernel => true,
            Backend::Userspace => false,
            Backend::Auto => kernel_module_available(),
        };
        if kernel {
            Ok(AnyDevice::Kernel {
                device: KernelDevice::create(&options.name)?,
                listen_port: Mutex::new(0),
                endpoints: Mutex::new(HashMap::new()),
            })
        } else {
            let device = Arc::new(Device::create(options)?);
            // `wg show` sees the device; a UAPI socket that cannot be made
            // (another daemon has the name) only costs that.
            let uapi = match crate::UapiServer::start(Arc::clone(&device)) {
                Ok(server) => Some(server),
                Err(e) => {
                    tracing::warn!(interface = device.name(), "no UAPI socket: {e}");
                    None
                }
            };
            Ok(AnyDevice::Userspace(device, uapi))
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            AnyDevice::Userspace(..) => Backend::Userspace,
            AnyDevice::Kernel { .. } => Backend::Kernel,
        }
    }

    /// Brings the device to `desired` (see [`plan_changes`]). The userspace
    /// device handshakes at once with each peer given a new endpoint
    /// ([`Device::configure`]); the kernel module does on the first packet,
    /// or when a persistent keepalive is on.
    pub fn configure(&self, desired: &DeviceConfig) -> io::Result<()> {
        match self {
            AnyDevice::Userspace(device, _) => device.configure(desired).map_err(to_io),
            AnyDevice::Kernel {
                device,
                listen_port,
                endpoints,
            } => {
                let current = device.status()?;
                let mut port = listen_port.lock().unwrap_or_else(|e| e.into_inner());
                let mut known = endpoints.lock().unwrap_or_else(|e| e.into_inner());
                let request = plan_changes(&current, *port, &known, desired);
                if request != SetRequest::default() {
                    device.apply(&request)?;
                }
                *port = desired.listen_port;
                *known = desired
                    .peers
                    .iter()
                    .filter_map(|p| Some((p.public_key, p.endpoint?)))
                    .collect();
                Ok(())
            }
        }
    }

    /// True once the userspace device stopped because its interface was
    /// deleted (or the namespace holding it): it does not come back, and
    /// `status` and `configure` fail with `ENODEV` from then on; the owner
    /// drops it, and makes a new one if it wants the interface again. Its
    /// UAPI socket is already removed. Always false on the kernel backend,
    /// whose link and configuration are the kernel's: there `status`
    /// fails once the link is gone.
    pub fn interface_gone(&self) -> bool {
        match self {
            AnyDevice::Userspace(device, _) => device.interface_gone(),
            AnyDevice::Kernel { .. } => false,
        }
    }

    /// Joins or leaves a cluster of servers sharing this identity
    /// ([`Device::set_cluster`]); the kernel module cannot take part.
    pub fn set_cluster(&self, options: Option<ClusterOptions>) -> io::Result<()> {
        match (self, options) {
            (AnyDevice::Userspace(device, _), options) => device.set_cluster(options),
            (AnyDevice::Kernel { .. }, None) => Ok(()),
            (AnyDevice::Kernel { .. }, Some(_)) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel module cannot hand sessions over: a cluster needs the userspace device",
            )),
        }
    }

    /// The cluster's state, if the device is in one.
    pub fn cluster_status(&self) -> Option<ClusterStatus> {
        match self {
            AnyDevice::Userspace(device, _) => device.cluster_status(),
            AnyDevice::Kernel { .. } => None,
        }
    }

    /// Handshakes with `peer` now if it has an endpoint and neither a
    /// session nor a handshake under way ([`Device::handshake_now`]);
    /// returns whether one was sent. The kernel module cannot be asked to:
    /// always false there.
    pub fn handshake_now(&self, peer: &crate::Key) -> bool {
        match self {
            AnyDevice::Userspace(device, _) => device.handshake_now(peer),
            AnyDevice::Kernel { .. } => false,
        }
    }

    /// Punches through the NATs between this device and `peer`
    /// ([`Device::punch`]). The kernel module sends only where a peer's
    /// endpoint says, one handshake every 5 s: `Unsupported` there.
    pub fn punch(&self, peer: &crate::Key, candidates: &[std::net::SocketAddr]) -> io::Result<()> {
        match self {
            AnyDevice::Userspace(device, _) => device.punch(peer, candidates),
            AnyDevice::Kernel { .. } => Err(kernel_socket()),
        }
    }

    /// Tries a peer at another address while its session stays where it
    /// is ([`Device::probe`]); `Unsupported` on the kernel backend.
    pub fn probe(&self, peer: &crate::Key, to: std::net::SocketAddr) -> io::Result<()> {
        match self {
            AnyDevice::Userspace(device, _) => device.probe(peer, to),
            AnyDevice::Kernel { .. } => Err(kernel_socket()),
        }
    }

    /// Marks a peer's address in the other family, where unanswered
    /// handshakes are retried ([`Device::set_second_endpoint`]);
    /// `Unsupported` on the kernel backend (the endpoint alone is used).
    pub fn set_second_endpoint(
        &self,
        peer: &crate::Key,
        second: Option<std::net::SocketAddr>,
    ) -> io::Result<()> {
        match self {
            AnyDevice::Userspace(device, _) => device.set_second_endpoint(peer, second),
            AnyDevice::Kernel { .. } => Err(kernel_socket()),
        }
    }

    /// Marks a peer's relay endpoint ([`Device::set_fallback_endpoint`]).
    /// The kernel module roams to wherever the last packet came from: there
    /// the relay endpoint is set as the peer's endpoint while it has none
    /// (`Unsupported`: the caller configures it instead).
    pub fn set_fallback_endpoint(
        &self,
        peer: &crate::Key,
        relayed: Option<std::net::SocketAddr>,
    ) -> io::Result<()> {
        match self {
            AnyDevice::Userspace(device, _) => device.set_fallback_endpoint(peer, relayed),
            AnyDevice::Kernel { .. } => Err(kernel_socket()),
        }
    }

    /// Sends a datagram of another protocol from the device's socket
    /// ([`Device::send_datagram`]); `Unsupported` on the kernel backend,
    /// whose socket is the kernel's.
    pub fn send_datagram(&self, to: std::net::SocketAddr, datagram: &[u8]) -> io::Result<()> {
        match self {
            AnyDevice::Userspace(device, _) => device.send_datagram(to, datagram),
            AnyDevice::Kernel { .. } => Err(kernel_socket()),
        }
    }

    /// Where datagrams of another protocol arriving on the device's socket
    /// go ([`Device::set_foreign_receiver`]); `Unsupported` on the kernel
    /// backend.
    pub fn set_foreign_receiver(
        &self,
        receiver: Option<([u8; 4], crate::device::ForeignSender)>,
    ) -> io::Result<()> {
        match self {
            AnyDevice::Userspace(device, _) => {
                device.set_foreign_receiver(receiver);
                Ok(())
            }
            AnyDevice::Kernel { .. } => Err(kernel_socket()),
        }
    }

    /// The device and its peers. An error once the interface is gone: on
    /// the userspace backend `ENODEV` after the device stopped with its
    /// interface ([`AnyDevice::interface_gone`]), on the kernel backend
    /// whatever netlink answers for a deleted link (`ENODEV` too).
    pub fn status(&self) -> io::Result<DeviceStatus> {
        match self {
            AnyDevice::Userspace(device, _) if !device.is_running() => Err(stopped(device)),
            AnyDevice::Userspace(device, _) => Ok(device.status()),
            AnyDevice::Kernel { device, .. } => device.status(),
        }
    }
}

impl Drop for AnyDevice {
    fn drop(&mut self) {
        // The UAPI thread holds the device too: stop it so both go.
        if let AnyDevice::Userspace(device, _) = self {
            device.stop();
        }
    }
}

fn to_io(e: crate::uapi::UapiError) -> io::Error {
    io::Error::from_raw_os_error(e.errno)
}

/// What the kernel backend answers when asked to use its socket.
fn kernel_socket() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "the kernel module's socket carries WireGuard only: NAT traversal needs the userspace device",
    )
}

/// Why a stopped userspace device answers nothing.
fn stopped(device: &Device) -> io::Error {
    if device.interface_gone() {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{}: the interface is gone; the device stopped",
                device.name()
            ),
        )
    } else {
        io::Error::other(format!("{}: the device is stopped", device.name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names() {
        assert_eq!("auto".parse(), Ok(Backend::Auto));
        assert_eq!("kernel".parse(), Ok(Backend::Kernel));
        assert_eq!("userspace".parse(), Ok(Backend::Userspace));
        let err = "wg".parse::<Backend>().expect_err("unknown");
        assert!(err.contains("auto, userspace, kernel"), "{err}");
    }
}
