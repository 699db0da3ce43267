//! `bgp4mesh lab up` is the README's first command: it must build the AS,
//! leave it running for `lab exec` and `lab status`, and `lab down` must
//! remove every namespace.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use bgp4mesh_lab::{can_run, find_persistent};

const BIN: &str = env!("CARGO_BIN_EXE_bgp4mesh");

fn bgp4mesh(args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new(BIN).args(args).output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// `bgp4mesh lab exec NODE ping -c 2 -W 2 TO` succeeds.
fn lab_ping(node: &str, to: &str) -> Result<()> {
    let (ok, out) = bgp4mesh(&["lab", "exec", node, "ping", "-c", "2", "-W", "2", to])?;
    ensure!(ok, "{node} pinging {to}: {out}");
    Ok(())
}

/// Takes the lab down however the test ends.
struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        let _ = bgp4mesh(&["lab", "down"]);
    }
}

#[test]
fn lab_up_exec_status_down() -> Result<()> {
    if !can_run!(&["wg", "ping", "ip"]) {
        return Ok(());
    }
    // One persistent lab at a time; this test owns the name while it runs.
    ensure!(
        find_persistent("as").is_none(),
        "a lab is up already; `bgp4mesh lab down` first"
    );
    let _down = Down;
    let (ok, out) = bgp4mesh(&["lab", "up", "--nodes", "2"])?;
    ensure!(ok, "lab up: {out}");
    let id = find_persistent("as").context("the lab that is up")?;
    for needle in [
        "44.30.127.0/24",
        "2001:db8:44::/48",
        "one BGP session per family",
        "border",
        "n1",
        "n2",
        "bgp4mesh lab exec isp ping -c 3 44.30.127.2 ",
        "bgp4mesh lab exec isp ping -c 3 2001:db8:44::2 ",
        "bgp4mesh lab exec n1 ping -c 3 2001:db8:100::10",
        "BFD with the borders, 100 ms x 3",
    ] {
        ensure!(out.contains(needle), "{needle:?} not in:\n{out}");
    }
    let (ok, ping) = bgp4mesh(&[
        "lab",
        "exec",
        "isp",
        "ping",
        "-c",
        "2",
        "-W",
        "2",
        "44.30.127.2",
    ])?;
    ensure!(ok, "the ISP pinging n1: {ping}");
    let (ok, ping) = bgp4mesh(&[
        "lab",
        "exec",
        "n2",
        "ping",
        "-c",
        "2",
        "-W",
        "2",
        "198.51.100.10",
    ])?;
    ensure!(ok, "n2 pinging the Internet host: {ping}");
    // Dual-stack by default: the same over IPv6, both ways, and between
    // the nodes.
    lab_ping("isp", "2001:db8:44::2")?;
    lab_ping("internet", "2001:db8:44::3")?;
    lab_ping("n1", "2001:db8:100::10")?;
    lab_ping("n2", "2001:db8:44::2")?;
    // ...and the tunnels themselves run over IPv6 (the machines publish
    // their IPv6 wan address next to the IPv4 one).
    let (ok, mesh) = bgp4mesh(&["lab", "exec", "n1", "bgp4mesh", "show", "mesh"])?;
    ensure!(
        ok && mesh
            .lines()
            .filter(|l| l.starts_with("n2 ") || l.starts_with("border "))
            .all(|l| l.contains("[fd01:"))
            && mesh.lines().any(|l| l.starts_with("n2 ")),
        "n1's tunnels are not over IPv6:\n{mesh}"
    );
    let (ok, protocols) = bgp4mesh(&["lab", "exec", "border", "bgp4mesh", "show", "protocols"])?;
    ensure!(
        ok && protocols
            .lines()
            .filter(|l| l.starts_with("isp ") || l.starts_with("isp6 "))
            .filter(|l| l.contains("Established"))
            .count()
            == 2,
        "{protocols}"
    );
    // BFD with the ISP, by default: its session comes up (at 1 s pace
    // until then, RFC 5880).
    let started = std::time::Instant::now();
    loop {
        let (ok, bfd) = bgp4mesh(&[
            "lab", "exec", "border", "bgp4mesh", "show", "bfd", "sessions",
        ])?;
        let up = |peer: &str| {
            bfd.lines()
                .any(|l| l.starts_with(&format!("{peer} ")) && l.contains(" Up "))
        };
        let up = up("172.30.0.1") && up("2001:db8:ff00::1");
        if ok && up {
            break;
        }
        ensure!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "no BFD sessions with the ISP up on both families: {bfd}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (ok, status) = bgp4mesh(&["lab", "status"])?;
    ensure!(
        ok && status.contains("44.30.127.0/24 via 172.30.0.100")
            && status.contains("2001:db8:44::/48 via 2001:db8:ff00::100"),
        "{status}"
    );
    let (ok, again) = bgp4mesh(&["lab", "up"])?;
    ensure!(
        !ok && again.contains("up already"),
        "a second lab up: {again}"
    );
    let (ok, down) = bgp4mesh(&["lab", "down"])?;
    ensure!(ok && down.contains("removed lab"), "{down}");
    ensure!(find_persistent("as").is_none(), "the lab is still there");
    // Every namespace of this lab is gone (other tests' labs may run).
    let prefix = format!("b4m-{id}-");
    let left: Vec<String> = std::fs::read_dir("/run/netns")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    ensure!(left.is_empty(), "left behind: {left:?}");
    let (ok, none) = bgp4mesh(&["lab", "exec", "isp", "true"])?;
    ensure!(!ok && none.contains("no lab is up"), "{none}");

    // Two borders that offer the mesh what they learn from the ISP.
    for (args, needle) in [
        (&["lab", "up", "--borders", "3"][..], "1 or 2"),
        (&["lab", "up", "--egress", "ospf"][..], "static or bgp"),
        (&["lab", "up", "--isp-bfd", "maybe"][..], "on or off"),
        (
            &["lab", "up", "--ipv4-only", "--ipv6-only"][..],
            "cannot be used with",
        ),
    ] {
        let (ok, out) = bgp4mesh(args)?;
        ensure!(!ok && out.contains(needle), "{args:?}: {out}");
    }
    let (ok, out) = bgp4mesh(&[
        "lab",
        "up",
        "--nodes",
        "1",
        "--borders",
        "2",
        "--egress",
        "bgp",
        "--isp-bfd",
        "off",
    ])?;
    ensure!(ok, "lab up --borders 2 --egress bgp --isp-bfd off: {out}");
    for needle in ["border2", "[mesh] export", "no BFD", "kill -STOP"] {
        ensure!(out.contains(needle), "{needle:?} not in:\n{out}");
    }
    let (ok, ping) = bgp4mesh(&[
        "lab",
        "exec",
        "n1",
        "ping",
        "-c",
        "2",
        "-W",
        "2",
        "198.51.100.10",
    ])?;
    ensure!(ok, "n1 pinging the Internet host: {ping}");
    let (ok, protocols) = bgp4mesh(&["lab", "exec", "border2", "bgp4mesh", "show", "protocols"])?;
    ensure!(ok && protocols.contains("Established"), "{protocols}");
    let (ok, bfd) = bgp4mesh(&[
        "lab", "exec", "border2", "bgp4mesh", "show", "bfd", "sessions",
    ])?;
    ensure!(
        ok && !bfd.contains("172.31.0.1 "),
        "--isp-bfd off, yet: {bfd}"
    );
    let (ok, down) = bgp4mesh(&["lab", "down"])?;
    ensure!(ok && down.contains("removed lab"), "{down}");

    // An IPv6-only AS.
    let (ok, out) = bgp4mesh(&["lab", "up", "--nodes", "1", "--ipv6-only"])?;
    ensure!(ok, "lab up --ipv6-only: {out}");
    for needle in ["2001:db8:44::/48", "--ipv6-only", "egress ::/0"] {
        ensure!(out.contains(needle), "{needle:?} not in:\n{out}");
    }
    ensure!(
        !out.contains("44.30.127."),
        "IPv4 in an IPv6-only AS:\n{out}"
    );
    lab_ping("isp", "2001:db8:44::2")?;
    lab_ping("n1", "2001:db8:100::10")?;
    let (ok, down) = bgp4mesh(&["lab", "down"])?;
    ensure!(ok && down.contains("removed lab"), "{down}");
    Ok(())
}
