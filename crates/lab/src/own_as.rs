//! Seed 004's "Testing with Mock ISP", in namespaces: your own AS.
//!
//! ```text
//!  internet host ── isp (AS 65001) ── border (AS 65000, egress 0.0.0.0/0 and ::/0)
//!  198.51.100.10    198.51.100.1      172.30.0.100          mesh 44.30.127.1
//!  2001:db8:100::10 2001:db8:100::1   2001:db8:ff00::100         2001:db8:44::1
//!                   172.30.0.1           │  WireGuard mesh over the "wan" switch
//!                   2001:db8:ff00::1     ├── n1 44.30.127.2, 2001:db8:44::…
//!            controller (wan) ───────────├── n2 44.30.127.3, 2001:db8:44::…
//!                                        └── …
//! ```
//!
//! Dual-stack by default ([`Families`]): the border announces
//! 44.30.127.0/24 over an IPv4 session with the ISP (`isp`) and
//! 2001:db8:44::/48 over an IPv6 one (`isp6`), one session per family so
//! each can fail alone, and learns the ISP's routes (a default and the
//! Internet host's network, of each family); mesh nodes get public
//! addresses of both blocks from the controller and send everything else
//! through the border. The ISP runs bgp4mesh or BIRD, with BFD on its
//! sessions with the borders unless `isp_bfd` is off. An IPv6-only AS has
//! the `isp6` sessions and the /48 alone (its mesh's underlay, the "wan"
//! switch and the controller, stays on IPv4); the ISP and the Internet
//! host are dual-stack in every case.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::peers::{Bgp4mesh, Bird};
use crate::{Iface, Lab, Node, Proc, Switch, wait_until};

pub const BLOCK: &str = "44.30.127.0/24";
pub const BORDER_ADDRESS: &str = "44.30.127.1";
pub const INTERNET_HOST: &str = "198.51.100.10";
pub const ISP_PEERING: &str = "172.30.0.1";
pub const BORDER_PEERING: &str = "172.30.0.100";
/// The IPv6 block (a documentation /48) and the border's mesh address in it.
pub const BLOCK6: &str = "2001:db8:44::/48";
pub const BORDER_ADDRESS6: &str = "2001:db8:44::1";
/// The Internet host's IPv6 address, its network and the ISP's end of it.
pub const INTERNET_HOST6: &str = "2001:db8:100::10";
pub const INTERNET_NET6: &str = "2001:db8:100::/64";
const ISP_HOST_SIDE6: &str = "2001:db8:100::1";
/// The ends of the IPv6 session (`isp6`) on the border's link to the ISP.
pub const ISP_PEERING6: &str = "2001:db8:ff00::1";
pub const BORDER_PEERING6: &str = "2001:db8:ff00::100";
/// The second border (`borders: 2`): its own link to the ISP and a mesh
/// address at the top of the block; gateway metric 200 against the first
/// border's 100, so nodes prefer the first.
pub const BORDER2_ADDRESS: &str = "44.30.127.254";
pub const ISP_PEERING2: &str = "172.31.0.1";
pub const BORDER2_PEERING: &str = "172.31.0.100";
pub const BORDER2_ADDRESS6: &str = "2001:db8:44::fe";
pub const ISP_PEERING6_2: &str = "2001:db8:ff01::1";
pub const BORDER2_PEERING6: &str = "2001:db8:ff01::100";
/// The friend's network and its one address in it (`friend: true`).
pub const FRIEND_NET: &str = "203.0.113.0/24";
pub const FRIEND_HOST: &str = "203.0.113.1";
pub const FRIEND_PEERING: &str = "172.29.0.1";
pub const BORDER2_FRIEND_PEERING: &str = "172.29.0.100";
const MASTER_KEY: &str = "lab-master-key-0123456789";
/// BFD between the ISP and the borders (`isp_bfd`): a packet every 100 ms
/// each way, down after 3 missed, so a border that stops answering (a
/// frozen daemon, a machine without power) is left by the ISP within
/// 0.3 s plus the poll that follows.
pub const ISP_BFD_INTERVAL_MS: u32 = 100;
pub const ISP_BFD_MULTIPLIER: u32 = 3;

/// The address families of your AS: its blocks, its sessions with the
/// ISP, its mesh's addresses and egress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Families {
    /// 44.30.127.0/24 over the `isp` session (IPv4), 2001:db8:44::/48 over
    /// `isp6` (IPv6); gateways for 0.0.0.0/0 and ::/0.
    DualStack,
    Ipv4Only,
    /// The /48 alone, over `isp6`; no IPv4 range in the mesh.
    Ipv6Only,
}

impl Families {
    pub fn ipv4(self) -> bool {
        self != Families::Ipv6Only
    }
    pub fn ipv6(self) -> bool {
        self != Families::Ipv4Only
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IspKind {
    Bgp4mesh,
    Bird,
}

#[derive(Debug, Clone)]
pub struct OwnAsOptions {
    pub binary: PathBuf,
    pub nodes: usize,
    pub isp: IspKind,
    /// 1 or 2.
    pub borders: usize,
    /// The borders' egress: what they learn from the ISP (`[mesh] export`
    /// of the ISP's routes, a gateway with `--bgp`) instead of a static
    /// 0.0.0.0/0.
    pub bgp_egress: bool,
    /// A friend's network (AS 65002, 203.0.113.0/24) peering by eBGP with
    /// the second border only (needs `borders: 2`): with `bgp_egress`, the
    /// mesh reaches it through that border.
    pub friend: bool,
    /// BFD on the sessions between the ISP and the borders
    /// ([`ISP_BFD_INTERVAL_MS`] × [`ISP_BFD_MULTIPLIER`]), on both sides and
    /// with both ISP kinds, so the ISP notices a border that stops
    /// answering without closing TCP. On by default, as most transit
    /// providers and IXP route servers offer it; off, the ISP notices only
    /// when its hold timer (90 s) expires.
    pub isp_bfd: bool,
    /// Dual-stack, IPv4 only or IPv6 only.
    pub families: Families,
}

impl OwnAsOptions {
    /// Seed 004, dual-stack: static 0.0.0.0/0 and ::/0 egress, no friend;
    /// BFD with the ISP.
    pub fn new(binary: impl Into<PathBuf>, nodes: usize, isp: IspKind, borders: usize) -> Self {
        OwnAsOptions {
            binary: binary.into(),
            nodes,
            isp,
            borders,
            bgp_egress: false,
            friend: false,
            isp_bfd: true,
            families: Families::DualStack,
        }
    }
}

pub enum Isp<'lab> {
    Bgp4mesh(Bgp4mesh<'lab>),
    Bird(Bird<'lab>),
}

pub struct MeshNode<'lab> {
    pub name: String,
    pub daemon: Bgp4mesh<'lab>,
    pub interface: String,
    /// Its IPv4 mesh address; 0.0.0.0 in an IPv6-only AS.
    pub address: Ipv4Addr,
    /// Its IPv6 mesh address; `None` in an IPv4-only AS.
    pub address6: Option<Ipv6Addr>,
    /// Its end of the "wan" switch: the underlay of its tunnels and its
    /// way to the controller.
    pub wan: Iface,
    /// A border's end of its link to the ISP; `None` on a mesh node.
    pub isp_link: Option<Iface>,
}

pub struct OwnAs<'lab> {
    lab: &'lab Lab,
    binary: PathBuf,
    pub isp: Isp<'lab>,
    pub isp_node: Node,
    pub internet: Node,
    pub controller: Node,
    pub controller_proc: Proc,
    /// The controller's address on the "wan" switch (in `controller_url`).
    pub controller_address: Ipv4Addr,
    pub controller_url: String,
    pub fingerprint: String,
    pub border: MeshNode<'lab>,
    pub border2: Option<MeshNode<'lab>>,
    pub nodes: Vec<MeshNode<'lab>>,
    /// The friend's speaker (`friend: true`).
    pub friend: Option<Bgp4mesh<'lab>>,
    pub families: Families,
    wan: Switch,
}

impl<'lab> OwnAs<'lab> {
    pub fn start(lab: &'lab Lab, options: &OwnAsOptions) -> Result<OwnAs<'lab>> {
        let binary = options.binary.clone();
        let families = options.families;
        // The Internet as the lab sees it: an ISP, a host behind it, and a
        // switch where the mesh's machines meet (their underlay).
        let isp_node = lab.add_node("isp")?;
        let internet = lab.add_node("internet")?;
        let controller = lab.add_node("controller")?;
        let border_node = lab.add_node("border")?;
        let wan = lab.add_switch("wan")?;

        let (isp_to_host, host_to_isp) = lab.link(&isp_node, &internet)?;
        lab.add_address(&isp_node, &isp_to_host.name, "198.51.100.1/24")?;
        lab.add_address(&internet, &host_to_isp.name, &format!("{INTERNET_HOST}/24"))?;
        lab.add_route(&internet, &["default", "via", "198.51.100.1"])?;
        // The Internet is dual-stack whatever your AS is.
        lab.add_address(
            &isp_node,
            &isp_to_host.name,
            &format!("{ISP_HOST_SIDE6}/64"),
        )?;
        lab.add_address(
            &internet,
            &host_to_isp.name,
            &format!("{INTERNET_HOST6}/64"),
        )?;
        lab.add_route(&internet, &["::/0", "via", ISP_HOST_SIDE6])?;
        // The peering addresses of each family the AS has, on a border's
        // link to the ISP.
        let peering = |isp_end: &Iface, border_end: &Iface, v4: (&str, &str), v6: (&str, &str)| {
            if families.ipv4() {
                lab.add_address(&isp_node, &isp_end.name, &format!("{}/24", v4.0))?;
                lab.add_address(&border_end.node, &border_end.name, &format!("{}/24", v4.1))?;
            }
            if families.ipv6() {
                lab.add_address(&isp_node, &isp_end.name, &format!("{}/64", v6.0))?;
                lab.add_address(&border_end.node, &border_end.name, &format!("{}/64", v6.1))?;
            }
            anyhow::Ok(())
        };
        let (isp_to_border, border_to_isp) = lab.link(&isp_node, &border_node)?;
        peering(
            &isp_to_border,
            &border_to_isp,
            (ISP_PEERING, BORDER_PEERING),
            (ISP_PEERING6, BORDER_PEERING6),
        )?;
        lab.enable_forwarding(&isp_node)?;
        lab.enable_forwarding(&border_node)?;
        let two = options.borders >= 2;
        let border2_node = if two {
            let node = lab.add_node("border2")?;
            let (isp_end, border_end) = lab.link(&isp_node, &node)?;
            peering(
                &isp_end,
                &border_end,
                (ISP_PEERING2, BORDER2_PEERING),
                (ISP_PEERING6_2, BORDER2_PEERING6),
            )?;
            lab.enable_forwarding(&node)?;
            Some((node, border_end))
        } else {
            None
        };
        let friend = match (&border2_node, options.friend) {
            (Some((border2, _)), true) => {
                let friend = lab.add_node("friend")?;
                let (friend_end, border_end) = lab.link(&friend, border2)?;
                lab.add_address(&friend, &friend_end.name, &format!("{FRIEND_PEERING}/24"))?;
                lab.add_address(
                    border2,
                    &border_end.name,
                    &format!("{BORDER2_FRIEND_PEERING}/24"),
                )?;
                lab.exec(
                    &friend,
                    &[
                        "ip",
                        "addr",
                        "add",
                        &format!("{FRIEND_HOST}/32"),
                        "dev",
                        "lo",
                    ],
                )?;
                Some(Bgp4mesh::start(lab, &friend, &binary, &friend_config())?)
            }
            (None, true) => bail!("a friend peers with the second border: borders: 2"),
            _ => None,
        };

        let controller_wan = lab.attach(&wan, &controller)?;

        let isp = match options.isp {
            IspKind::Bgp4mesh => Isp::Bgp4mesh(Bgp4mesh::start(
                lab,
                &isp_node,
                &binary,
                &with_bfd(
                    isp_config(&isp_to_host.name, two, families),
                    options.isp_bfd,
                ),
            )?),
            IspKind::Bird => Isp::Bird(Bird::start(
                lab,
                &isp_node,
                &bird_isp_config(two, options.isp_bfd, families),
            )?),
        };

        // The controller.
        let dir = lab.run_dir(&controller)?;
        let config = lab.write_config(
            &controller,
            "server.toml",
            &format!(
                "listen = \"{}:8443\"\nmaster_key = \"{MASTER_KEY}\"\nstate_dir = \"{}\"\n",
                controller_wan.ipv4,
                dir.join("state").display()
            ),
        )?;
        let controller_proc = lab.spawn(
            &controller,
            "controller",
            &[
                &binary.to_string_lossy(),
                "server",
                "-c",
                &config.to_string_lossy(),
            ],
        )?;
        let fingerprint = wait_until(Duration::from_secs(20), "the controller", || {
            ensure!(
                lab.is_running(&controller_proc),
                "exited: {}",
                lab.log_tail(&controller_proc, 20)
            );
            let log = std::fs::read_to_string(&controller_proc.log)?;
            ensure!(log.contains("listening on"), "not yet");
            log.lines()
                .find_map(|l| l.strip_prefix("fingerprint "))
                .map(str::to_string)
                .context("no fingerprint")
        })?;
        let controller_url = format!("https://{}:8443", controller_wan.ipv4);
        let this_admin = Admin {
            lab,
            binary: &binary,
            node: &controller,
            url: &controller_url,
            fingerprint: &fingerprint,
        };
        let mut create = vec!["network", "create", "mynet"];
        if families.ipv4() {
            create.extend(["--range", BLOCK]);
        }
        if families.ipv6() {
            create.extend(["--range6", BLOCK6]);
        }
        this_admin.run(&create)?;
        let token = this_admin
            .run(&["token", "create", "--network", "mynet"])?
            .trim()
            .to_string();

        // The borders: BGP with the ISP, the mesh, and the egress.
        let start_border = |node: &Node,
                            isp_link: &Iface,
                            name: &str,
                            addresses: (&str, &str),
                            peering: Peering<'_>,
                            metric: &str,
                            friend: bool|
         -> Result<MeshNode<'lab>> {
            let wan_end = lab.attach(&wan, node)?;
            let pinned = Pinned {
                address: families.ipv4().then_some(addresses.0),
                address6: families.ipv6().then_some(addresses.1),
            };
            join(
                lab,
                &binary,
                node,
                &token,
                name,
                (&wan_end, families),
                pinned,
            )?;
            let interface = lab.unique_ifname("mesh")?;
            let export = if options.bgp_egress { MESH_EXPORT } else { "" };
            let friend = if friend { FRIEND_NEIGHBOR } else { "" };
            let config = format!(
                "{}{friend}\n{}{export}",
                with_bfd(border_bgp_config(&peering, families), options.isp_bfd),
                mesh_config(lab, node, &interface)?
            );
            let daemon = Bgp4mesh::start(lab, node, &binary, &config)?;
            let mut args = vec!["gateway", "create", "mynet", name, "--metric", metric];
            if options.bgp_egress {
                args.push("--bgp");
            } else {
                if families.ipv4() {
                    args.extend(["--range", "0.0.0.0/0"]);
                }
                if families.ipv6() {
                    args.extend(["--range", "::/0"]);
                }
            }
            this_admin.run(&args)?;
            Ok(MeshNode {
                name: name.into(),
                daemon,
                interface,
                address: Ipv4Addr::UNSPECIFIED,
                address6: None,
                wan: wan_end,
                isp_link: Some(isp_link.clone()),
            })
        };
        let mut border = start_border(
            &border_node,
            &border_to_isp,
            "border",
            (BORDER_ADDRESS, BORDER_ADDRESS6),
            Peering {
                isp: ISP_PEERING,
                local: BORDER_PEERING,
                isp6: ISP_PEERING6,
                local6: BORDER_PEERING6,
            },
            "100",
            false,
        )?;
        let mut border2 = match &border2_node {
            Some((node, isp_link)) => Some(start_border(
                node,
                isp_link,
                "border2",
                (BORDER2_ADDRESS, BORDER2_ADDRESS6),
                Peering {
                    isp: ISP_PEERING2,
                    local: BORDER2_PEERING,
                    isp6: ISP_PEERING6_2,
                    local6: BORDER2_PEERING6,
                },
                "200",
                friend.is_some(),
            )?),
            None => None,
        };

        let mut nodes = Vec::new();
        for i in 1..=options.nodes {
            let name = format!("n{i}");
            let node = lab.add_node(&name)?;
            let wan_end = lab.attach(&wan, &node)?;
            join(
                lab,
                &binary,
                &node,
                &token,
                &name,
                (&wan_end, families),
                Pinned::default(),
            )?;
            let interface = lab.unique_ifname("mesh")?;
            let daemon =
                Bgp4mesh::start(lab, &node, &binary, &mesh_config(lab, &node, &interface)?)?;
            nodes.push(MeshNode {
                name,
                daemon,
                interface,
                address: Ipv4Addr::UNSPECIFIED,
                address6: None,
                wan: wan_end,
                isp_link: None,
            });
        }
        let listed = this_admin.run(&["--json", "node", "list", "mynet"])?;
        let listed: serde_json::Value = serde_json::from_str(&listed)?;
        for n in nodes
            .iter_mut()
            .chain(std::iter::once(&mut border))
            .chain(border2.as_mut())
        {
            let entry = listed
                .as_array()
                .and_then(|a| a.iter().find(|v| v["name"] == n.name.as_str()))
                .with_context(|| format!("{} is not in the node list: {listed}", n.name))?;
            let address = |key: &str| entry[key].as_str().filter(|a| !a.is_empty());
            if families.ipv4() {
                n.address = address("address")
                    .and_then(|a| a.parse().ok())
                    .with_context(|| format!("no IPv4 address for {}: {entry}", n.name))?;
            }
            if families.ipv6() {
                n.address6 = Some(
                    address("address6")
                        .and_then(|a| a.parse().ok())
                        .with_context(|| format!("no IPv6 address for {}: {entry}", n.name))?,
                );
            }
        }
        Ok(OwnAs {
            lab,
            binary,
            isp,
            isp_node,
            internet,
            controller,
            controller_proc,
            controller_address: controller_wan.ipv4,
            controller_url,
            fingerprint,
            border,
            border2,
            nodes,
            friend,
            families,
            wan,
        })
    }

    /// Runs an admin command against the controller.
    pub fn admin(&self, args: &[&str]) -> Result<String> {
        Admin {
            lab: self.lab,
            binary: &self.binary,
            node: &self.controller,
            url: &self.controller_url,
            fingerprint: &self.fingerprint,
        }
        .run(args)
    }

    /// Makes a machine of the lab drop every packet in and out (`true`), as
    /// if it had lost power: nothing is closed, its peers notice only by
    /// timers. `false` brings it back.
    pub fn silence(&self, node: &Node, silent: bool) -> Result<()> {
        self.lab.nft_table(
            node,
            "b4m_silence",
            silent.then_some(
                "chain input { type filter hook input priority -300; policy drop; }\n\
                 chain output { type filter hook output priority -300; policy drop; }\n\
                 chain forward { type filter hook forward priority -300; policy drop; }",
            ),
        )
    }

    /// Cuts a machine's WireGuard underlay (`true`): every UDP datagram in
    /// and out is dropped but BFD's (ports 3784, 3785, 4784), so its BGP
    /// sessions, BFD and the controller link (TCP) stay up while its mesh
    /// carries nothing: a firewall change, or a crashed device thread.
    /// `false` mends it.
    pub fn cut_mesh(&self, node: &Node, cut: bool) -> Result<()> {
        let keep = "{ 3784, 3785, 4784 }";
        let rule = format!("meta l4proto udp udp dport != {keep} udp sport != {keep} drop");
        let chains = format!(
            "chain input {{ type filter hook input priority -300; policy accept; {rule}; }}\n\
             chain output {{ type filter hook output priority -300; policy accept; {rule}; }}"
        );
        self.lab
            .nft_table(node, "b4m_mesh_cut", cut.then_some(&chains))
    }

    /// Cuts one link of a machine (`true`): every IP packet in and out of
    /// `iface` is dropped, forwarded ones too, while the link stays up (and
    /// ARP goes on), so the machines at either end notice only by timers
    /// (BFD, hold timers, probes): a broken cable behind a switch, a
    /// provider's outage. `false` mends it. Cuts of different links add up.
    pub fn cut_link(&self, iface: &Iface, cut: bool) -> Result<()> {
        let name = &iface.name;
        self.drop_traffic(
            &iface.node,
            &format!("b4m_cut_{name}"),
            (
                &format!("iifname \"{name}\""),
                &format!("oifname \"{name}\""),
            ),
            cut,
        )
    }

    /// Cuts a machine off from one address (`true`): every packet from
    /// `peer` and to it is dropped on `node`, whatever the interface; its
    /// other traffic flows. `false` mends it.
    pub fn cut_address(&self, node: &Node, peer: Ipv4Addr, cut: bool) -> Result<()> {
        let table = format!("b4m_cut_{}", peer.to_string().replace('.', "_"));
        self.drop_traffic(
            node,
            &table,
            (&format!("ip saddr {peer}"), &format!("ip daddr {peer}")),
            cut,
        )
    }

    /// Adds (`cut`) or deletes the nftables table `table` on `node` that
    /// drops what matches `matches.0` on the way in and `matches.1` on the
    /// way out, before anything else sees it (priority -300, prerouting and
    /// postrouting: local and forwarded packets alike).
    fn drop_traffic(
        &self,
        node: &Node,
        table: &str,
        matches: (&str, &str),
        cut: bool,
    ) -> Result<()> {
        let (inbound, outbound) = matches;
        let chains = format!(
            "chain prerouting {{ type filter hook prerouting priority -300; policy accept; {inbound} drop; }}\n\
             chain postrouting {{ type filter hook postrouting priority -300; policy accept; {outbound} drop; }}"
        );
        self.lab.nft_table(node, table, cut.then_some(&chains))
    }

    pub fn wan(&self) -> &Switch {
        &self.wan
    }

    /// The border's sessions with the ISP: `isp` (IPv4) and `isp6` (IPv6),
    /// those of the AS's families.
    pub fn sessions(&self) -> Vec<&'static str> {
        let mut sessions = Vec::new();
        if self.families.ipv4() {
            sessions.push("isp");
        }
        if self.families.ipv6() {
            sessions.push("isp6");
        }
        sessions
    }

    /// The blocks the AS announces: 44.30.127.0/24, 2001:db8:44::/48 or both.
    pub fn blocks(&self) -> Vec<&'static str> {
        let mut blocks = Vec::new();
        if self.families.ipv4() {
            blocks.push(BLOCK);
        }
        if self.families.ipv6() {
            blocks.push(BLOCK6);
        }
        blocks
    }

    /// Waits until the border's sessions with the ISP are up and the ISP
    /// has the blocks.
    pub fn wait_bgp(&self, timeout: Duration) -> Result<()> {
        for session in self.sessions() {
            wait_until(
                timeout,
                &format!("the border's BGP session {session} with the ISP"),
                || {
                    let state = self.border.daemon.bgp_state(session)?;
                    ensure!(
                        state == crate::peers::SessionState::Established,
                        "{state:?}"
                    );
                    Ok(())
                },
            )?;
        }
        for block in self.blocks() {
            wait_until(timeout, &format!("{block} at the ISP"), || {
                let routes = match &self.isp {
                    Isp::Bgp4mesh(isp) => isp.routes()?,
                    Isp::Bird(isp) => isp.routes()?,
                };
                ensure!(
                    routes.iter().any(|r| r.prefix == block),
                    "the ISP has {routes:?}"
                );
                Ok(())
            })?;
        }
        Ok(())
    }
}

struct Admin<'a> {
    lab: &'a Lab,
    binary: &'a Path,
    node: &'a Node,
    url: &'a str,
    fingerprint: &'a str,
}

impl Admin<'_> {
    fn run(&self, args: &[&str]) -> Result<String> {
        let binary = self.binary.to_string_lossy();
        let mut cmd = vec![
            binary.as_ref(),
            "--server",
            self.url,
            "--key",
            MASTER_KEY,
            "--fingerprint",
            self.fingerprint,
        ];
        cmd.extend_from_slice(args);
        self.lab.exec(self.node, &cmd)
    }
}

/// The mesh addresses a border pins at `join` (nodes take what the
/// controller gives).
#[derive(Default)]
struct Pinned<'a> {
    address: Option<&'a str>,
    address6: Option<&'a str>,
}

/// A border's ends of its sessions with the ISP: IPv4 and IPv6.
struct Peering<'a> {
    isp: &'a str,
    local: &'a str,
    isp6: &'a str,
    local6: &'a str,
}

/// Joins `node` with its end of the "wan" switch as its endpoint: the IPv4
/// address, and the IPv6 one too when the AS has IPv6, so that the mesh's
/// tunnels run over IPv6 (the IPv4 endpoint is their fallback).
fn join(
    lab: &Lab,
    binary: &Path,
    node: &Node,
    token: &str,
    name: &str,
    (wan_end, families): (&Iface, Families),
    pinned: Pinned<'_>,
) -> Result<()> {
    let state = lab.run_dir(node)?.join("agent");
    let binary = binary.to_string_lossy();
    let state = state.to_string_lossy();
    let endpoint = wan_end.ipv4.to_string();
    let endpoint6 = wan_end.ipv6.to_string();
    let mut cmd = vec![
        binary.as_ref(),
        "join",
        token,
        "--name",
        name,
        "--endpoint",
        &endpoint,
        "--state-dir",
        state.as_ref(),
    ];
    if families.ipv6() {
        cmd.extend(["--endpoint6", &endpoint6]);
    }
    if let Some(a) = pinned.address {
        cmd.extend(["--address", a]);
    }
    if let Some(a) = pinned.address6 {
        cmd.extend(["--address6", a]);
    }
    let out = lab.exec(node, &cmd)?;
    if !out.contains("joined network") {
        bail!("{name} did not join: {out}");
    }
    Ok(())
}

fn mesh_config(lab: &Lab, node: &Node, interface: &str) -> Result<String> {
    let state = lab.run_dir(node)?.join("agent");
    Ok(format!(
        "[mesh]\nstate_dir = {:?}\ninterface = \"{interface}\"\nbackend = \"userspace\"\n",
        state.to_string_lossy()
    ))
}

/// A border's `[mesh] export` (appended to its `[mesh]` section): what the
/// ISP and the friend send is the mesh's egress.
const MESH_EXPORT: &str = r#"export = "from-upstreams"

[policy.from-upstreams]
rules = [ { match = { neighbor = ["isp", "isp6", "friend"] }, action = "accept" } ]
"#;

/// The second border's session with the friend (appended to its `[bgp]`):
/// IPv4 only.
const FRIEND_NEIGHBOR: &str = r#"
[[bgp.neighbor]]
name = "friend"
address = "172.29.0.1"
remote_as = 65002
local_address = "172.29.0.100"
families = ["ipv4"]
import = "all"
export = "announce"
connect_retry = 1
error_wait = [1, 4]
"#;

/// The friend (AS 65002): its network for us, our block for it.
fn friend_config() -> String {
    format!(
        r#"[bgp]
asn = 65002
router_id = "{FRIEND_PEERING}"

[[bgp.neighbor]]
name = "border2"
address = "{BORDER2_FRIEND_PEERING}"
remote_as = 65000
local_address = "{FRIEND_PEERING}"
families = ["ipv4"]
import = "our_friend"
export = "mine"
connect_retry = 1
error_wait = [1, 4]

[[bgp.static]]
prefix = "{FRIEND_NET}"
blackhole = true

[policy.our_friend]
rules = [ {{ match = {{ prefix = ["{BLOCK}"] }}, action = "accept" }} ]

[policy.mine]
rules = [ {{ match = {{ prefix = ["{FRIEND_NET}"] }}, action = "accept" }} ]
"#
    )
}

/// Turns BFD on for every neighbour of a bgp4mesh config, with the
/// neighbour's own timers, as docs/deploy.md has it for an ISP.
fn with_bfd(config: String, bfd: bool) -> String {
    if !bfd {
        return config;
    }
    config.replace(
        "connect_retry = 1\n",
        &format!(
            "connect_retry = 1\nbfd = true\nbfd_interval = {ISP_BFD_INTERVAL_MS}\n\
             bfd_multiplier = {ISP_BFD_MULTIPLIER}\n"
        ),
    )
}

/// One `[[bgp.neighbor]]` of the sessions between the ISP and a border:
/// `family` is what it carries, over a transport of the same family.
fn neighbor(
    name: &str,
    address: &str,
    remote_as: u32,
    local: &str,
    family: &str,
    import: &str,
    export: &str,
) -> String {
    format!(
        r#"
[[bgp.neighbor]]
name = "{name}"
address = "{address}"
remote_as = {remote_as}
local_address = "{local}"
families = ["{family}"]
import = "{import}"
export = "{export}"
connect_retry = 1
error_wait = [1, 4]
"#
    )
}

/// A border's `[bgp]`: `isp` (IPv4) and `isp6` (IPv6), one session per
/// family of the AS, and its blocks.
fn border_bgp_config(peering: &Peering<'_>, families: Families) -> String {
    let mut config = format!("[bgp]\nasn = 65000\nrouter_id = \"{}\"\n", peering.local);
    let mut blocks = Vec::new();
    if families.ipv4() {
        config.push_str(&neighbor(
            "isp",
            peering.isp,
            65001,
            peering.local,
            "ipv4",
            "all",
            "announce",
        ));
        blocks.push(BLOCK);
    }
    if families.ipv6() {
        config.push_str(&neighbor(
            "isp6",
            peering.isp6,
            65001,
            peering.local6,
            "ipv6",
            "all",
            "announce",
        ));
        blocks.push(BLOCK6);
    }
    for block in &blocks {
        config.push_str(&format!(
            "\n[[bgp.static]]\nprefix = \"{block}\"\nblackhole = true\n"
        ));
    }
    config.push_str(&format!(
        "\n[policy.announce]\nrules = [ {{ match = {{ prefix = {blocks:?} }}, action = \"accept\" }} ]\n"
    ));
    config
}

/// The ISP (bgp4mesh): a session per border and family of the AS, a
/// default route and the Internet host's network of each family.
fn isp_config(host_interface: &str, two: bool, families: Families) -> String {
    let mut config = format!("[bgp]\nasn = 65001\nrouter_id = \"{ISP_PEERING}\"\n");
    let mut customers = vec![(
        "customer",
        ISP_PEERING,
        BORDER_PEERING,
        ISP_PEERING6,
        BORDER_PEERING6,
    )];
    if two {
        customers.push((
            "customer2",
            ISP_PEERING2,
            BORDER2_PEERING,
            ISP_PEERING6_2,
            BORDER2_PEERING6,
        ));
    }
    for (name, local, border, local6, border6) in customers {
        if families.ipv4() {
            config.push_str(&neighbor(
                name,
                border,
                65000,
                local,
                "ipv4",
                "customer_in",
                "all",
            ));
        }
        if families.ipv6() {
            config.push_str(&neighbor(
                &format!("{name}6"),
                border6,
                65000,
                local6,
                "ipv6",
                "customer_in",
                "all",
            ));
        }
    }
    format!(
        r#"{config}
# A default route and the Internet host's network of each family, for
# the customer.
[[bgp.static]]
prefix = "0.0.0.0/0"
blackhole = true

[[bgp.static]]
prefix = "198.51.100.0/24"
device = "{host_interface}"

[[bgp.static]]
prefix = "::/0"
blackhole = true

[[bgp.static]]
prefix = "{INTERNET_NET6}"
device = "{host_interface}"

[policy.customer_in]
rules = [ {{ match = {{ prefix = ["{BLOCK}", "{BLOCK6}"] }}, action = "accept" }} ]
"#
    )
}

/// The ISP (BIRD): what [`isp_config`] has, in BIRD's words.
fn bird_isp_config(two: bool, bfd: bool, families: Families) -> String {
    let (bfd_protocol, bfd_on) = if bfd {
        (
            format!(
                "protocol bfd {{\n  interface \"*\" {{ interval {ISP_BFD_INTERVAL_MS} ms; \
                 multiplier {ISP_BFD_MULTIPLIER}; }};\n}}\n"
            ),
            "  bfd on;\n",
        )
    } else {
        (String::new(), "")
    };
    let mut customers = vec![(
        "customer",
        ISP_PEERING,
        BORDER_PEERING,
        ISP_PEERING6,
        BORDER_PEERING6,
    )];
    if two {
        customers.push((
            "customer2",
            ISP_PEERING2,
            BORDER2_PEERING,
            ISP_PEERING6_2,
            BORDER2_PEERING6,
        ));
    }
    let mut protocols = String::new();
    for (name, local, border, local6, border6) in customers {
        if families.ipv4() {
            protocols.push_str(&format!(
                r#"
protocol bgp {name} {{
  local {local} as 65001;
  neighbor {border} as 65000;
  error wait time 1, 4;
{bfd_on}  ipv4 {{
    import where net = {BLOCK};
    export where source = RTS_STATIC || net = 198.51.100.0/24;
  }};
}}
"#
            ));
        }
        if families.ipv6() {
            protocols.push_str(&format!(
                r#"
protocol bgp {name}6 {{
  local {local6} as 65001;
  neighbor {border6} as 65000;
  error wait time 1, 4;
{bfd_on}  ipv6 {{
    import where net = {BLOCK6};
    export where source = RTS_STATIC || net = {INTERNET_NET6};
  }};
}}
"#
            ));
        }
    }
    format!(
        r#"router id {ISP_PEERING};
protocol device {{ }}
protocol direct {{ ipv4; ipv6; }}
protocol kernel {{ ipv4 {{ export where source = RTS_BGP; }}; }}
protocol kernel {{ ipv6 {{ export where source = RTS_BGP; }}; }}
protocol static {{
  ipv4;
  route 0.0.0.0/0 blackhole;
}}
protocol static {{
  ipv6;
  route ::/0 blackhole;
}}
{bfd_protocol}{protocols}"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEERING: Peering<'static> = Peering {
        isp: ISP_PEERING,
        local: BORDER_PEERING,
        isp6: ISP_PEERING6,
        local6: BORDER_PEERING6,
    };

    #[test]
    fn bird_isp_runs_bfd_towards_both_borders_unless_off() {
        let on = bird_isp_config(true, true, Families::Ipv4Only);
        assert!(
            on.contains("protocol bfd {\n  interface \"*\" { interval 100 ms; multiplier 3; };")
        );
        assert_eq!(on.matches("  bfd on;\n").count(), 2, "{on}");
        let dual = bird_isp_config(true, true, Families::DualStack);
        assert_eq!(dual.matches("  bfd on;\n").count(), 4, "{dual}");
        let off = bird_isp_config(true, false, Families::DualStack);
        assert!(!off.contains("bfd"), "{off}");
    }

    #[test]
    fn bgp4mesh_neighbours_get_bfd_with_their_own_timers() {
        let on = with_bfd(border_bgp_config(&PEERING, Families::Ipv4Only), true);
        assert_eq!(
            on.matches("bfd = true\nbfd_interval = 100\nbfd_multiplier = 3\n")
                .count(),
            1,
            "{on}"
        );
        let dual = with_bfd(border_bgp_config(&PEERING, Families::DualStack), true);
        assert_eq!(dual.matches("bfd = true\n").count(), 2, "{dual}");
        let isp = with_bfd(isp_config("eth0", true, Families::DualStack), true);
        assert_eq!(isp.matches("bfd = true\n").count(), 4, "{isp}");
        let off = with_bfd(border_bgp_config(&PEERING, Families::DualStack), false);
        assert!(!off.contains("bfd"), "{off}");
    }

    #[test]
    fn each_family_has_its_own_session_and_block() {
        let dual = border_bgp_config(&PEERING, Families::DualStack);
        for needle in [
            "name = \"isp\"\naddress = \"172.30.0.1\"",
            "name = \"isp6\"\naddress = \"2001:db8:ff00::1\"",
            "local_address = \"2001:db8:ff00::100\"\nfamilies = [\"ipv6\"]",
            "prefix = \"2001:db8:44::/48\"",
            "prefix = [\"44.30.127.0/24\", \"2001:db8:44::/48\"]",
        ] {
            assert!(dual.contains(needle), "{needle:?} not in {dual}");
        }
        let v6 = border_bgp_config(&PEERING, Families::Ipv6Only);
        assert!(
            !v6.contains("44.30.127.0/24") && !v6.contains("address = \"172.30.0.1\""),
            "{v6}"
        );
        let bird = bird_isp_config(false, true, Families::Ipv6Only);
        assert!(
            bird.contains("protocol bgp customer6") && !bird.contains("protocol bgp customer {"),
            "{bird}"
        );
    }
}
