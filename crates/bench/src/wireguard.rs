//! `bgp4mesh bench wireguard`: iperf3 through a WireGuard tunnel between
//! two namespaces (MTU 1420), for bgp4mesh's device, wireguard-go and
//! boringtun-cli in one run: single stream and 4 streams, both directions;
//! throughput, and CPU seconds per GB of both devices together.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bgp4mesh_lab::peers::{WgDevice, WgImpl};
use bgp4mesh_lab::{Lab, find_binary, wait_until};

struct Row {
    implementation: String,
    case: &'static str,
    gbits: f64,
    cpu_per_gb: f64,
    retransmits: u64,
}

const CASES: [(&str, &[&str]); 4] = [
    ("1 stream, A→B", &[]),
    ("1 stream, B→A", &["-R"]),
    ("4 streams, A→B", &["-P", "4"]),
    ("4 streams, B→A", &["-P", "4", "-R"]),
];

pub fn wireguard(seconds: u32) -> Result<()> {
    let ours = std::env::current_exe().context("finding our own executable")?;
    let mut implementations = vec![WgImpl::bgp4mesh(ours)];
    match find_binary("wireguard-go") {
        Some(_) => implementations.push(WgImpl::WireguardGo),
        None => println!("wireguard-go not found: skipped (apt install wireguard-go)"),
    }
    let boringtun = find_binary("boringtun-cli").or_else(|| {
        let home = std::env::var_os("HOME")?;
        let p = PathBuf::from(home).join(".cargo/bin/boringtun-cli");
        p.exists().then_some(p)
    });
    match boringtun {
        Some(path) => implementations.push(WgImpl::Command {
            label: "boringtun-cli".into(),
            argv: vec![
                path.to_string_lossy().into_owned(),
                "--foreground".into(),
                "--disable-drop-privileges".into(),
            ],
        }),
        None => println!("boringtun-cli not found: skipped (cargo install boringtun-cli)"),
    }
    if find_binary("iperf3").is_none() {
        bail!("iperf3 is needed (apt install iperf3)");
    }
    println!(
        "iperf3 -t {seconds} through WireGuard between two namespaces over veth, MTU 1420, \
         {} CPUs shared by both ends",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mut rows = Vec::new();
    for implementation in &implementations {
        rows.extend(
            measure(implementation, seconds)
                .with_context(|| format!("measuring {}", implementation.label()))?,
        );
    }
    println!();
    println!(
        "| device | case | Gbit/s | × wireguard-go | CPU s per GB (both ends) | retransmits |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    for row in &rows {
        let reference = rows
            .iter()
            .find(|r| r.implementation == "wireguard-go" && r.case == row.case)
            .map(|r| r.gbits);
        let ratio = reference.map_or("–".to_string(), |r| format!("{:.2}", row.gbits / r));
        println!(
            "| {} | {} | {:.2} | {ratio} | {:.2} | {} |",
            row.implementation, row.case, row.gbits, row.cpu_per_gb, row.retransmits
        );
    }
    Ok(())
}

fn measure(implementation: &WgImpl, seconds: u32) -> Result<Vec<Row>> {
    let label = implementation.label().to_string();
    let lab = Lab::new(&format!("bench-wg-{label}"))?;
    let (a, b) = (lab.add_node("a")?, lab.add_node("b")?);
    let (link_a, link_b) = lab.link(&a, &b)?;
    let dev_a = WgDevice::start_with(&lab, &a, implementation, "100.64.0.1/24", 51820)?;
    let dev_b = WgDevice::start_with(&lab, &b, implementation, "100.64.0.2/24", 51821)?;
    for (node, dev) in [(&a, &dev_a), (&b, &dev_b)] {
        lab.exec(node, &["ip", "link", "set", dev.ifname(), "mtu", "1420"])?;
    }
    dev_a.set_peer(
        dev_b.public_key(),
        Some(&format!("{}:51821", link_b.ipv4)),
        &["100.64.0.2/32"],
        None,
    )?;
    dev_b.set_peer(
        dev_a.public_key(),
        Some(&format!("{}:51820", link_a.ipv4)),
        &["100.64.0.1/32"],
        None,
    )?;
    wait_until(Duration::from_secs(15), "a ping through the tunnel", || {
        let out = lab.try_exec(&a, &["ping", "-c", "1", "-W", "1", "100.64.0.2"])?;
        ensure!(out.success(), "{}", out.stdout);
        Ok(())
    })?;
    let server = lab.spawn(&b, "iperf3-server", &["iperf3", "-s"])?;
    std::thread::sleep(Duration::from_millis(300));
    let pids = [dev_a.proc().pid, dev_b.proc().pid];
    let mut rows = Vec::new();
    for (case, extra) in CASES {
        let before = cpu_seconds(&pids)?;
        let secs = seconds.to_string();
        let mut cmd = vec!["iperf3", "-c", "100.64.0.2", "-t", &secs, "-J"];
        cmd.extend_from_slice(extra);
        let out = lab.exec_full(&a, &cmd, None, Duration::from_secs(u64::from(seconds) + 30))?;
        let after = cpu_seconds(&pids)?;
        let json: serde_json::Value = serde_json::from_str(&out.stdout)
            .with_context(|| format!("iperf3 output: {}", out.stdout))?;
        let end = &json["end"];
        let bits = end["sum_received"]["bits_per_second"]
            .as_f64()
            .with_context(|| format!("no throughput in {}", out.stdout))?;
        let bytes = end["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
        let retransmits = end["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
        let gb = bytes / 1e9;
        let row = Row {
            implementation: label.clone(),
            case,
            gbits: bits / 1e9,
            cpu_per_gb: if gb > 0.0 { (after - before) / gb } else { 0.0 },
            retransmits,
        };
        println!(
            "{:<14} {:<16} {:>6.2} Gbit/s  {:>5.2} CPU s/GB  {} retransmits",
            row.implementation, row.case, row.gbits, row.cpu_per_gb, row.retransmits
        );
        rows.push(row);
    }
    lab.stop(&server);
    Ok(rows)
}

/// User + system CPU seconds of these processes (all their threads).
fn cpu_seconds(pids: &[u32]) -> Result<f64> {
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut total = 0.0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces): state is
        // field 3, utime 14, stime 15.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .context("malformed /proc/PID/stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| -> Result<f64> {
            fields
                .get(i - 3)
                .context("short /proc/PID/stat")?
                .parse::<f64>()
                .context("bad /proc/PID/stat number")
        };
        total += (field(14)? + field(15)?) / ticks;
    }
    Ok(total)
}
