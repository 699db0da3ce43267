//! `bgp4mesh`: one binary for the daemon, the controller, the CLI and the lab.
//! This file only parses the command line and calls into the crates.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bgp4mesh_node::config::{DEFAULT_CONTROL_SOCKET, NodeConfig};
use bgp4mesh_node::control::{self, Request};
use bgp4mesh_node::show;
use clap::{Args, Parser, Subcommand};

/// mimalloc instead of glibc's malloc: a full table is a million small
/// allocations (attribute sets, prefix lists, UPDATEs), and glibc's
/// free-list upkeep took a fifth of the load (perf, BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's number for `mi_option_purge_delay` (`mi_option_e` in the
/// bundled mimalloc 3's mimalloc.h; libmimalloc-sys does not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Memory freed goes back to the kernel at once instead of a second later
/// (mimalloc 3's default purge delay).
/// With that and arenas committed as they are used (`.cargo/config.toml`:
/// that one is read before `main`), a full table's peak RSS is below
/// BIRD's; with mimalloc's defaults it was 5-10% over, and an IPv6 table's
/// twice (BENCHMARKS.md).
fn tune_allocator() {
    // SAFETY: mi_option_set stores an integer in mimalloc's option table;
    // no pointers are involved, and 0 is a valid purge delay.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

mod admin;
mod lab_as;
mod wireguard_cmd;

#[derive(Parser)]
#[command(
    name = "bgp4mesh",
    version,
    about = "Run your own Autonomous System: a BGP speaker, a WireGuard mesh and its control plane",
    long_about = "Run your own Autonomous System: a border router announces your IP block to an ISP or \
                  IXP over BGP, and nodes anywhere get public addresses of that block through a \
                  WireGuard mesh run by a central control plane."
)]
struct Cli {
    /// The commands' own options are also taken before the command
    /// (`bgp4mesh -s SOCKET show protocols`, `bgp4mesh --json node
    /// list`), as they always were; each command's help lists its own.
    #[command(flatten)]
    before: Before,
    #[command(subcommand)]
    command: Command,
}

/// The options given before the command, hidden from `--help`.
#[derive(Args)]
struct Before {
    #[arg(short = 's', long, hide = true)]
    socket: Option<PathBuf>,
    #[arg(short = 'c', long, hide = true)]
    config: Option<PathBuf>,
    #[arg(long, env = "BGP4MESH_SERVER", hide = true)]
    server: Option<String>,
    #[arg(long, env = "BGP4MESH_KEY", hide = true, hide_env_values = true)]
    key: Option<String>,
    #[arg(long, env = "BGP4MESH_FINGERPRINT", hide = true)]
    fingerprint: Option<String>,
    #[arg(long, hide = true)]
    json: bool,
}

impl Before {
    fn remote(&self) -> admin::Remote {
        admin::Remote {
            server: self.server.clone(),
            key: self.key.clone(),
            fingerprint: self.fingerprint.clone(),
            json: self.json,
        }
    }
}

/// How the commands that talk to the daemon find it.
#[derive(Args, Clone, Default)]
struct Daemon {
    /// Control socket of the running daemon (default: from -c FILE, else /run/bgp4mesh/bgp4mesh.sock)
    #[arg(short = 's', long, global = true)]
    socket: Option<PathBuf>,
    /// Config file (for the commands that talk to the daemon: to find its control socket)
    #[arg(short = 'c', long, global = true)]
    config: Option<PathBuf>,
}

impl Daemon {
    /// These, each one not given taken from before the command.
    fn or(&self, before: &Before) -> Daemon {
        Daemon {
            socket: self.socket.clone().or_else(|| before.socket.clone()),
            config: self.config.clone().or_else(|| before.config.clone()),
        }
    }
}

/// The config file only (run, check, server).
#[derive(Args, Clone, Default)]
struct ConfigFile {
    /// Config file
    #[arg(short = 'c', long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node daemon in the foreground (logs to stderr)
    Run {
        #[command(flatten)]
        file: ConfigFile,
        /// Log level: error, warn, info, debug
        #[arg(long, default_value = "info")]
        log_level: String,
    },
    /// Check a config file and say what is wrong with it
    Check {
        #[command(flatten)]
        file: ConfigFile,
    },
    /// Show the daemon's state, like birdc's show
    Show {
        #[command(flatten)]
        daemon: Daemon,
        #[command(subcommand)]
        what: ShowCommand,
    },
    /// A new WireGuard private key on stdout (base64, like `wg genkey`)
    Genkey,
    /// The public key of the private key read on stdin (like `wg pubkey`)
    Pubkey,
    /// Act on a BGP neighbor (`bgp enable|disable|restart|refresh NEIGHBOR`), or `bgp reload` the config
    Bgp {
        #[command(flatten)]
        daemon: Daemon,
        #[arg(value_parser = ["enable", "disable", "restart", "refresh", "reload"])]
        action: String,
        neighbor: Option<String>,
        /// Shutdown communication sent with disable (RFC 9003)
        #[arg(long)]
        message: Option<String>,
    },
    /// Network-namespace labs on this machine (needs root)
    #[command(subcommand)]
    Lab(LabCommand),
    /// Benchmarks against the competitors, in network namespaces (needs root)
    #[command(subcommand)]
    Bench(bgp4mesh_bench::BenchCommand),
    /// Run the controller: REST API, store, enrollment, push stream
    Server {
        #[command(flatten)]
        file: ConfigFile,
        /// Log level: error, warn, info, debug
        #[arg(long, default_value = "info")]
        log_level: String,
    },
    /// Enroll this machine in a mesh with an enrollment token (then `bgp4mesh run`)
    Join {
        token: String,
        /// Node name (default: the host name)
        #[arg(long)]
        name: Option<String>,
        /// This node's public address, IP or IP:port, if it has one (else it dials out)
        #[arg(long)]
        endpoint: Option<String>,
        /// This node's public IPv6 address, IP or [IP]:port, next to an IPv4 --endpoint: peers with IPv6 reach it there
        #[arg(long)]
        endpoint6: Option<String>,
        #[arg(long)]
        listen_port: Option<u16>,
        /// Pin the IPv4 mesh address (gateways and borders)
        #[arg(long, value_parser = admin::parse_address4)]
        address: Option<std::net::Ipv4Addr>,
        /// Pin the IPv6 mesh address (gateways and borders)
        #[arg(long, value_parser = admin::parse_address6)]
        address6: Option<std::net::Ipv6Addr>,
        /// Where the key and credential go
        #[arg(long, default_value = bgp4mesh_agent::agent::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Join again although this machine already joined
        #[arg(long)]
        force: bool,
    },
    /// Networks on the controller (create, list, show, delete)
    Network {
        #[command(flatten)]
        remote: admin::Remote,
        #[command(subcommand)]
        command: admin::NetworkCommand,
    },
    /// Enrollment tokens (create, list, delete)
    Token {
        #[command(flatten)]
        remote: admin::Remote,
        #[command(subcommand)]
        command: admin::TokenCommand,
    },
    /// Nodes (list, show, delete)
    Node {
        #[command(flatten)]
        remote: admin::Remote,
        #[command(subcommand)]
        command: admin::NodeCommand,
    },
    /// Egress gateways (create, list, delete)
    Gateway {
        #[command(flatten)]
        remote: admin::Remote,
        #[command(subcommand)]
        command: admin::GatewayCommand,
    },
    /// A userspace WireGuard device with a `wg`-compatible UAPI socket, like wireguard-go
    /// (also run as `bgp4mesh-wireguard IFACE` through a symlink, for wg-quick)
    Wireguard {
        /// Interface name
        interface: String,
        /// Stay in the foreground (logs to stderr) instead of detaching
        #[arg(short, long)]
        foreground: bool,
        /// MTU of the interface
        #[arg(long, default_value_t = bgp4mesh_wireguard::DEFAULT_MTU)]
        mtu: u16,
        /// Log level: error, warn, info, debug
        #[arg(long, default_value = "info")]
        log_level: String,
        /// (tests) start a new handshake after this many seconds instead of 120
        #[arg(long, hide = true)]
        rekey_after_time: Option<u64>,
    },
}

#[derive(Subcommand)]
enum ShowCommand {
    /// BGP sessions: `show protocols [all] [NAME]`
    Protocols {
        words: Vec<String>,
        /// The daemon's JSON answer instead of the table
        #[arg(long)]
        json: bool,
    },
    /// Routes: `show route [PREFIX] [all]`, `show route export NEIGHBOR [all]`
    Route {
        words: Vec<String>,
        /// The daemon's JSON answer instead of the table
        #[arg(long)]
        json: bool,
    },
    /// BFD: `show bfd sessions`
    Bfd {
        #[arg(value_parser = ["sessions"])]
        what: Option<String>,
        /// The daemon's JSON answer instead of the table
        #[arg(long)]
        json: bool,
    },
    /// The `[[peering]]` tunnels: interface, keys, endpoint, handshake, transfer, session
    Peerings {
        /// The daemon's JSON answer instead of the table
        #[arg(long)]
        json: bool,
    },
    /// The `[[wireguard]]` interfaces: public key, port, and per peer endpoint, handshake, transfer
    Wireguard {
        /// The daemon's JSON answer instead of the table
        #[arg(long)]
        json: bool,
    },
    /// The mesh's peers: path (direct or none), endpoint, last handshake, round trip through the tunnel
    Mesh {
        /// The daemon's JSON answer instead of the table
        #[arg(long)]
        json: bool,
    },
    /// The layer-2 overlay: its bridge, and per wire the VXLAN port, the tunnel it goes over, its VNI and ends
    Overlay {
        /// The daemon's JSON answer instead of the table
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build your own AS (seed 004 with a mock ISP) in namespaces and leave it running:
    /// dual-stack (44.30.127.0/24 and 2001:db8:44::/48, a BGP session per family)
    Up {
        /// Mesh nodes
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// The mock ISP's BGP speaker: bgp4mesh or bird
        #[arg(long, default_value = "bgp4mesh")]
        isp: String,
        /// Border routers: 1, or 2 (the second a backup, metric 200)
        #[arg(long, default_value_t = 1)]
        borders: usize,
        /// The borders' egress: `static` (0.0.0.0/0) or `bgp` (what they
        /// learn from the ISP, by `[mesh] export`)
        #[arg(long, default_value = "static")]
        egress: String,
        /// BFD between the ISP and the borders (100 ms × 3): `on`, or `off`
        /// for an ISP without it (a hung border is then left only when the
        /// ISP's 90 s hold timer expires)
        #[arg(long, default_value = "on")]
        isp_bfd: String,
        /// An IPv4-only AS: 44.30.127.0/24 and the IPv4 session alone
        #[arg(long, conflicts_with = "ipv6_only")]
        ipv4_only: bool,
        /// An IPv6-only AS: 2001:db8:44::/48 over the IPv6 session alone,
        /// no IPv4 range in the mesh
        #[arg(long)]
        ipv6_only: bool,
    },
    /// What the lab that is up has: nodes, addresses, sessions, routes
    Status,
    /// Remove the lab that is up
    Down,
    /// Run a command in a node of the lab that is up (`bgp4mesh …` talks to that node's daemon)
    Exec {
        node: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Build BIRD — FRR — GoBGP in namespaces, show a route crossing them, tear down
    Demo,
    /// Remove namespaces and processes left behind by killed lab runs
    Sweep {
        /// Remove every lab, also those of live processes and persistent ones
        #[arg(long)]
        all: bool,
    },
}

fn main() -> ExitCode {
    tune_allocator();
    // Called as `bgp4mesh-wireguard IFACE` (a symlink, what wg-quick's
    // WG_QUICK_USERSPACE_IMPLEMENTATION names): the `wireguard` command.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let called_as = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned());
    if called_as.as_deref() == Some("bgp4mesh-wireguard") {
        args.insert(1, "wireguard".into());
    }
    let cli = Cli::parse_from(args);
    let before = &cli.before;
    let file = |f: &ConfigFile| Daemon {
        socket: None,
        config: f.config.clone(),
    };
    let result = match &cli.command {
        Command::Run { file: f, log_level } => run(&file(f).or(before), log_level),
        Command::Check { file: f } => check(&file(f).or(before)),
        Command::Show { daemon, what } => {
            let cli = daemon.or(before);
            match what {
                ShowCommand::Protocols { words, json } => show_protocols(&cli, words, *json),
                ShowCommand::Route { words, json } => show_route(&cli, words, *json),
                ShowCommand::Bfd { json, .. } => show_bfd(&cli, *json),
                ShowCommand::Peerings { json } => show_peerings(&cli, *json),
                ShowCommand::Wireguard { json } => show_wireguard(&cli, *json),
                ShowCommand::Overlay { json } => show_overlay(&cli, *json),
                ShowCommand::Mesh { json } => show_mesh(&cli, *json),
            }
        }
        Command::Genkey => genkey(),
        Command::Pubkey => pubkey(),
        Command::Bgp {
            daemon,
            action,
            neighbor,
            message,
        } => bgp_action(
            &daemon.or(before),
            action,
            neighbor.as_deref(),
            message.clone(),
        ),
        Command::Bench(command) => bgp4mesh_bench::run(command),
        Command::Server { file: f, log_level } => {
            init_logs(log_level).and_then(|()| admin::server(config_path(&file(f).or(before))?))
        }
        Command::Join {
            token,
            name,
            endpoint,
            endpoint6,
            listen_port,
            address,
            address6,
            state_dir,
            force,
        } => admin::join(
            token,
            state_dir,
            bgp4mesh_agent::JoinOptions {
                name: name.clone(),
                endpoint: endpoint.clone(),
                endpoint6: endpoint6.clone(),
                listen_port: *listen_port,
                address: *address,
                address6: *address6,
                force: *force,
            },
        ),
        Command::Network { remote, command } => {
            admin::network(&remote.or(&before.remote()), command)
        }
        Command::Token { remote, command } => admin::token(&remote.or(&before.remote()), command),
        Command::Node { remote, command } => admin::node(&remote.or(&before.remote()), command),
        Command::Gateway { remote, command } => {
            admin::gateway(&remote.or(&before.remote()), command)
        }
        Command::Wireguard {
            interface,
            foreground,
            mtu,
            log_level,
            rekey_after_time,
        } => wireguard_cmd::run(interface, *foreground, *mtu, log_level, *rekey_after_time),
        Command::Lab(LabCommand::Up {
            nodes,
            isp,
            borders,
            egress,
            isp_bfd,
            ipv4_only,
            ipv6_only,
        }) => lab_as::up(
            *nodes,
            isp,
            *borders,
            egress,
            isp_bfd,
            (*ipv4_only, *ipv6_only),
        ),
        Command::Lab(LabCommand::Status) => lab_as::status(),
        Command::Lab(LabCommand::Down) => lab_as::down(),
        Command::Lab(LabCommand::Exec { node, command }) => lab_as::exec(node, command),
        Command::Lab(LabCommand::Demo) => lab_demo(),
        Command::Lab(LabCommand::Sweep { all }) => lab_sweep(*all),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bgp4mesh: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_path(cli: &Daemon) -> Result<&PathBuf> {
    cli.config
        .as_ref()
        .context("give the config file with -c FILE")
}

fn init_logs(log_level: &str) -> Result<()> {
    let level: tracing::Level = log_level.parse().map_err(|_| {
        anyhow::anyhow!("--log-level: {log_level:?} is not one of error, warn, info, debug, trace")
    })?;
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    Ok(())
}

fn run(cli: &Daemon, log_level: &str) -> Result<()> {
    init_logs(log_level)?;
    // After `bgp4mesh join`, `bgp4mesh run` needs no config file.
    let joined = std::path::Path::new(bgp4mesh_agent::agent::DEFAULT_STATE_DIR);
    if cli.config.is_none() && joined.join("node.json").exists() {
        return bgp4mesh_node::daemon::run_config(NodeConfig::mesh_only(joined));
    }
    bgp4mesh_node::daemon::run(config_path(cli)?)
}

fn check(cli: &Daemon) -> Result<()> {
    let path = config_path(cli)?;
    let config = NodeConfig::load(path)?;
    for warning in config.bgp.iter().flat_map(|b| b.warnings.iter()) {
        eprintln!("warning: {warning}");
    }
    println!("{}: OK", path.display());
    Ok(())
}

fn socket(cli: &Daemon) -> Result<PathBuf> {
    if let Some(s) = &cli.socket {
        return Ok(s.clone());
    }
    if let Some(path) = &cli.config {
        return Ok(NodeConfig::load(path)?.control_socket);
    }
    Ok(PathBuf::from(DEFAULT_CONTROL_SOCKET))
}

fn ask(cli: &Daemon, request: Request) -> Result<serde_json::Value> {
    let response = control::call(&socket(cli)?, &request)?;
    if !response.ok {
        bail!(
            "{}",
            response
                .error
                .unwrap_or_else(|| "the daemon refused".into())
        );
    }
    Ok(response.data)
}

fn print_json(data: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(data)?);
    Ok(())
}

fn show_protocols(cli: &Daemon, words: &[String], json: bool) -> Result<()> {
    let all = words.iter().any(|w| w == "all");
    let names: Vec<&String> = words.iter().filter(|w| *w != "all").collect();
    if names.len() > 1 {
        bail!("show protocols [all] [NAME]: one name at most");
    }
    let data = ask(
        cli,
        Request::ShowProtocols {
            name: names.first().map(|s| s.to_string()),
        },
    )?;
    if json {
        return print_json(&data);
    }
    print!("{}", show::render_protocols(&data, all));
    Ok(())
}

fn show_route(cli: &Daemon, words: &[String], json: bool) -> Result<()> {
    let all = words.iter().any(|w| w == "all");
    let rest: Vec<&String> = words.iter().filter(|w| *w != "all").collect();
    let request = match rest.as_slice() {
        [] => Request::ShowRoute {
            prefix: None,
            export: None,
        },
        [kw, neighbor] if kw.as_str() == "export" => Request::ShowRoute {
            prefix: None,
            export: Some(neighbor.to_string()),
        },
        [prefix] => {
            let prefix = prefix
                .parse()
                .map_err(|_| anyhow::anyhow!("{prefix:?} is not a prefix like 192.0.2.0/24"))?;
            Request::ShowRoute {
                prefix: Some(prefix),
                export: None,
            }
        }
        _ => bail!("show route [PREFIX] [all] | show route export NEIGHBOR [all]"),
    };
    let data = ask(cli, request)?;
    if json {
        return print_json(&data);
    }
    print!("{}", show::render_routes(&data, all));
    Ok(())
}

fn show_bfd(cli: &Daemon, json: bool) -> Result<()> {
    let data = ask(cli, Request::ShowBfd)?;
    if json {
        return print_json(&data);
    }
    print!("{}", show::render_bfd(&data));
    Ok(())
}

fn show_peerings(cli: &Daemon, json: bool) -> Result<()> {
    let data = ask(cli, Request::ShowPeerings)?;
    if json {
        return print_json(&data);
    }
    print!("{}", show::render_peerings(&data));
    Ok(())
}

fn show_wireguard(cli: &Daemon, json: bool) -> Result<()> {
    let data = ask(cli, Request::ShowWireguard)?;
    if json {
        return print_json(&data);
    }
    print!("{}", show::render_wireguard(&data));
    Ok(())
}

fn show_overlay(cli: &Daemon, json: bool) -> Result<()> {
    let data = ask(cli, Request::ShowOverlay)?;
    if json {
        return print_json(&data);
    }
    print!("{}", show::render_overlay(&data));
    Ok(())
}

fn show_mesh(cli: &Daemon, json: bool) -> Result<()> {
    let data = ask(cli, Request::ShowMesh)?;
    if json {
        return print_json(&data);
    }
    print!("{}", show::render_mesh(&data, now_unix()));
    Ok(())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// `wg genkey`: a private key, base64, on stdout.
fn genkey() -> Result<()> {
    println!(
        "{}",
        bgp4mesh_wireguard::Key::generate_private().to_base64()
    );
    Ok(())
}

/// `wg pubkey`: the public key of the private key on stdin.
fn pubkey() -> Result<()> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut text)
        .context("reading the private key from stdin")?;
    // The private key itself is never part of a message.
    let key = bgp4mesh_wireguard::Key::from_base64(&text)
        .map_err(|e| anyhow::anyhow!("stdin: {e} (a private key from `bgp4mesh genkey`)"))?;
    println!("{}", key.public_key().to_base64());
    Ok(())
}

fn bgp_action(
    cli: &Daemon,
    action: &str,
    neighbor: Option<&str>,
    message: Option<String>,
) -> Result<()> {
    if action == "reload" {
        ask(cli, Request::Reload)?;
        println!("configuration reloaded");
        return Ok(());
    }
    let neighbor = neighbor.with_context(|| format!("bgp {action} NEIGHBOR: which neighbor?"))?;
    let name = neighbor.to_string();
    let request = match action {
        "enable" => Request::Enable { name },
        "disable" => Request::Disable { name, message },
        "restart" => Request::Restart { name },
        _ => Request::Refresh { name },
    };
    ask(cli, request)?;
    println!("{neighbor}: {action} done");
    Ok(())
}

fn lab_sweep(all: bool) -> Result<()> {
    let report = if all {
        bgp4mesh_lab::sweep_all()?
    } else {
        bgp4mesh_lab::sweep()?
    };
    if report.is_empty() {
        println!("nothing to sweep");
    } else {
        println!(
            "removed labs {:?}: namespaces {:?}, {} processes killed",
            report.labs, report.namespaces, report.processes_killed
        );
    }
    Ok(())
}

fn lab_demo() -> Result<()> {
    use bgp4mesh_lab::peers::best_route;
    use bgp4mesh_lab::scenarios::Chain;

    let lab = bgp4mesh_lab::Lab::new("demo")?;
    println!(
        "building BIRD (AS 65001) — FRR (AS 65002) — GoBGP (AS 65003) in lab {}",
        lab.id()
    );
    let chain = Chain::start(&lab)?;
    chain.wait_established(Duration::from_secs(30))?;
    println!("sessions: {:?}", chain.session_states()?);
    let route =
        bgp4mesh_lab::wait_until(Duration::from_secs(30), "BIRD's prefix at GoBGP", || {
            let routes = chain.gobgp.routes()?;
            best_route(&routes, Chain::PREFIX)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("not yet: {routes:?}"))
        })?;
    println!(
        "GoBGP has {} via {} with AS path {:?}",
        route.prefix,
        route.next_hop.map(|h| h.to_string()).unwrap_or_default(),
        route.as_path
    );
    println!("\n{}", chain.gobgp.gobgp(&["global", "rib"])?);
    println!("tearing the lab down");
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The option number is the one mimalloc documents as the purge delay:
    /// untouched (tests do not run `main`), it reads the default of the
    /// bundled mimalloc 3 (options.c: 1000 ms), and what `tune_allocator`
    /// sets reads back.
    #[test]
    fn the_purge_delay_option_is_the_one_we_set() {
        // SAFETY: mi_option_get reads an integer from mimalloc's option table.
        let default = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(default, 1000, "not mimalloc's purge delay");
        super::tune_allocator();
        // SAFETY: as above.
        let set = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(set, 0);
        // `.cargo/config.toml`'s CFLAGS reached mimalloc's build (a CFLAGS
        // of the environment would replace it): arenas committed lazily.
        // SAFETY: as above; 4 is `mi_option_arena_eager_commit`.
        let eager = unsafe { libmimalloc_sys::mi_option_get(4) };
        assert_eq!(
            eager, 0,
            "mimalloc was built without -DMI_DEFAULT_ARENA_EAGER_COMMIT=0"
        );
    }
}
