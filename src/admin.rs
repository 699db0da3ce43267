//! `bgp4mesh server`, `bgp4mesh join`, and the admin commands that talk to
//! the controller's API (`network`, `token`, `node`, `gateway`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use anyhow::{Context, Result};
use bgp4mesh_agent::Client;
use bgp4mesh_api::{GatewayCreate, NatMapping, Network, NetworkCreate, Node, Token, TokenCreate};
use clap::{Args, Subcommand};
use serde_json::Value;

/// Where the controller is and how to authenticate (flags or environment).
#[derive(Args, Debug, Clone)]
pub struct Remote {
    /// Controller URL, e.g. https://controller.example.net:8443
    #[arg(long, env = "BGP4MESH_SERVER", global = true)]
    pub server: Option<String>,
    /// Master key or API token
    #[arg(long, env = "BGP4MESH_KEY", global = true, hide_env_values = true)]
    pub key: Option<String>,
    /// SHA-256 of a self-signed controller certificate (from `bgp4mesh server`'s log)
    #[arg(long, env = "BGP4MESH_FINGERPRINT", global = true)]
    pub fingerprint: Option<String>,
    /// Print the controller's JSON instead of a table
    #[arg(long, global = true)]
    pub json: bool,
}

impl Remote {
    /// These flags, each one not given taken from `before` (the same flags
    /// written before the command: `bgp4mesh --json node list`).
    pub fn or(&self, before: &Remote) -> Remote {
        Remote {
            server: self.server.clone().or_else(|| before.server.clone()),
            key: self.key.clone().or_else(|| before.key.clone()),
            fingerprint: self
                .fingerprint
                .clone()
                .or_else(|| before.fingerprint.clone()),
            json: self.json || before.json,
        }
    }

    fn client(&self) -> Result<Client> {
        let server = self
            .server
            .as_deref()
            .context("give the controller with --server URL (or BGP4MESH_SERVER)")?;
        let key = self
            .key
            .clone()
            .context("give the master key or an API token with --key (or BGP4MESH_KEY)")?;
        Client::new(server, self.fingerprint.as_deref(), Some(key))
    }
}

#[derive(Subcommand, Debug)]
pub enum NetworkCommand {
    /// Create a network whose mesh addresses come from --range (IPv4),
    /// --range6 (IPv6) or both; at least one is required
    #[command(group(clap::ArgGroup::new("ranges").required(true).multiple(true).args(["range", "range6"])))]
    Create {
        netid: String,
        /// IPv4 block, e.g. 44.30.127.0/24
        #[arg(long)]
        range: Option<String>,
        /// IPv6 block, e.g. 2001:db8:44::/64 (a /64: each node puts its
        /// address with this prefix length on its interface)
        #[arg(long)]
        range6: Option<String>,
        #[arg(long)]
        mtu: Option<u16>,
        #[arg(long)]
        listen_port: Option<u16>,
        #[arg(long)]
        keepalive: Option<u16>,
    },
    List,
    Show {
        netid: String,
    },
    Delete {
        netid: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create an enrollment token for `bgp4mesh join`
    Create {
        #[arg(long)]
        network: String,
        /// How many nodes may join with it (default: unlimited)
        #[arg(long)]
        uses: Option<u32>,
        /// Seconds until it expires (default: never)
        #[arg(long)]
        expires_in: Option<u64>,
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    List {
        #[arg(long)]
        network: Option<String>,
    },
    Delete {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    List {
        network: Option<String>,
    },
    Show {
        network: String,
        node: String,
    },
    /// Remove a node: its peers drop it, its address is released
    Delete {
        network: String,
        node: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum GatewayCommand {
    /// Make NODE an egress gateway for --range (0.0.0.0/0: the Internet),
    /// and with --bgp for what it learns by BGP and exports ([mesh] export)
    Create {
        network: String,
        node: String,
        #[arg(long = "range", required_unless_present = "bgp")]
        ranges: Vec<String>,
        #[arg(long)]
        nat: bool,
        #[arg(long)]
        metric: Option<u32>,
        /// Also carry the prefixes the node learns by BGP and its [mesh]
        /// export policy takes (--range may then be left out)
        #[arg(long)]
        bgp: bool,
    },
    List {
        #[arg(long)]
        network: Option<String>,
    },
    Delete {
        network: String,
        node: String,
    },
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn print_networks(networks: &[Network]) {
    println!(
        "{:<16} {:<20} {:<24} {:>5} {:>6} nodes",
        "netid", "range", "range6", "mtu", "port"
    );
    for n in networks {
        println!(
            "{:<16} {:<20} {:<24} {:>5} {:>6} {}",
            n.netid,
            n.addressrange.as_deref().unwrap_or("-"),
            n.addressrange6.as_deref().unwrap_or("-"),
            n.mtu,
            n.listen_port,
            n.nodes
        );
    }
}

/// The nodes, one line each. An address column for each family some node
/// of the list has: IPv4-only networks keep one `address` column,
/// dual-stack ones add `address6`, IPv6-only ones have `address6` alone.
fn print_nodes(nodes: &[Node]) {
    let show4 = nodes.iter().any(|n| n.address.is_some()) || nodes.is_empty();
    let show6 = nodes.iter().any(|n| n.address6.is_some());
    let width6 = nodes
        .iter()
        .filter_map(|n| n.address6.map(|a| a.to_string().len()))
        .max()
        .unwrap_or(0)
        .max("address6".len());
    let addresses = |v4: String, v6: String| {
        let mut columns = String::new();
        if show4 {
            columns.push_str(&format!("{v4:<16} "));
        }
        if show6 {
            columns.push_str(&format!("{v6:<width6$} "));
        }
        columns
    };
    println!(
        "{:<16} {:<12} {:<16} {}{:<22} {:<7} egress",
        "id",
        "network",
        "name",
        addresses("address".into(), "address6".into()),
        "endpoint",
        "online"
    );
    for n in nodes {
        let egress = n
            .egress
            .as_ref()
            .map(|g| {
                let mut ranges: Vec<String> = g.ranges.iter().map(|r| r.to_string()).collect();
                if g.bgp {
                    // BGP-learned ranges can be many: a count, `--json` lists them.
                    ranges.push(format!("bgp({})", g.bgp_ranges.len()));
                }
                format!("{}{}", ranges.join(","), if g.nat { " nat" } else { "" })
            })
            .unwrap_or_default();
        println!(
            "{:<16} {:<12} {:<16} {}{:<22} {:<7} {}",
            n.id,
            n.network,
            n.name,
            addresses(
                n.address.map_or("-".to_string(), |a| a.to_string()),
                n.address6.map_or("-".to_string(), |a| a.to_string())
            ),
            match (&n.endpoint, &n.endpoint6) {
                (Some(e), Some(e6)) => format!("{e} {e6}"),
                (Some(e), None) => e.clone(),
                (None, _) => "-".into(),
            },
            if n.online { "yes" } else { "no" },
            egress
        );
    }
}

/// Below `node show`'s line: how its NAT maps (as the node measured it)
/// and where it may be reached when it publishes no endpoint.
fn print_reachability(n: &Node) {
    let nat = match n.nat {
        None => "not measured",
        Some(NatMapping::None) => "none (its own address)",
        Some(NatMapping::EndpointIndependent) => {
            "endpoint-independent (reachable by hole punching)"
        }
        Some(NatMapping::EndpointDependent) => "endpoint-dependent (reached through a relay)",
    };
    if let Some(e6) = &n.endpoint6 {
        println!("endpoint6: {e6} (peers with IPv6 send there)");
    }
    println!("nat: {nat}");
    if n.candidates.is_empty() {
        println!("candidates: -");
    } else {
        println!("candidates: {}", n.candidates.join(" "));
    }
    if let Some(port) = n.relay_port {
        println!("relay: on UDP port {port} (live)");
    }
}

fn print_tokens(tokens: &[Token]) {
    println!(
        "{:<16} {:<12} {:<10} {:<12} tags",
        "id", "network", "uses left", "expires at"
    );
    for t in tokens {
        println!(
            "{:<16} {:<12} {:<10} {:<12} {}",
            t.id,
            t.network,
            t.uses_left.map_or("unlimited".into(), |u| u.to_string()),
            t.expires_at.map_or("never".into(), |e| e.to_string()),
            t.tags.join(",")
        );
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub fn network(remote: &Remote, command: &NetworkCommand) -> Result<()> {
    let client = remote.client()?;
    runtime()?.block_on(async {
        match command {
            NetworkCommand::Create {
                netid,
                range,
                range6,
                mtu,
                listen_port,
                keepalive,
            } => {
                let n: Network = client
                    .post(
                        "/api/networks",
                        &NetworkCreate {
                            netid: netid.clone(),
                            addressrange: range.clone(),
                            addressrange6: range6.clone(),
                            mtu: *mtu,
                            listen_port: *listen_port,
                            persistent_keepalive: *keepalive,
                        },
                    )
                    .await?;
                if remote.json {
                    print_json(&n)
                } else {
                    print_networks(&[n]);
                    Ok(())
                }
            }
            NetworkCommand::List => {
                let n: Vec<Network> = client.get("/api/networks").await?;
                if remote.json {
                    print_json(&n)
                } else {
                    print_networks(&n);
                    Ok(())
                }
            }
            NetworkCommand::Show { netid } => {
                let n: Network = client.get(&format!("/api/networks/{netid}")).await?;
                if remote.json {
                    print_json(&n)
                } else {
                    print_networks(&[n]);
                    Ok(())
                }
            }
            NetworkCommand::Delete { netid } => {
                client.delete(&format!("/api/networks/{netid}")).await?;
                println!("network {netid} deleted");
                Ok(())
            }
        }
    })
}

pub fn token(remote: &Remote, command: &TokenCommand) -> Result<()> {
    let client = remote.client()?;
    runtime()?.block_on(async {
        match command {
            TokenCommand::Create {
                network,
                uses,
                expires_in,
                tags,
            } => {
                let t: Token = client
                    .post(
                        "/api/tokens",
                        &TokenCreate {
                            network: network.clone(),
                            expires_in: *expires_in,
                            uses: *uses,
                            tags: tags.clone(),
                        },
                    )
                    .await?;
                if remote.json {
                    return print_json(&t);
                }
                // The token alone on stdout, for `bgp4mesh join $(...)`.
                println!("{}", t.token.unwrap_or_default());
                Ok(())
            }
            TokenCommand::List { network } => {
                let path = match network {
                    Some(n) => format!("/api/tokens?network={n}"),
                    None => "/api/tokens".into(),
                };
                let t: Vec<Token> = client.get(&path).await?;
                if remote.json {
                    print_json(&t)
                } else {
                    print_tokens(&t);
                    Ok(())
                }
            }
            TokenCommand::Delete { id } => {
                client.delete(&format!("/api/tokens/{id}")).await?;
                println!("token {id} deleted");
                Ok(())
            }
        }
    })
}

pub fn node(remote: &Remote, command: &NodeCommand) -> Result<()> {
    let client = remote.client()?;
    runtime()?.block_on(async {
        match command {
            NodeCommand::List { network } => {
                let path = match network {
                    Some(n) => format!("/api/nodes/{n}"),
                    None => "/api/nodes".into(),
                };
                let n: Vec<Node> = client.get(&path).await?;
                if remote.json {
                    print_json(&n)
                } else {
                    print_nodes(&n);
                    Ok(())
                }
            }
            NodeCommand::Show { network, node } => {
                let n: Node = client.get(&format!("/api/nodes/{network}/{node}")).await?;
                if remote.json {
                    print_json(&n)
                } else {
                    print_nodes(std::slice::from_ref(&n));
                    print_reachability(&n);
                    Ok(())
                }
            }
            NodeCommand::Delete { network, node } => {
                client
                    .delete(&format!("/api/nodes/{network}/{node}"))
                    .await?;
                println!("node {node} deleted from {network}");
                Ok(())
            }
        }
    })
}

pub fn gateway(remote: &Remote, command: &GatewayCommand) -> Result<()> {
    let client = remote.client()?;
    runtime()?.block_on(async {
        match command {
            GatewayCommand::Create {
                network,
                node,
                ranges,
                nat,
                metric,
                bgp,
            } => {
                let n: Node = client
                    .post(
                        &format!("/api/nodes/{network}/{node}/creategateway"),
                        &GatewayCreate {
                            ranges: ranges.clone(),
                            nat_enabled: *nat,
                            metric: *metric,
                            bgp: *bgp,
                        },
                    )
                    .await?;
                if remote.json {
                    print_json(&n)
                } else {
                    print_nodes(&[n]);
                    Ok(())
                }
            }
            GatewayCommand::List { network } => {
                let path = match network {
                    Some(n) => format!("/api/gateways?network={n}"),
                    None => "/api/gateways".into(),
                };
                let g: Vec<Value> = client.get(&path).await?;
                print_json(&g)
            }
            GatewayCommand::Delete { network, node } => {
                client
                    .delete(&format!("/api/nodes/{network}/{node}/deletegateway"))
                    .await?;
                println!("{node} is no longer an egress gateway");
                Ok(())
            }
        }
    })
}

/// `join --address`: an IPv4 address; an IPv6 one is pointed to
/// `--address6` instead of failing as bad IPv4 syntax.
pub fn parse_address4(text: &str) -> Result<Ipv4Addr, String> {
    match text.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Ok(a),
        Ok(IpAddr::V6(_)) => Err("an IPv6 address: use --address6 for an IPv6 address".into()),
        Err(_) => Err("not an IPv4 address (like 44.30.127.2)".into()),
    }
}

/// `join --address6`: an IPv6 address; an IPv4 one is pointed to
/// `--address`.
pub fn parse_address6(text: &str) -> Result<Ipv6Addr, String> {
    match text.parse::<IpAddr>() {
        Ok(IpAddr::V6(a)) => Ok(a),
        Ok(IpAddr::V4(_)) => Err("an IPv4 address: use --address for an IPv4 address".into()),
        Err(_) => Err("not an IPv6 address (like 2001:db8:44::1)".into()),
    }
}

/// A node's mesh addresses for people: both when it has both, else the
/// one it has.
fn mesh_addresses(node: &Node) -> String {
    match (node.address, node.address6) {
        (Some(a), Some(b)) => format!("mesh addresses {a} and {b}"),
        (Some(a), None) => format!("mesh address {a}"),
        (None, Some(b)) => format!("mesh address {b}"),
        (None, None) => "no mesh address".into(),
    }
}

pub fn join(token: &str, state_dir: &Path, options: bgp4mesh_agent::JoinOptions) -> Result<()> {
    let response = runtime()?.block_on(bgp4mesh_agent::join(token, state_dir, options))?;
    println!(
        "joined network {} as {} ({}), {}",
        response.network.netid,
        response.node.name,
        response.node.id,
        mesh_addresses(&response.node)
    );
    println!("state in {}; now run `bgp4mesh run`", state_dir.display());
    Ok(())
}

pub fn server(config: &Path) -> Result<()> {
    let config = bgp4mesh_controller::config::ServerConfig::load(config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let running = bgp4mesh_controller::server::start(&config).await?;
        if let Some(fp) = &running.fingerprint {
            println!("fingerprint {fp}");
        }
        println!("listening on {}", running.addr);
        if let Some(d) = running.discovery {
            println!(
                "endpoint discovery on UDP {d} and port {}",
                d.port().saturating_add(1)
            );
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        }
        running.shutdown().await;
        anyhow::Ok(())
    })
}
