//! The container files of deploy/ (seed 004's compose layout): each
//! compose file is accepted by Compose (`docker-compose config`, the
//! Debian-packaged Compose; the docker CLI here has no compose plugin), and
//! the entrypoint is valid shell; and the example node configs pass
//! `bgp4mesh check`.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, ensure};
use bgp4mesh_lab::can_run;

const ROLES: [&str; 3] = ["server", "border", "node"];

#[test]
fn compose_files_are_accepted_by_compose() -> Result<()> {
    if !can_run!(&["docker-compose", "sh"],) {
        return Ok(());
    }
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    for role in ROLES {
        let dir = deploy.join(role);
        let out = Command::new("docker-compose")
            .args(["-f", "compose.yaml", "config"])
            .current_dir(&dir)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "deploy/{role}/compose.yaml: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The image is built from the repository with our Dockerfile.
        ensure!(
            text.contains("deploy/container/Dockerfile"),
            "deploy/{role}: not built from deploy/container/Dockerfile:\n{text}"
        );
        if role != "server" {
            for needed in ["network_mode: host", "NET_ADMIN", "/dev/net/tun"] {
                ensure!(text.contains(needed), "deploy/{role}: no {needed}:\n{text}");
            }
        }
    }
    let entrypoint = deploy.join("container/entrypoint.sh");
    let out = Command::new("sh").arg("-n").arg(&entrypoint).output()?;
    ensure!(
        out.status.success(),
        "entrypoint.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Every node config in deploy/examples is accepted by `bgp4mesh check`,
/// as its comments tell the user to run it (server.toml is the
/// controller's, checked when `bgp4mesh server` starts).
#[test]
fn example_node_configs_pass_check() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "toml") || path.ends_with("server.toml") {
            continue;
        }
        let out = Command::new(env!("CARGO_BIN_EXE_bgp4mesh"))
            .arg("check")
            .arg("-c")
            .arg(&path)
            .output()?;
        assert!(
            out.status.success(),
            "{}: {}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(
        checked >= 3,
        "only {checked} examples found in {}",
        dir.display()
    );
    Ok(())
}

/// `bgp4mesh check` refuses IPv6 routes over an IPv4 session with no IPv6
/// next hop of ours (they could never be announced), naming the
/// neighbour and the key, and accepts the config once it is given.
#[test]
fn check_refuses_ipv6_over_ipv4_without_a_next_hop() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("bgp4mesh-check-nh6-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = |extra: &str| {
        format!(
            "[bgp]\nasn = 65000\nrouter_id = \"172.30.0.100\"\n\n[[bgp.neighbor]]\nname = \"isp\"\naddress = \"172.30.0.1\"\nremote_as = 65001\nimport = \"all\"\nexport = \"announce\"\n{extra}\n\n[[bgp.static]]\nprefix = \"2001:db8:44::/48\"\nblackhole = true\n\n[policy.announce]\nrules = [ {{ match = {{ prefix = [\"2001:db8:44::/48\"] }}, action = \"accept\" }} ]\n"
        )
    };
    let check = |text: String| -> Result<std::process::Output> {
        let path = dir.join("border.toml");
        std::fs::write(&path, text)?;
        Ok(Command::new(env!("CARGO_BIN_EXE_bgp4mesh"))
            .arg("check")
            .arg("-c")
            .arg(&path)
            .output()?)
    };
    let refused = check(config(""))?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(!refused.status.success(), "accepted: {stderr}");
    ensure!(
        stderr.contains("bgp.neighbor[0].next_hop_ipv6: neighbour \"isp\" has IPv6 unicast over an IPv4 session (172.30.0.1)")
            && stderr.contains("set next_hop_ipv6 to an IPv6 address of this router"),
        "{stderr}"
    );
    let accepted = check(config("next_hop_ipv6 = \"2001:db8:30::100\""))?;
    ensure!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
