//! `bgp4mesh bench …`: measurements against the competitors, in the same
//! run, on the same input, in network namespaces of their own
//! (BENCHMARKS.md). The root binary parses [`BenchCommand`] and calls
//! [`run`]; the harnesses start that binary again for their helpers (the
//! hidden `bench bgp-inject`, `bgp-monitor`, `bgp-relay` and `fib-worker`,
//! and `run`, `server` and `wireguard` for bgp4mesh itself).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;

pub mod bgp;
pub mod controller;
pub mod fib;
pub mod wireguard;

/// `bgp4mesh bench …`.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Install N routes in the kernel: ip -batch against bgp4mesh's FIB sync
    Fib {
        #[arg(long, default_value_t = 1_000_000)]
        routes: u32,
    },
    /// Full-table scenarios through BIRD, FRR, GoBGP and bgp4mesh (and a null relay): time and peak RSS
    Bgp {
        /// IPv4 prefixes of the single-injector case
        #[arg(long, default_value_t = 1_000_000)]
        prefixes: u32,
        /// Distinct attribute sets among them
        #[arg(long, default_value_t = 100_000)]
        paths: u32,
        /// IPv6 prefixes of the IPv6 case
        #[arg(long, default_value_t = 200_000)]
        v6_prefixes: u32,
        /// Injectors of the many-injector case
        #[arg(long, default_value_t = 10)]
        injectors: u32,
        /// Distinct IPv4 prefixes each of them sends
        #[arg(long, default_value_t = 100_000)]
        per_injector: u32,
        /// Comma-separated: null, bird, frr, gobgp, bgp4mesh
        #[arg(long, default_value = "null,bird,frr,gobgp,bgp4mesh")]
        targets: String,
        /// Comma-separated: ipv4 (load, flap, full withdrawal), ipv6, many
        #[arg(long, default_value = "ipv4,ipv6,many")]
        scenarios: String,
        /// Seconds before one measurement is given up
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Runs of everything (the table shows medians, peak RSS the highest)
        #[arg(long, default_value_t = 1)]
        runs: u32,
    },
    /// N simulated agents against one controller: join rate, change fan-out p50/p99, RSS
    Controller {
        #[arg(long, default_value_t = 10_000)]
        nodes: u32,
        /// How many changes to time
        #[arg(long, default_value_t = 5)]
        changes: u32,
    },
    /// iperf3 through WireGuard: bgp4mesh, wireguard-go and boringtun-cli, 1 and 4 streams
    Wireguard {
        /// Seconds per iperf3 run
        #[arg(long, default_value_t = 10)]
        seconds: u32,
    },
    /// (internal) an injector of `bench bgp`
    #[command(hide = true)]
    BgpInject {
        #[arg(long)]
        peer: IpAddr,
        #[arg(long)]
        local: IpAddr,
        #[arg(long)]
        asn: u32,
        #[arg(long)]
        router_id: Ipv4Addr,
        #[arg(long, default_value_t = 0)]
        first: u32,
        #[arg(long)]
        prefixes: u32,
        #[arg(long)]
        paths: u32,
        #[arg(long)]
        control: PathBuf,
    },
    /// (internal) the monitor of `bench bgp`
    #[command(hide = true)]
    BgpMonitor {
        #[arg(long)]
        listen: IpAddr,
        #[arg(long)]
        expect: u32,
        #[arg(long)]
        control: PathBuf,
    },
    /// (internal) the null target of `bench bgp`: copies UPDATEs to the monitor
    #[command(hide = true)]
    BgpRelay {
        #[arg(long)]
        monitor: IpAddr,
        #[arg(long)]
        injectors: u32,
    },
    /// (internal) the bgp4mesh side of `bench fib`, run inside the namespace
    #[command(hide = true)]
    FibWorker {
        #[arg(long)]
        routes: u32,
        #[arg(long)]
        table: u32,
        #[arg(long)]
        gateway: IpAddr,
    },
}

/// Runs one `bgp4mesh bench …` command.
pub fn run(command: &BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Fib { routes } => fib::fib(*routes),
        BenchCommand::Bgp {
            prefixes,
            paths,
            v6_prefixes,
            injectors,
            per_injector,
            targets,
            scenarios,
            timeout,
            runs,
        } => {
            let opts = bgp::BenchOptions {
                prefixes: *prefixes,
                paths: *paths,
                v6_prefixes: *v6_prefixes,
                injectors: *injectors,
                per_injector: *per_injector,
                targets: split_list(targets, bgp::Target::parse)?,
                scenarios: split_list(scenarios, bgp::Scenario::parse)?,
                timeout: Duration::from_secs(*timeout),
                runs: *runs,
            };
            bgp::bgp(&opts)
        }
        BenchCommand::Wireguard { seconds } => wireguard::wireguard(*seconds),
        BenchCommand::Controller { nodes, changes } => controller::controller(*nodes, *changes),
        BenchCommand::BgpInject {
            peer,
            local,
            asn,
            router_id,
            first,
            prefixes,
            paths,
            control,
        } => bgp::inject(&bgp::InjectArgs {
            peer: *peer,
            local: *local,
            asn: *asn,
            router_id: *router_id,
            first: *first,
            prefixes: *prefixes,
            paths: *paths,
            control: control.clone(),
        }),
        BenchCommand::BgpMonitor {
            listen,
            expect,
            control,
        } => bgp::monitor(*listen, *expect, control),
        BenchCommand::BgpRelay { monitor, injectors } => bgp::relay(*monitor, *injectors),
        BenchCommand::FibWorker {
            routes,
            table,
            gateway,
        } => fib::fib_worker(*routes, *table, *gateway),
    }
}

/// A comma-separated list of names, each parsed by `parse`.
fn split_list<T>(list: &str, parse: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(parse)
        .collect()
}
