//! `bgp4mesh bench fib`: installing a table in the kernel, against
//! `ip -batch` and BIRD's kernel protocol; and the prefixes and memory
//! figures the other benchmarks share.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bgp4mesh_kernel::{Fib, FibConfig, Target};
use bgp4mesh_lab::Lab;
use ipnet::{IpNet, Ipv4Net};

/// The N-th /24 of the benchmark: 1.0.0.0/24, 1.0.1.0/24, … (past 10/8 and
/// 127/8 so they never collide with the lab's own addresses).
pub fn prefix_v4(n: u32) -> IpNet {
    IpNet::V4(prefix(n))
}

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

/// A memory figure of process `pid` from /proc/PID/status (`VmHWM`,
/// `VmRSS`), in MB.
pub fn vm_mb(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} for {pid}"))?;
    Ok(kb / 1024.0)
}

/// A namespace of its own for one tool, linked to a gateway node; returns
/// it and the gateway's address.
fn fresh_node(lab: &Lab, name: &str) -> Result<(bgp4mesh_lab::Node, String)> {
    let node = lab.add_node(name)?;
    let gateway = lab.add_node(&format!("{name}-gw"))?;
    let (_, far) = lab.link(&node, &gateway)?;
    Ok((node, far.ipv4.to_string()))
}

/// `bench fib`: `ip -batch`, BIRD's kernel protocol and bgp4mesh's FIB
/// sync each install `routes` /24s via one gateway into the main table of
/// a namespace of their own; prints seconds and the ratio to `ip -batch`.
pub fn fib(routes: u32) -> Result<()> {
    let lab = Lab::new("bench-fib")?;
    println!(
        "installing {routes} IPv4 routes via one gateway, each tool in a namespace of its own"
    );

    let (node, gateway) = fresh_node(&lab, "iproute2")?;
    let before = main_table_prefixes(&lab, &node)?;
    let mut batch = String::with_capacity(routes as usize * 48);
    for n in 0..routes {
        batch.push_str(&format!(
            "route add {} via {gateway} proto bgp\n",
            prefix(n)
        ));
    }
    let file = lab.write_config(&node, "routes.batch", &batch)?;
    let start = Instant::now();
    let out = lab.exec_full(
        &node,
        &["ip", "-batch", &file.to_string_lossy()],
        None,
        Duration::from_secs(1800),
    )?;
    let ip_time = start.elapsed().as_secs_f64();
    ensure!(out.success(), "ip -batch failed: {}", out.stderr);
    let ip_count = main_table_prefixes(&lab, &node)? - before;

    let (node, gateway) = fresh_node(&lab, "bgp4mesh")?;
    let before = main_table_prefixes(&lab, &node)?;
    let binary = std::env::current_exe()?;
    let (routes_arg, binary) = (routes.to_string(), binary.to_string_lossy().into_owned());
    let worker = [
        binary.as_str(),
        "bench",
        "fib-worker",
        "--routes",
        &routes_arg,
        "--table",
        "254",
        "--gateway",
        &gateway,
    ];
    let out = lab.exec_full(&node, &worker, None, Duration::from_secs(1800))?;
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
    let our_count = main_table_prefixes(&lab, &node)? - before;

    let bird = match bgp4mesh_lab::find_binary("bird") {
        Some(_) => Some(bird_kernel(&lab, routes)?),
        None => {
            println!("(BIRD not installed: its kernel protocol is not measured)");
            None
        }
    };
    let row = |tool: &str, count: usize, secs: f64| {
        println!(
            "{tool:<28} {count:>10} {secs:>10.2} {:>8.2}",
            secs / ip_time
        );
    };
    println!(
        "{:<28} {:>10} {:>10} {:>8}",
        "tool", "routes", "seconds", "ratio"
    );
    row("ip -batch (iproute2)", ip_count, ip_time);
    if let Some((count, secs)) = bird {
        row("BIRD 2 kernel protocol", count, secs);
    }
    row("bgp4mesh kernel::Fib", our_count, ours);
    Ok(())
}

/// Prefixes in the main table of `node`'s namespace, from
/// /proc/net/fib_triestat (cheap to read at 1M routes).
fn main_table_prefixes(lab: &Lab, node: &bgp4mesh_lab::Node) -> Result<usize> {
    let stat = lab.exec(node, &["cat", "/proc/net/fib_triestat"])?;
    let main = stat.split("Main:").nth(1).unwrap_or_default();
    Ok(main
        .lines()
        .find_map(|l| l.trim().strip_prefix("Prefixes:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0))
}

/// BIRD's kernel protocol exporting a static protocol of `routes` routes
/// into the main table of a namespace of its own. The config is parsed with
/// the static protocol disabled; the clock runs from `enable` until the
/// kernel holds them all.
fn bird_kernel(lab: &Lab, routes: u32) -> Result<(usize, f64)> {
    let (node, gateway) = fresh_node(lab, "bird")?;
    let before = main_table_prefixes(lab, &node)?;
    let mut config = String::with_capacity(routes as usize * 48);
    config.push_str("router id 10.255.255.1;\nprotocol device {}\n");
    config.push_str("protocol kernel { ipv4 { export all; }; }\n");
    config.push_str("protocol static bench { disabled; ipv4;\n");
    for n in 0..routes {
        config.push_str(&format!("  route {} via {gateway};\n", prefix(n)));
    }
    config.push_str("}\n");
    let bird = bgp4mesh_lab::peers::Bird::start(lab, &node, &config)?;
    let start = Instant::now();
    bird.birdc("enable bench")?;
    let expected = before + routes as usize;
    let mut count = 0;
    while start.elapsed() < Duration::from_secs(600) {
        count = main_table_prefixes(lab, &node)?;
        if count >= expected {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((count.saturating_sub(before), start.elapsed().as_secs_f64()))
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
