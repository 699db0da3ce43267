//! A userspace WireGuard device configured with `wg`: wireguard-go, the
//! reference, or bgp4mesh's own (`bgp4mesh wireguard -f IFACE`). Their UAPI
//! socket is `/var/run/wireguard/<iface>.sock`, one directory for all
//! namespaces, so interface names come from [`Lab::unique_ifname`].

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::sweep::WIREGUARD_SOCKET_DIR;
use crate::{Lab, Node, Proc, require_binary, wait_until};

/// Which implementation runs the device.
#[derive(Debug, Clone)]
pub enum WgImpl {
    WireguardGo,
    /// The bgp4mesh binary, with extra arguments for `bgp4mesh wireguard`.
    Bgp4mesh {
        binary: PathBuf,
        args: Vec<String>,
    },
    /// Any other wireguard-go-compatible daemon that stays in the
    /// foreground: `argv` followed by the interface name (boringtun-cli:
    /// `["boringtun-cli", "--foreground", "--disable-drop-privileges"]`).
    Command {
        label: String,
        argv: Vec<String>,
    },
}

impl WgImpl {
    pub fn bgp4mesh(binary: impl Into<PathBuf>) -> WgImpl {
        WgImpl::Bgp4mesh {
            binary: binary.into(),
            args: Vec::new(),
        }
    }

    pub fn label(&self) -> &str {
        match self {
            WgImpl::WireguardGo => "wireguard-go",
            WgImpl::Bgp4mesh { .. } => "bgp4mesh",
            WgImpl::Command { label, .. } => label,
        }
    }
}

/// Kept for the tests written before bgp4mesh had its own device.
pub type WireguardGo<'lab> = WgDevice<'lab>;

pub struct WgDevice<'lab> {
    lab: &'lab Lab,
    node: Node,
    ifname: String,
    proc: Proc,
    public_key: String,
    listen_port: u16,
}

/// One peer as `wg show IFACE dump` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeer {
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// Unix seconds of the last handshake; 0 = never.
    pub latest_handshake: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl<'lab> WgDevice<'lab> {
    /// Creates a wireguard-go interface in `node` with a fresh key pair,
    /// listening on `listen_port`, with `address` (`"10.99.0.1/24"`) on it, up.
    pub fn start(
        lab: &'lab Lab,
        node: &Node,
        address: &str,
        listen_port: u16,
    ) -> Result<WgDevice<'lab>> {
        Self::start_with(lab, node, &WgImpl::WireguardGo, address, listen_port)
    }

    /// [`WgDevice::start`] with the implementation to run.
    pub fn start_with(
        lab: &'lab Lab,
        node: &Node,
        implementation: &WgImpl,
        address: &str,
        listen_port: u16,
    ) -> Result<WgDevice<'lab>> {
        require_binary("wg")?;
        let ifname = lab.unique_ifname("wg")?;
        let private_key = lab.exec(node, &["wg", "genkey"])?.trim().to_string();
        let public_key = lab
            .exec_full(
                node,
                &["wg", "pubkey"],
                Some(private_key.as_bytes()),
                crate::command::COMMAND_TIMEOUT,
            )?
            .stdout
            .trim()
            .to_string();
        ensure!(public_key.len() == 44, "wg pubkey gave {public_key:?}");
        let key_file = lab.run_dir(node)?.join(format!("{ifname}.key"));
        std::fs::write(&key_file, format!("{private_key}\n"))?;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;

        let mut command: Vec<String> = match implementation {
            WgImpl::WireguardGo => vec![
                require_binary("wireguard-go")?
                    .to_string_lossy()
                    .into_owned(),
                "-f".into(),
            ],
            WgImpl::Bgp4mesh { binary, args } => {
                let mut c = vec![
                    binary.to_string_lossy().into_owned(),
                    "wireguard".into(),
                    "--foreground".into(),
                    "--log-level".into(),
                    "debug".into(),
                ];
                c.extend(args.iter().cloned());
                c
            }
            WgImpl::Command { argv, .. } => argv.clone(),
        };
        command.push(ifname.clone());
        let command: Vec<&str> = command.iter().map(String::as_str).collect();
        let label = implementation.label();
        let proc = lab.spawn(node, &format!("{label}-{ifname}"), &command)?;
        let socket = Path::new(WIREGUARD_SOCKET_DIR).join(format!("{ifname}.sock"));
        wait_until(
            Duration::from_secs(10),
            &format!("{label}'s UAPI socket"),
            || {
                if !lab.is_running(&proc) {
                    bail!("{label} exited: {}", lab.log_tail(&proc, 20));
                }
                ensure!(socket.exists(), "{} does not exist yet", socket.display());
                Ok(())
            },
        )?;
        let port = listen_port.to_string();
        lab.exec(
            node,
            &[
                "wg",
                "set",
                &ifname,
                "private-key",
                &key_file.to_string_lossy(),
                "listen-port",
                &port,
            ],
        )?;
        lab.add_address(node, &ifname, address)?;
        lab.exec(node, &["ip", "link", "set", &ifname, "up"])?;
        Ok(WgDevice {
            lab,
            node: node.clone(),
            ifname,
            proc,
            public_key,
            listen_port,
        })
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    pub fn listen_port(&self) -> u16 {
        self.listen_port
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// `wg set IFACE peer KEY [endpoint E] allowed-ips A,B [persistent-keepalive N]`.
    pub fn set_peer(
        &self,
        public_key: &str,
        endpoint: Option<&str>,
        allowed_ips: &[&str],
        persistent_keepalive: Option<u16>,
    ) -> Result<()> {
        let allowed = allowed_ips.join(",");
        let keepalive = persistent_keepalive.map(|k| k.to_string());
        let mut args = vec![
            "wg",
            "set",
            self.ifname.as_str(),
            "peer",
            public_key,
            "allowed-ips",
            &allowed,
        ];
        if let Some(endpoint) = endpoint {
            args.extend(["endpoint", endpoint]);
        }
        if let Some(keepalive) = &keepalive {
            args.extend(["persistent-keepalive", keepalive]);
        }
        self.lab.exec(&self.node, &args)?;
        Ok(())
    }

    /// The node the device runs in.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Runs `wg ARGS...` in the device's node and returns its output.
    pub fn wg(&self, args: &[&str]) -> Result<String> {
        let mut cmd = vec!["wg"];
        cmd.extend_from_slice(args);
        self.lab.exec(&self.node, &cmd)
    }

    /// Removes a peer.
    pub fn remove_peer(&self, public_key: &str) -> Result<()> {
        self.lab.exec(
            &self.node,
            &["wg", "set", &self.ifname, "peer", public_key, "remove"],
        )?;
        Ok(())
    }

    /// The peers and their counters (`wg show IFACE dump`).
    pub fn peers(&self) -> Result<Vec<WgPeer>> {
        let dump = self
            .lab
            .exec(&self.node, &["wg", "show", &self.ifname, "dump"])?;
        parse_dump(&dump)
    }
}

/// Parses `wg show IFACE dump`: one interface line, then one tab-separated
/// line per peer: key, preshared key, endpoint, allowed ips, latest
/// handshake, rx, tx, keepalive.
fn parse_dump(dump: &str) -> Result<Vec<WgPeer>> {
    dump.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            ensure!(fields.len() >= 8, "short wg dump line: {line:?}");
            let number = |i: usize| -> Result<u64> {
                fields[i]
                    .parse()
                    .with_context(|| format!("field {i} of wg dump line {line:?}"))
            };
            Ok(WgPeer {
                public_key: fields[0].to_string(),
                endpoint: (fields[2] != "(none)").then(|| fields[2].to_string()),
                allowed_ips: fields[3]
                    .split(',')
                    .filter(|a| *a != "(none)" && !a.is_empty())
                    .map(str::to_string)
                    .collect(),
                latest_handshake: number(4)?,
                rx_bytes: number(5)?,
                tx_bytes: number(6)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_peers_from_wg_dump() {
        let dump = "cHJpdmF0ZQ==\tcHVibGlj\t51820\toff\n\
                    UGVlcktleQ==\t(none)\t10.0.1.2:51821\t10.99.0.2/32,fd99::2/128\t1795316495\t1240\t1520\toff\n\
                    T3RoZXI=\t(none)\t(none)\t(none)\t0\t0\t0\t25\n";
        let peers = parse_dump(dump).expect("parses");
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].endpoint.as_deref(), Some("10.0.1.2:51821"));
        assert_eq!(peers[0].allowed_ips, vec!["10.99.0.2/32", "fd99::2/128"]);
        assert_eq!(peers[0].latest_handshake, 1_795_316_495);
        assert_eq!(peers[0].rx_bytes, 1240);
        assert_eq!(peers[1].endpoint, None);
        assert!(peers[1].allowed_ips.is_empty());
        assert!(parse_dump("iface\nshort\tline\n").is_err());
    }
}
