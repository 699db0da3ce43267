//! Source NAT for egress gateways (`natEnabled: yes`): what leaves the
//! machine having come in through the mesh interface is masqueraded to the
//! address of the interface it leaves by.
//!
//! Each mesh interface owns one nftables table, `inet bgp4mesh_nat_<iface>`,
//! replaced in one `nft -f` transaction (create-if-missing, delete, create
//! again), so the rules are never half there and nothing else in the
//! ruleset is touched.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The table that holds `iface`'s NAT rule.
pub fn table_name(iface: &str) -> String {
    let safe: String = iface
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("bgp4mesh_nat_{safe}")
}

/// The `nft -f` script that leaves `iface`'s table with the masquerade
/// rule (`on`) or removes it.
pub fn script(iface: &str, on: bool) -> Result<String> {
    // Interface names are at most 15 bytes and never hold a quote; refuse
    // anything that could break out of the string.
    if iface.is_empty()
        || iface.len() > 15
        || !iface
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        bail!("{iface:?} is not an interface name");
    }
    let table = table_name(iface);
    let mut script = format!("table inet {table}\ndelete table inet {table}\n");
    if on {
        script.push_str(&format!(
            "table inet {table} {{\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tiifname \"{iface}\" oifname != \"{iface}\" masquerade\n\
             \t}}\n\
             }}\n"
        ));
    }
    Ok(script)
}

/// Masquerades traffic from the mesh on `iface` (`on`), or stops.
pub fn set_masquerade(iface: &str, on: bool) -> Result<()> {
    let script = script(iface, on)?;
    let spawned = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        // Without nftables there is no table of ours to remove.
        Err(e) if !on && e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        other => other.context("running nft (install nftables for NAT on egress)")?,
    };
    child
        .stdin
        .take()
        .context("nft's standard input")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft refused the NAT table for {iface}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_replaces_one_table_atomically() {
        let on = script("mesh0", true).expect("valid");
        assert!(
            on.starts_with("table inet bgp4mesh_nat_mesh0\ndelete table inet bgp4mesh_nat_mesh0\n")
        );
        assert!(on.contains("iifname \"mesh0\" oifname != \"mesh0\" masquerade"));
        let off = script("mesh0", false).expect("valid");
        assert!(!off.contains("masquerade"), "off only deletes: {off}");
        assert_eq!(table_name("wg.1-a"), "bgp4mesh_nat_wg_1_a");
    }

    #[test]
    fn names_that_could_break_the_script_are_refused() {
        for bad in ["", "a\"b", "x y", "sixteen-chars-xx", "a;b"] {
            assert!(script(bad, true).is_err(), "{bad:?}");
        }
    }
}
