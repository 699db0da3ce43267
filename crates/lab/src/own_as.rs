//! Seed 004's "Testing with Mock ISP", in namespaces: your own AS.
//!
//! ```text
//!  internet host ── isp (AS 65001) ── border (AS 65000, 44.30.127.1, egress 0.0.0.0/0)
//!  198.51.100.10    198.51.100.1      172.30.0.100
//!                   172.30.0.1           │  WireGuard mesh over the "wan" switch
//!                                        ├── n1 44.30.127.2
//!            controller (wan) ───────────├── n2 44.30.127.3
//!                                        └── …
//! ```
//!
//! The border announces 44.30.127.0/24 to the ISP and learns the ISP's
//! routes (a default and the Internet host's network); mesh nodes get
//! public addresses of the block from the controller and send everything
//! else through the border. The ISP runs bgp4mesh or BIRD, with BFD on
//! its sessions with the borders unless `isp_bfd` is off.

use std::net::Ipv4Addr;
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
/// The second border (`borders: 2`): its own link to the ISP and a mesh
/// address at the top of the block; gateway metric 200 against the first
/// border's 100, so nodes prefer the first.
pub const BORDER2_ADDRESS: &str = "44.30.127.254";
pub const ISP_PEERING2: &str = "172.31.0.1";
pub const BORDER2_PEERING: &str = "172.31.0.100";
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
}

impl OwnAsOptions {
    /// Seed 004 as it is: static 0.0.0.0/0 egress, no friend; BFD with the
    /// ISP.
    pub fn new(binary: impl Into<PathBuf>, nodes: usize, isp: IspKind, borders: usize) -> Self {
        OwnAsOptions {
            binary: binary.into(),
            nodes,
            isp,
            borders,
            bgp_egress: false,
            friend: false,
            isp_bfd: true,
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
    pub address: Ipv4Addr,
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
    wan: Switch,
}

impl<'lab> OwnAs<'lab> {
    pub fn start(lab: &'lab Lab, options: &OwnAsOptions) -> Result<OwnAs<'lab>> {
        let binary = options.binary.clone();
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
        let (isp_to_border, border_to_isp) = lab.link(&isp_node, &border_node)?;
        lab.add_address(&isp_node, &isp_to_border.name, &format!("{ISP_PEERING}/24"))?;
        lab.add_address(
            &border_node,
            &border_to_isp.name,
            &format!("{BORDER_PEERING}/24"),
        )?;
        lab.enable_forwarding(&isp_node)?;
        lab.enable_forwarding(&border_node)?;
        let two = options.borders >= 2;
        let border2_node = if two {
            let node = lab.add_node("border2")?;
            let (isp_end, border_end) = lab.link(&isp_node, &node)?;
            lab.add_address(&isp_node, &isp_end.name, &format!("{ISP_PEERING2}/24"))?;
            lab.add_address(&node, &border_end.name, &format!("{BORDER2_PEERING}/24"))?;
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
                &with_bfd(isp_config(&isp_to_host.name, two), options.isp_bfd),
            )?),
            IspKind::Bird => Isp::Bird(Bird::start(
                lab,
                &isp_node,
                &bird_isp_config(two, options.isp_bfd),
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
        this_admin.run(&["network", "create", "mynet", "--range", BLOCK])?;
        let token = this_admin
            .run(&["token", "create", "--network", "mynet"])?
            .trim()
            .to_string();

        // The borders: BGP with the ISP, the mesh, and the egress.
        let start_border = |node: &Node,
                            isp_link: &Iface,
                            name: &str,
                            address: &str,
                            peering: (&str, &str),
                            metric: &str,
                            friend: bool|
         -> Result<MeshNode<'lab>> {
            let wan_end = lab.attach(&wan, node)?;
            let endpoint = wan_end.ipv4.to_string();
            join(lab, &binary, node, &token, name, &endpoint, Some(address))?;
            let interface = lab.unique_ifname("mesh")?;
            let export = if options.bgp_egress { MESH_EXPORT } else { "" };
            let friend = if friend { FRIEND_NEIGHBOR } else { "" };
            let config = format!(
                "{}{friend}\n{}{export}",
                with_bfd(border_bgp_config(peering.0, peering.1), options.isp_bfd),
                mesh_config(lab, node, &interface)?
            );
            let daemon = Bgp4mesh::start(lab, node, &binary, &config)?;
            let egress: &[&str] = if options.bgp_egress {
                &["--bgp"]
            } else {
                &["--range", "0.0.0.0/0"]
            };
            let mut args = vec!["gateway", "create", "mynet", name, "--metric", metric];
            args.extend_from_slice(egress);
            this_admin.run(&args)?;
            Ok(MeshNode {
                name: name.into(),
                daemon,
                interface,
                address: address.parse()?,
                wan: wan_end,
                isp_link: Some(isp_link.clone()),
            })
        };
        let border = start_border(
            &border_node,
            &border_to_isp,
            "border",
            BORDER_ADDRESS,
            (ISP_PEERING, BORDER_PEERING),
            "100",
            false,
        )?;
        let border2 = match &border2_node {
            Some((node, isp_link)) => Some(start_border(
                node,
                isp_link,
                "border2",
                BORDER2_ADDRESS,
                (ISP_PEERING2, BORDER2_PEERING),
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
                &wan_end.ipv4.to_string(),
                None,
            )?;
            let interface = lab.unique_ifname("mesh")?;
            let daemon =
                Bgp4mesh::start(lab, &node, &binary, &mesh_config(lab, &node, &interface)?)?;
            nodes.push(MeshNode {
                name,
                daemon,
                interface,
                address: Ipv4Addr::UNSPECIFIED,
                wan: wan_end,
                isp_link: None,
            });
        }
        let listed = this_admin.run(&["--json", "node", "list", "mynet"])?;
        let listed: serde_json::Value = serde_json::from_str(&listed)?;
        for n in &mut nodes {
            n.address = listed
                .as_array()
                .and_then(|a| a.iter().find(|v| v["name"] == n.name.as_str()))
                .and_then(|v| v["address"].as_str())
                .and_then(|a| a.parse().ok())
                .with_context(|| format!("no address for {}", n.name))?;
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
        let table = "b4m_silence";
        if silent {
            let rules = format!(
                "table inet {table} {{\n\
                 chain input {{ type filter hook input priority -300; policy drop; }}\n\
                 chain output {{ type filter hook output priority -300; policy drop; }}\n\
                 chain forward {{ type filter hook forward priority -300; policy drop; }}\n\
                 }}\n"
            );
            let file = self.lab.run_dir(node)?.join("silence.nft");
            std::fs::write(&file, rules)?;
            self.lab
                .exec(node, &["nft", "-f", &file.to_string_lossy()])?;
        } else {
            self.lab
                .exec(node, &["nft", "delete", "table", "inet", table])?;
        }
        Ok(())
    }

    /// Cuts a machine's WireGuard underlay (`true`): every UDP datagram in
    /// and out is dropped but BFD's (ports 3784, 3785, 4784), so its BGP
    /// sessions, BFD and the controller link (TCP) stay up while its mesh
    /// carries nothing: a firewall change, or a crashed device thread.
    /// `false` mends it.
    pub fn cut_mesh(&self, node: &Node, cut: bool) -> Result<()> {
        let table = "b4m_mesh_cut";
        if cut {
            let keep = "{ 3784, 3785, 4784 }";
            let rule = format!("meta l4proto udp udp dport != {keep} udp sport != {keep} drop");
            let rules = format!(
                "table inet {table} {{\n\
                 chain input {{ type filter hook input priority -300; policy accept; {rule}; }}\n\
                 chain output {{ type filter hook output priority -300; policy accept; {rule}; }}\n\
                 }}\n"
            );
            let file = self.lab.run_dir(node)?.join("mesh-cut.nft");
            std::fs::write(&file, rules)?;
            self.lab
                .exec(node, &["nft", "-f", &file.to_string_lossy()])?;
        } else {
            self.lab
                .exec(node, &["nft", "delete", "table", "inet", table])?;
        }
        Ok(())
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
        if cut {
            let (inbound, outbound) = matches;
            let rules = format!(
                "table inet {table} {{\n\
                 chain prerouting {{ type filter hook prerouting priority -300; policy accept; {inbound} drop; }}\n\
                 chain postrouting {{ type filter hook postrouting priority -300; policy accept; {outbound} drop; }}\n\
                 }}\n"
            );
            let file = self.lab.run_dir(node)?.join(format!("{table}.nft"));
            std::fs::write(&file, rules)?;
            self.lab
                .exec(node, &["nft", "-f", &file.to_string_lossy()])?;
        } else {
            self.lab
                .exec(node, &["nft", "delete", "table", "inet", table])?;
        }
        Ok(())
    }

    pub fn wan(&self) -> &Switch {
        &self.wan
    }

    /// Waits until the border's session with the ISP is up and the ISP has
    /// the block.
    pub fn wait_bgp(&self, timeout: Duration) -> Result<()> {
        wait_until(timeout, "the border's BGP session with the ISP", || {
            let state = self.border.daemon.bgp_state("isp")?;
            ensure!(
                state == crate::peers::SessionState::Established,
                "{state:?}"
            );
            Ok(())
        })?;
        wait_until(timeout, "44.30.127.0/24 at the ISP", || {
            let routes = match &self.isp {
                Isp::Bgp4mesh(isp) => isp.routes()?,
                Isp::Bird(isp) => isp.routes()?,
            };
            ensure!(
                routes.iter().any(|r| r.prefix == BLOCK),
                "the ISP has {routes:?}"
            );
            Ok(())
        })
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

fn join(
    lab: &Lab,
    binary: &Path,
    node: &Node,
    token: &str,
    name: &str,
    endpoint: &str,
    address: Option<&str>,
) -> Result<()> {
    let state = lab.run_dir(node)?.join("agent");
    let binary = binary.to_string_lossy();
    let state = state.to_string_lossy();
    let mut cmd = vec![
        binary.as_ref(),
        "join",
        token,
        "--name",
        name,
        "--endpoint",
        endpoint,
        "--state-dir",
        state.as_ref(),
    ];
    if let Some(a) = address {
        cmd.extend(["--address", a]);
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
rules = [ { match = { neighbor = ["isp", "friend"] }, action = "accept" } ]
"#;

/// The second border's session with the friend (appended to its `[bgp]`).
const FRIEND_NEIGHBOR: &str = r#"
[[bgp.neighbor]]
name = "friend"
address = "172.29.0.1"
remote_as = 65002
local_address = "172.29.0.100"
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

fn border_bgp_config(isp: &str, local: &str) -> String {
    format!(
        r#"[bgp]
asn = 65000
router_id = "{local}"

[[bgp.neighbor]]
name = "isp"
address = "{isp}"
remote_as = 65001
local_address = "{local}"
import = "all"
export = "announce"
connect_retry = 1
error_wait = [1, 4]

[[bgp.static]]
prefix = "{BLOCK}"
blackhole = true

[policy.announce]
rules = [ {{ match = {{ prefix = ["{BLOCK}"] }}, action = "accept" }} ]
"#
    )
}

fn isp_config(host_interface: &str, two: bool) -> String {
    let second = if two {
        format!(
            r#"
[[bgp.neighbor]]
name = "customer2"
address = "{BORDER2_PEERING}"
remote_as = 65000
local_address = "{ISP_PEERING2}"
import = "customer_in"
export = "all"
connect_retry = 1
error_wait = [1, 4]
"#
        )
    } else {
        String::new()
    };
    format!(
        r#"[bgp]
asn = 65001
router_id = "{ISP_PEERING}"

[[bgp.neighbor]]
name = "customer"
address = "{BORDER_PEERING}"
remote_as = 65000
local_address = "{ISP_PEERING}"
import = "customer_in"
export = "all"
connect_retry = 1
error_wait = [1, 4]

# A default route and the Internet host's network, for the customer.
[[bgp.static]]
prefix = "0.0.0.0/0"
blackhole = true

[[bgp.static]]
prefix = "198.51.100.0/24"
device = "{host_interface}"

[policy.customer_in]
rules = [ {{ match = {{ prefix = ["{BLOCK}"] }}, action = "accept" }} ]
{second}"#
    )
}

fn bird_isp_config(two: bool, bfd: bool) -> String {
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
    let second = if two {
        format!(
            r#"
protocol bgp customer2 {{
  local {ISP_PEERING2} as 65001;
  neighbor {BORDER2_PEERING} as 65000;
  error wait time 1, 4;
{bfd_on}  ipv4 {{
    import where net = {BLOCK};
    export where source = RTS_STATIC || net = 198.51.100.0/24;
  }};
}}
"#
        )
    } else {
        String::new()
    };
    format!(
        r#"router id {ISP_PEERING};
protocol device {{ }}
protocol direct {{ ipv4; }}
protocol kernel {{ ipv4 {{ export where source = RTS_BGP; }}; }}
protocol static {{
  ipv4;
  route 0.0.0.0/0 blackhole;
}}
{bfd_protocol}protocol bgp customer {{
  local {ISP_PEERING} as 65001;
  neighbor {BORDER_PEERING} as 65000;
  error wait time 1, 4;
{bfd_on}  ipv4 {{
    import where net = {BLOCK};
    export where source = RTS_STATIC || net = 198.51.100.0/24;
  }};
}}
{second}"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bird_isp_runs_bfd_towards_both_borders_unless_off() {
        let on = bird_isp_config(true, true);
        assert!(
            on.contains("protocol bfd {\n  interface \"*\" { interval 100 ms; multiplier 3; };")
        );
        assert_eq!(on.matches("  bfd on;\n").count(), 2, "{on}");
        let off = bird_isp_config(true, false);
        assert!(!off.contains("bfd"), "{off}");
    }

    #[test]
    fn bgp4mesh_neighbours_get_bfd_with_their_own_timers() {
        let on = with_bfd(border_bgp_config(ISP_PEERING, BORDER_PEERING), true);
        assert_eq!(
            on.matches("bfd = true\nbfd_interval = 100\nbfd_multiplier = 3\n")
                .count(),
            1,
            "{on}"
        );
        let isp = with_bfd(isp_config("eth0", true), true);
        assert_eq!(isp.matches("bfd = true\n").count(), 2, "{isp}");
        let off = with_bfd(border_bgp_config(ISP_PEERING, BORDER_PEERING), false);
        assert!(!off.contains("bfd"), "{off}");
    }
}
