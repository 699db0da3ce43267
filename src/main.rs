//! `bgp4mesh`: one binary for the daemon, the controller, the CLI and the lab.
//! This file only parses the command line and calls into the crates.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Network-namespace labs on this machine (needs root)
    #[command(subcommand)]
    Lab(LabCommand),
}

#[derive(Subcommand)]
enum LabCommand {
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
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Lab(LabCommand::Demo) => lab_demo(),
        Command::Lab(LabCommand::Sweep { all }) => lab_sweep(all),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bgp4mesh: {e:#}");
            ExitCode::FAILURE
        }
    }
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
