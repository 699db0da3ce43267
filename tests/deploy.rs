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
