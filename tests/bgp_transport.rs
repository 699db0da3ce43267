//! The transport side of sessions against BIRD: TCP-MD5 (RFC 2385) and
//! GTSM (RFC 5082), and IPv4 routes with IPv6 next hops over an IPv6
//! session (RFC 8950).

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use bgp4mesh_lab::peers::{Bird, SessionState};
use bgp4mesh_lab::{Lab, can_run, wait_until};
use common::*;

fn bird_with(me: &str, ours: &str, options: &str) -> String {
    format!(
        r#"
router id 10.255.1.1;
protocol device {{}}
protocol static origin {{ ipv4; route 198.51.100.0/24 blackhole; }}
protocol bgp ours {{
  local {me} as 65001;
  neighbor {ours} as 65000;
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  {options}
  ipv4 {{ import all; export where source = RTS_STATIC; }};
}}
"#
    )
}

/// TCP-MD5 and GTSM on both sides: the session comes up and routes flow.
/// With a wrong key on our side it never does.
#[test]
fn tcp_md5_and_gtsm_with_bird() -> Result<()> {
    if !can_run!(&["bird", "birdc"]) {
        return Ok(());
    }
    for (key, should_connect) in [("s3cret-key", true), ("wrong-key", false)] {
        let lab = Lab::new("md5-gtsm")?;
        let (border, isp) = (lab.add_node("border")?, lab.add_node("isp")?);
        let (b, i) = lab.link(&border, &isp)?;
        let ours = start_ours(
            &lab,
            &border,
            65000,
            "10.255.0.1",
            &our_neighbor(
                "isp",
                i.ipv4.into(),
                65001,
                &format!(
                    "import = \"all\"\nexport = \"none\"\npassword = \"{key}\"\nttl_security = true"
                ),
            ),
        )?;
        let _bird = Bird::start(
            &lab,
            &isp,
            &bird_with(
                &i.ipv4.to_string(),
                &b.ipv4.to_string(),
                "password \"s3cret-key\"; ttl security on;",
            ),
        )?;
        if should_connect {
            wait_route("bgp4mesh", "198.51.100.0/24", || ours.routes())?;
            assert_eq!(ours.bgp_state("isp")?, SessionState::Established);
        } else {
            std::thread::sleep(Duration::from_secs(4));
            assert_ne!(
                ours.bgp_state("isp")?,
                SessionState::Established,
                "a wrong MD5 key must not connect"
            );
        }
    }
    Ok(())
}

/// RFC 8950: over an IPv6-only session, BIRD sends IPv4 routes with an
/// IPv6 next hop and takes ours the same way.
#[test]
fn ipv4_routes_over_an_ipv6_session_with_extended_next_hop() -> Result<()> {
    if !can_run!(&["bird", "birdc"],) {
        return Ok(());
    }
    let lab = Lab::new("extended-next-hop")?;
    let (border, isp) = (lab.add_node("border")?, lab.add_node("isp")?);
    let (b, i) = lab.link(&border, &isp)?;
    let ours = start_ours(
        &lab,
        &border,
        65000,
        "10.255.0.1",
        &format!(
            "[[bgp.neighbor]]\nname = \"isp\"\naddress = \"{}\"\nremote_as = 65001\nfamilies = [\"ipv4\", \"ipv6\"]\nextended_next_hop = true\nimport = \"all\"\nexport = \"all\"\nconnect_retry = 1\nerror_wait = [1, 4]\n\n[[bgp.static]]\nprefix = \"44.30.127.0/24\"\nblackhole = true\n",
            i.ipv6
        ),
    )?;
    let bird = Bird::start(
        &lab,
        &isp,
        &format!(
            r#"
router id 10.255.1.1;
protocol device {{}}
protocol static origin {{ ipv4; route 198.51.100.0/24 blackhole; }}
protocol bgp ours {{
  local {i6} as 65001;
  neighbor {b6} as 65000;
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  ipv4 {{ extended next hop on; import all; export where source = RTS_STATIC; }};
  ipv6 {{ import all; export none; }};
}}
"#,
            i6 = i.ipv6,
            b6 = b.ipv6
        ),
    )?;
    let at_ours = wait_route("bgp4mesh", "198.51.100.0/24", || ours.routes())?;
    assert_eq!(
        at_ours.next_hop,
        Some(i.ipv6.into()),
        "an IPv6 next hop for an IPv4 route"
    );
    let at_bird = wait_route("BIRD", "44.30.127.0/24", || bird.routes())?;
    assert_eq!(at_bird.next_hop, Some(b.ipv6.into()));
    wait_until(SETTLE, "BIRD to use the route", || {
        let out = bird.birdc("show route 44.30.127.0/24 all")?;
        ensure!(out.contains("BGP.next_hop"), "{out}");
        Ok(())
    })?;
    Ok(())
}

/// DN42's way: a session between IPv6 link-local addresses (each side
/// names the interface), IPv4 and IPv6 routes over it with link-local
/// next hops (RFC 8950 for IPv4). Both go into our kernel via the
/// link-local gateway on that interface, and traffic flows through them.
#[test]
fn link_local_session_with_bird() -> Result<()> {
    if !can_run!(&["bird", "birdc", "ping"]) {
        return Ok(());
    }
    let lab = Lab::new("link-local")?;
    let (border, isp) = (lab.add_node("border")?, lab.add_node("isp")?);
    let (b, i) = lab.link(&border, &isp)?;
    // Link-local addresses of our choosing, beside the kernel's own.
    lab.exec(
        &border,
        &["ip", "addr", "add", "fe80::a/64", "dev", &b.name],
    )?;
    lab.exec(&isp, &["ip", "addr", "add", "fe80::b/64", "dev", &i.name])?;
    // Something to ping behind BIRD, on both families.
    lab.add_address(&isp, "lo", "198.51.100.1/32")?;
    lab.add_address(&isp, "lo", "2001:db8:100::1/128")?;
    let _ours = start_ours(
        &lab,
        &border,
        65000,
        "10.255.0.1",
        &format!(
            "[[bgp.neighbor]]\nname = \"isp\"\naddress = \"fe80::b\"\nlocal_address = \"fe80::a\"\ninterface = \"{}\"\nremote_as = 65001\nfamilies = [\"ipv4\", \"ipv6\"]\nextended_next_hop = true\nnext_hop_ipv4 = \"{}\"\nimport = \"all\"\nexport = \"none\"\nconnect_retry = 1\nerror_wait = [1, 4]\n\n[kernel]\nprefsrc_ipv4 = \"{}\"\n",
            b.name, b.ipv4, b.ipv4
        ),
    )?;
    let bird = Bird::start(
        &lab,
        &isp,
        &format!(
            r#"
router id 10.255.1.1;
protocol device {{}}
protocol static origin4 {{ ipv4; route 198.51.100.0/24 blackhole; }}
protocol static origin6 {{ ipv6; route 2001:db8:100::/48 blackhole; }}
protocol bgp ours {{
  local fe80::b as 65001;
  neighbor fe80::a % '{iface}' as 65000;
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  ipv4 {{ extended next hop on; import none; export where source = RTS_STATIC; }};
  ipv6 {{ import none; export where source = RTS_STATIC; }};
}}
"#,
            iface = i.name
        ),
    )?;
    wait_until(SETTLE, "both prefixes in our kernel via fe80::b", || {
        let v4 = lab.exec(&border, &["ip", "-4", "route", "show", "proto", "bgp"])?;
        let v6 = lab.exec(&border, &["ip", "-6", "route", "show", "proto", "bgp"])?;
        ensure!(
            v4.contains("198.51.100.0/24 via inet6 fe80::b dev"),
            "IPv4: {v4:?}; BIRD: {:?}",
            bird.bgp_state("ours")
        );
        ensure!(
            v6.contains("2001:db8:100::/48 via fe80::b dev"),
            "IPv6: {v6:?}"
        );
        Ok(())
    })?;
    // The way back: BIRD's side reaches our link addresses directly.
    lab.add_route(&isp, &[&format!("{}/32", b.ipv4), "dev", &i.name])?;
    ping(&lab, &border, "198.51.100.1")?;
    ping(&lab, &border, "2001:db8:100::1")?;
    Ok(())
}
