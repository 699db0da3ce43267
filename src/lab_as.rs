//! `bgp4mesh lab up | status | down | exec`: seed 004's "Testing with Mock
//! ISP" as network namespaces on this machine (root), left running until
//! `lab down`.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bgp4mesh_lab::own_as::{
    BORDER_PEERING, BORDER_PEERING6, BORDER2_PEERING, BORDER2_PEERING6, Families, INTERNET_HOST,
    INTERNET_HOST6, ISP_BFD_INTERVAL_MS, ISP_BFD_MULTIPLIER, ISP_PEERING, ISP_PEERING6, IspKind,
    MeshNode, OwnAs, OwnAsOptions,
};
use bgp4mesh_lab::{Lab, find_persistent, netns_of, state_dir, sweep_persistent};

const LAB_NAME: &str = "as";

/// `only`: `--ipv4-only`, `--ipv6-only` (dual-stack without either).
pub fn up(
    nodes: usize,
    isp: &str,
    borders: usize,
    egress: &str,
    isp_bfd: &str,
    only: (bool, bool),
) -> Result<()> {
    if !(1..=2).contains(&borders) {
        bail!("--borders {borders}: 1 or 2");
    }
    let bgp_egress = match egress {
        "static" => false,
        "bgp" => true,
        other => bail!("--egress {other:?}: static or bgp"),
    };
    let isp = match isp {
        "bgp4mesh" => IspKind::Bgp4mesh,
        "bird" => IspKind::Bird,
        other => bail!("--isp {other:?}: bgp4mesh or bird"),
    };
    let isp_bfd = match isp_bfd {
        "on" => true,
        "off" => false,
        other => bail!("--isp-bfd {other:?}: on or off"),
    };
    let families = match only {
        (false, false) => Families::DualStack,
        (true, false) => Families::Ipv4Only,
        (false, true) => Families::Ipv6Only,
        (true, true) => bail!("--ipv4-only or --ipv6-only, not both"),
    };
    if let Some(id) = find_persistent(LAB_NAME) {
        bail!("a lab is up already ({id}); `bgp4mesh lab down` first");
    }
    let lab = Lab::new_persistent(LAB_NAME)?;
    let binary = std::env::current_exe().context("finding our own executable")?;
    println!(
        "building your AS in lab {} (network namespaces b4m-{}-*)…",
        lab.id(),
        lab.id()
    );
    let world = OwnAs::start(
        &lab,
        &OwnAsOptions {
            bgp_egress,
            isp_bfd,
            families,
            ..OwnAsOptions::new(binary, nodes, isp, borders)
        },
    )?;
    world.wait_bgp(Duration::from_secs(60))?;
    let isp_name = match isp {
        IspKind::Bgp4mesh => "bgp4mesh",
        IspKind::Bird => "BIRD",
    };
    let egress_text = if bgp_egress {
        "what it learns from the ISP ([mesh] export)"
    } else {
        match families {
            Families::DualStack => "0.0.0.0/0 and ::/0",
            Families::Ipv4Only => "0.0.0.0/0",
            Families::Ipv6Only => "::/0",
        }
    };
    let blocks = world.blocks().join(" and ");
    let sessions = match families {
        Families::DualStack => "one BGP session per family (isp over IPv4, isp6 over IPv6)",
        Families::Ipv4Only => "an IPv4 BGP session (isp; --ipv4-only)",
        Families::Ipv6Only => "an IPv6 BGP session (isp6; --ipv6-only: no IPv4 in the mesh)",
    };
    // A machine's addresses of the AS's families, and towards the ISP.
    let mesh = |m: &MeshNode<'_>| {
        let mut a = Vec::new();
        if families.ipv4() {
            a.push(m.address.to_string());
        }
        a.extend(m.address6.map(|x| x.to_string()));
        a.join(", ")
    };
    let towards_isp = |v4: &str, v6: &str| match families {
        Families::DualStack => format!("{v4} and {v6}"),
        Families::Ipv4Only => v4.to_string(),
        Families::Ipv6Only => v6.to_string(),
    };
    let mut summary = String::new();
    summary.push_str(&format!(
        "your AS 65000 announces {blocks} to a mock ISP over {sessions}; mesh nodes own addresses of it\n\n"
    ));
    summary.push_str(&format!(
        "  isp         AS 65001 ({isp_name}), {} towards the border, 198.51.100.1 and 2001:db8:100::1 towards the Internet host\n",
        towards_isp(ISP_PEERING, ISP_PEERING6)
    ));
    if isp_bfd {
        summary.push_str(&format!(
            "              BFD with the borders, {ISP_BFD_INTERVAL_MS} ms x {ISP_BFD_MULTIPLIER}: a border that stops answering is left within a second\n"
        ));
    } else {
        summary.push_str(
            "              no BFD with the borders (--isp-bfd off): a hung border keeps the ISP's traffic until its 90 s hold timer expires\n",
        );
    }
    summary.push_str(&format!(
        "  internet    the Internet host, {INTERNET_HOST} and {INTERNET_HOST6}\n"
    ));
    summary.push_str(&format!(
        "  controller  {} (fingerprint {}…)\n",
        world.controller_url,
        &world.fingerprint[..16.min(world.fingerprint.len())]
    ));
    summary.push_str(&format!(
        "  border      AS 65000, {} towards the ISP, mesh {} on {}, egress {egress_text}\n",
        towards_isp(BORDER_PEERING, BORDER_PEERING6),
        mesh(&world.border),
        world.border.interface
    ));
    if let Some(b) = &world.border2 {
        summary.push_str(&format!(
            "  border2     AS 65000, {} towards the ISP, mesh {} on {}, egress {egress_text} (backup, metric 200)\n",
            towards_isp(BORDER2_PEERING, BORDER2_PEERING6),
            mesh(b),
            b.interface
        ));
    }
    for n in &world.nodes {
        summary.push_str(&format!(
            "  {:<11} mesh {} on {}\n",
            n.name,
            mesh(n),
            n.interface
        ));
    }
    let first = world.nodes.first();
    summary.push_str("\ntry:\n");
    if let Some(n) = first {
        if families.ipv4() {
            summary.push_str(&format!(
                "  bgp4mesh lab exec isp ping -c 3 {}          # the Internet reaches a mesh node\n",
                n.address
            ));
            summary.push_str(&format!(
                "  bgp4mesh lab exec {} ping -c 3 {INTERNET_HOST}   # a mesh node reaches the Internet\n",
                n.name
            ));
        }
        if let Some(a6) = n.address6 {
            let (isp, host) = if families.ipv4() {
                ("the same over IPv6", "")
            } else {
                (
                    "the Internet reaches a mesh node",
                    "   # a mesh node reaches the Internet",
                )
            };
            summary.push_str(&format!(
                "  bgp4mesh lab exec isp ping -c 3 {a6}       # {isp}\n"
            ));
            summary.push_str(&format!(
                "  bgp4mesh lab exec {} ping -c 3 {INTERNET_HOST6}{host}\n",
                n.name
            ));
        }
        summary.push_str(&format!(
            "  bgp4mesh lab exec {} wg show {}\n",
            n.name, n.interface
        ));
    }
    summary.push_str("  bgp4mesh lab exec border bgp4mesh show protocols\n");
    summary.push_str("  bgp4mesh lab exec border bgp4mesh show route\n");
    if isp_bfd {
        summary.push_str("  bgp4mesh lab exec border bgp4mesh show bfd sessions\n");
    }
    if let (Some(_), Some(n)) = (&world.border2, first) {
        // SIGSTOP: the daemon hangs, nothing is closed; the ISP notices by
        // BFD (or by its hold timer without it), the controller by the
        // missing pulses.
        let pid = world.border.daemon.proc().pid;
        let target = if families.ipv4() {
            n.address.to_string()
        } else {
            n.address6.map(|a| a.to_string()).unwrap_or_default()
        };
        let (hang, what) = if isp_bfd {
            (5, "the replies pause about 0.5 s (BFD)")
        } else {
            (100, "the replies stop until the ISP's hold timer expires")
        };
        summary.push_str(&format!(
            "  bgp4mesh lab exec internet ping -D -i 0.2 {target}   # leave it running; in another terminal:\n"
        ));
        summary.push_str(&format!(
            "  kill -STOP {pid}; sleep {hang}; kill -CONT {pid}   # the first border's daemon hangs: {what}\n"
        ));
    }
    summary.push_str("  bgp4mesh lab status\n  bgp4mesh lab down\n");
    std::fs::write(state_dir(lab.id()).join("summary.txt"), &summary)?;
    println!("{summary}");
    Ok(())
}

fn current() -> Result<String> {
    find_persistent(LAB_NAME).context("no lab is up (`bgp4mesh lab up`)")
}

/// Runs `command` in a node of the lab that is up, with this terminal.
pub fn exec(node: &str, command: &[String]) -> Result<()> {
    let id = current()?;
    if command.is_empty() {
        bail!("give a command: bgp4mesh lab exec {node} ping -c 3 {INTERNET_HOST}");
    }
    let netns = netns_of(&id, node);
    if !std::path::Path::new("/run/netns").join(&netns).exists() {
        bail!("no node {node:?} in lab {id} (see `bgp4mesh lab status`)");
    }
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &netns]).args(command);
    // `bgp4mesh show …` in a node talks to that node's daemon.
    if command
        .first()
        .is_some_and(|c| c == "bgp4mesh" || c.ends_with("/bgp4mesh"))
    {
        let socket = state_dir(&id).join(node).join("bgp4mesh.sock");
        let exe = std::env::current_exe()?;
        cmd = Command::new("ip");
        cmd.args(["netns", "exec", &netns])
            .arg(exe)
            .arg("-s")
            .arg(socket)
            .args(&command[1..]);
    }
    Err(cmd.exec()).context("running ip netns exec")
}

pub fn status() -> Result<()> {
    let id = current()?;
    let summary = std::fs::read_to_string(state_dir(&id).join("summary.txt")).unwrap_or_default();
    println!("lab {id}\n{summary}");
    let exe = std::env::current_exe()?;
    let socket = state_dir(&id).join("border").join("bgp4mesh.sock");
    let out = Command::new("ip")
        .args(["netns", "exec", &netns_of(&id, "border")])
        .arg(&exe)
        .arg("-s")
        .arg(&socket)
        .args(["show", "protocols"])
        .output()?;
    println!(
        "border's BGP sessions:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &netns_of(&id, "isp"), "ip", "route"])
        .output()?;
    let out6 = Command::new("ip")
        .args(["netns", "exec", &netns_of(&id, "isp"), "ip", "-6", "route"])
        .output()?;
    println!(
        "the ISP's routes:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out6.stdout)
    );
    Ok(())
}

pub fn down() -> Result<()> {
    let report = sweep_persistent()?;
    if report.is_empty() {
        println!("no lab was up");
    } else {
        println!(
            "removed lab {}: {} namespaces, {} processes",
            report.labs.join(", "),
            report.namespaces.len(),
            report.processes_killed
        );
    }
    Ok(())
}
