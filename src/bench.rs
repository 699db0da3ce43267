//! `bgp4mesh bench …`: measurements against the competitors, in the same
//! run, on the same input, in a network namespace of their own.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bgp4mesh_kernel::{Fib, FibConfig, Target};
use bgp4mesh_lab::Lab;
use ipnet::{IpNet, Ipv4Net};

/// The N-th /24 of the benchmark: 1.0.0.0/24, 1.0.1.0/24, … (past 10/8 and
/// 127/8 so they never collide with the lab's own addresses).
fn prefix(n: u32) -> Ipv4Net {
    let base = 0x0100_0000u32 + (n << 8);
    let base = if base >= 0x0a00_0000 {
        base + 0x0100_0000
    } else {
        base
    };
    let base = if base >= 0x7f00_0000 {
        base + 0x0100_0000
    } else {
        base
    };
    Ipv4Net::new(Ipv4Addr::from(base), 24).unwrap_or_default()
}

fn count_routes(lab: &Lab, node: &bgp4mesh_lab::Node, table: u32) -> Result<usize> {
    let out = lab.exec_full(
        node,
        &["ip", "-4", "route", "show", "table", &table.to_string()],
        None,
        Duration::from_secs(300),
    )?;
    Ok(out.stdout.lines().count())
}

/// `bench fib`: ip -batch and bgp4mesh each install `routes` /24s via one
/// gateway, in two tables of one namespace; prints seconds and the ratio.
pub fn fib(routes: u32) -> Result<()> {
    let lab = Lab::new("bench-fib")?;
    let node = lab.add_node("fib")?;
    let gateway = lab.add_node("gateway")?;
    let (_, far) = lab.link(&node, &gateway)?;
    let gateway_address = far.ipv4.to_string();

    let mut batch = String::with_capacity(routes as usize * 48);
    for n in 0..routes {
        batch.push_str(&format!(
            "route add {} via {gateway_address} proto bgp table 100\n",
            prefix(n)
        ));
    }
    let file = lab.write_config(&node, "routes.batch", &batch)?;
    println!("installing {routes} IPv4 routes via one gateway, each tool into its own table");

    let start = Instant::now();
    let out = lab.exec_full(
        &node,
        &["ip", "-batch", &file.to_string_lossy()],
        None,
        Duration::from_secs(1800),
    )?;
    let ip_time = start.elapsed();
    ensure!(out.success(), "ip -batch failed: {}", out.stderr);
    let ip_count = count_routes(&lab, &node, 100)?;

    let binary = std::env::current_exe()?;
    let out = lab.exec_full(
        &node,
        &[
            &binary.to_string_lossy(),
            "bench",
            "fib-worker",
            "--routes",
            &routes.to_string(),
            "--table",
            "101",
            "--gateway",
            &gateway_address,
        ],
        None,
        Duration::from_secs(1800),
    )?;
    ensure!(
        out.success(),
        "bgp4mesh worker failed: {}{}",
        out.stdout,
        out.stderr
    );
    let ours: f64 = out
        .stdout
        .trim()
        .parse()
        .with_context(|| format!("worker said {:?}", out.stdout))?;
    let our_count = count_routes(&lab, &node, 101)?;

    println!(
        "{:<28} {:>10} {:>10} {:>8}",
        "tool", "routes", "seconds", "ratio"
    );
    println!(
        "{:<28} {:>10} {:>10.2} {:>8.2}",
        "ip -batch (iproute2)",
        ip_count,
        ip_time.as_secs_f64(),
        1.0
    );
    println!(
        "{:<28} {:>10} {:>10.2} {:>8.2}",
        "bgp4mesh kernel::Fib",
        our_count,
        ours,
        ours / ip_time.as_secs_f64()
    );
    Ok(())
}

/// Runs inside the benchmark's namespace: installs the routes, prints the
/// seconds it took.
pub fn fib_worker(routes: u32, table: u32, gateway: std::net::IpAddr) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut fib = Fib::connect(FibConfig {
            table,
            ..FibConfig::default()
        })?;
        let changes: Vec<(IpNet, Option<Target>)> = (0..routes)
            .map(|n| (IpNet::V4(prefix(n)), Some(Target::Via(vec![gateway]))))
            .collect();
        let start = Instant::now();
        let report = fib.apply(changes).await;
        let took = start.elapsed();
        ensure!(report.failed == 0, "{} routes failed", report.failed);
        println!("{:.3}", took.as_secs_f64());
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::prefix;

    #[test]
    fn benchmark_prefixes_skip_the_lab_and_loopback_ranges() {
        assert_eq!(prefix(0).to_string(), "1.0.0.0/24");
        for n in [0, 1, 589_823, 999_999] {
            let first = prefix(n).network().octets()[0];
            assert!(first != 10 && first != 127 && first != 0, "{}", prefix(n));
        }
        assert_ne!(prefix(589_824 - 1), prefix(589_824));
    }
}
