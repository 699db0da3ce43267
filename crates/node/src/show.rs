//! What `bgp4mesh show` prints: JSON built by the daemon from the speaker,
//! and the birdc-like text the CLI renders from that JSON (so the two can
//! never disagree). docs/cli.md documents the JSON fields.

use std::fmt::Write;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bgp4mesh_bgp::rib::{NeighborId, Path, PathSource};
use bgp4mesh_bgp::session::State;
use bgp4mesh_bgp::speaker::Speaker;
use bgp4mesh_bgp::wire::{NextHop, PathAttributes};
use ipnet::IpNet;
use serde_json::{Value, json};

/// Wall-clock time of an `Instant` in the past, as UTC text and Unix time.
fn wall_clock(at: Instant, now: Instant) -> (String, u64) {
    let ago = now.saturating_duration_since(at);
    let t = SystemTime::now().checked_sub(ago).unwrap_or(UNIX_EPOCH);
    let secs = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    (utc_text(secs), secs)
}

/// `YYYY-MM-DD HH:MM:SS` in UTC (civil-from-days, proleptic Gregorian).
pub(crate) fn utc_text(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let rem = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn source_name(speaker: &Speaker, source: PathSource) -> String {
    match source {
        PathSource::Static(i) => format!("static{i}"),
        PathSource::Connected => "connected".into(),
        PathSource::Kernel => "kernel".into(),
        PathSource::Neighbor(n) => speaker.neighbor_name(n).to_string(),
    }
}

fn next_hop_text(hop: &Option<NextHop>) -> Value {
    match hop {
        None => Value::Null,
        Some(h) => Value::String(h.to_string()),
    }
}

/// The JSON of one path's attributes.
pub fn attributes_json(a: &PathAttributes) -> Value {
    json!({
        "origin": a.origin.to_string(),
        "as_path": a.as_path.asns().collect::<Vec<u32>>(),
        "as_path_text": a.as_path.to_string(),
        "next_hop": next_hop_text(&a.next_hop),
        "med": a.med,
        "local_pref": a.local_pref,
        "atomic_aggregate": a.atomic_aggregate,
        "aggregator": a.aggregator.map(|g| format!("{} {}", g.address, g.asn)),
        "communities": a.communities.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "large_communities": a.large_communities.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "extended_communities": a.extended_communities.iter().map(|c| format!("{c:016x}")).collect::<Vec<_>>(),
        "originator_id": a.originator_id.map(|i| i.to_string()),
        "cluster_list": a.cluster_list.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
    })
}

fn path_json(speaker: &Speaker, p: &Path, best: bool, multipath: bool) -> Value {
    let mut v = attributes_json(&p.attrs);
    if let Value::Object(map) = &mut v {
        map.insert("source".into(), json!(source_name(speaker, p.source)));
        map.insert("best".into(), json!(best));
        map.insert("multipath".into(), json!(multipath));
        let from = match p.source {
            PathSource::Neighbor(n) => speaker.neighbor(n).map(|s| s.config.address.to_string()),
            _ => None,
        };
        map.insert("from".into(), json!(from));
        // null: not resolved yet (taken as reachable) or not a BGP path.
        let reachable = p
            .attrs
            .next_hop
            .as_ref()
            .filter(|_| matches!(p.source, PathSource::Neighbor(_)))
            .and_then(|h| speaker.next_hop_state(bgp4mesh_bgp::rib::next_hop_address(h)))
            .map(|s| s.reachable);
        map.insert("next_hop_reachable".into(), json!(reachable));
    }
    v
}

/// `show route [PREFIX]`: every prefix of the Loc-RIB with all its paths.
pub fn routes(
    speaker: &Speaker,
    prefix: Option<IpNet>,
    _now: Instant,
    in_kernel: Option<&crate::kernel_sync::InKernel>,
) -> Value {
    let installed = in_kernel.and_then(|k| k.read().ok());
    let mut entries: Vec<(IpNet, &bgp4mesh_bgp::rib::Entry)> = match prefix {
        Some(p) => speaker.rib().get(&p).map(|e| (p, e)).into_iter().collect(),
        None => speaker.rib().iter().map(|(p, e)| (*p, e)).collect(),
    };
    entries.sort_by_key(|e| e.0);
    let list: Vec<Value> = entries
        .into_iter()
        .map(|(prefix, entry)| {
            let n = entry.multipath().len();
            let paths: Vec<Value> = entry
                .paths()
                .iter()
                .enumerate()
                .map(|(i, p)| path_json(speaker, p, i == 0 && n > 0, i < n))
                .collect();
            let kernel = installed.as_ref().map(|set| set.contains(&prefix));
            json!({ "prefix": prefix.to_string(), "in_kernel": kernel, "paths": paths })
        })
        .collect();
    Value::Array(list)
}

/// `show route export NEIGHBOR`: what we announced to it.
pub fn exported(speaker: &Speaker, id: NeighborId, prefix: Option<IpNet>, _now: Instant) -> Value {
    let Some(out) = speaker.adj_rib_out(id) else {
        return Value::Array(vec![]);
    };
    let mut list: Vec<(IpNet, _)> = out
        .into_iter()
        .filter(|(p, _)| prefix.is_none_or(|want| *p == want))
        .collect();
    list.sort_by_key(|(p, _)| *p);
    Value::Array(
        list.into_iter()
            .map(|(p, attrs)| {
                let mut v = attributes_json(&attrs);
                if let Value::Object(map) = &mut v {
                    map.insert("best".into(), json!(true));
                    map.insert("multipath".into(), json!(true));
                    map.insert("source".into(), json!(speaker.neighbor_name(id)));
                }
                json!({ "prefix": p.to_string(), "paths": [v] })
            })
            .collect(),
    )
}

fn state_text(state: State) -> &'static str {
    match state {
        State::Idle => "Idle",
        State::Connect => "Connect",
        State::Active => "Active",
        State::OpenSent => "OpenSent",
        State::OpenConfirm => "OpenConfirm",
        State::Established => "Established",
    }
}

/// `show protocols [NAME]`.
pub fn protocols(speaker: &Speaker, name: Option<&str>, now: Instant) -> Result<Value, String> {
    let ids: Vec<NeighborId> = match name {
        Some(n) => vec![
            speaker
                .neighbor_by_name(n)
                .ok_or_else(|| format!("no neighbor named {n:?}"))?,
        ],
        None => speaker.neighbor_ids().collect(),
    };
    let asn = speaker.config().asn;
    let list = ids
        .into_iter()
        .filter_map(|id| speaker.neighbor(id))
        .map(|s| {
            let (since, since_unix) = wall_clock(s.since, now);
            let up = s.state == State::Established;
            let info = match (s.state, s.last_error) {
                (State::Established, _) => "Established".to_string(),
                (_, _) if !s.config.enabled => "Disabled".to_string(),
                (state, Some(e)) => format!("{}    {e}", state_text(state)),
                (state, None) => state_text(state).to_string(),
            };
            let n = s.negotiated;
            json!({
                "name": s.config.name,
                "proto": "BGP",
                "state": state_text(s.state),
                "up": up,
                "enabled": s.config.enabled,
                "since": since,
                "since_unix": since_unix,
                "info": info,
                "last_error": s.last_error,
                "neighbor_address": s.config.address.to_string(),
                "neighbor_as": s.config.remote_as,
                "local_as": asn,
                "session": if s.config.remote_as == asn { "internal" } else { "external" },
                "local_address": s.local_address.map(|a: IpAddr| a.to_string()),
                "neighbor_id": n.map(|n| n.peer_id.to_string()),
                "hold_time": n.map(|n| n.hold_time),
                "keepalive": n.map(|n| n.keepalive.as_secs()),
                "families": n.map(|n| n.families.iter().map(|f| f.to_string()).collect::<Vec<_>>()),
                "four_octet_as": n.map(|n| n.codec.four_octet_as),
                "route_refresh": n.map(|n| n.route_refresh),
                "enhanced_route_refresh": n.map(|n| n.enhanced_route_refresh),
                "extended_message": n.map(|n| n.codec.extended_message),
                "routes": { "imported": s.routes_imported, "exported": s.routes_exported },
                "stats": {
                    "updates_received": s.counters.updates_received,
                    "withdraws_received": s.counters.withdraws_received,
                    "filtered_in": s.counters.filtered_in,
                    "updates_sent": s.counters.updates_sent,
                    "withdraws_sent": s.counters.withdraws_sent,
                    "established_transitions": s.counters.established_transitions,
                },
            })
        })
        .collect();
    Ok(Value::Array(list))
}

/// `show bfd sessions`.
pub fn bfd_sessions(bfd: &bgp4mesh_bfd::Bfd, speaker: &Speaker, now: Instant) -> Value {
    let mut list: Vec<(&IpAddr, &bgp4mesh_bfd::Session)> = bfd.sessions().collect();
    list.sort_by_key(|(p, _)| **p);
    Value::Array(
        list.into_iter()
            .map(|(peer, s)| {
                let (since, since_unix) = wall_clock(s.since(), now);
                json!({
                    "peer": peer.to_string(),
                    "neighbor": speaker.neighbor_by_address(*peer).map(|id| speaker.neighbor_name(id).to_string()),
                    "state": s.state().to_string(),
                    "since": since,
                    "since_unix": since_unix,
                    "diagnostic": s.diag().to_string(),
                    "tx_interval_ms": s.tx_interval().as_millis() as u64,
                    "detection_time_ms": s.detection_time().as_millis() as u64,
                    "local_discriminator": s.local_discriminator(),
                    "remote_discriminator": s.remote_discriminator(),
                })
            })
            .collect(),
    )
}

/// Renders `show bfd sessions` like birdc.
pub fn render_bfd(data: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<40} {:<16} {:<6} {:<20} {:>9} {:>9}",
        "IP address", "Neighbor", "State", "Since", "Interval", "Timeout"
    );
    for s in data.as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<40} {:<16} {:<6} {:<20} {:>7}ms {:>7}ms",
            text(&s["peer"]),
            text(&s["neighbor"]),
            text(&s["state"]),
            text(&s["since"]),
            text(&s["tx_interval_ms"]),
            text(&s["detection_time_ms"])
        );
    }
    out
}

/// Bytes as `wg show` writes them: B, KiB, MiB, GiB.
fn bytes_text(v: &Value) -> String {
    let n = v.as_u64().unwrap_or(0);
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// Renders `show peerings`: one line per peering.
pub fn render_peerings(data: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<12} {:<44} {:<22} {:<20} {:<23} {:<12} Routes",
        "Name", "Interface", "Public key", "Endpoint", "Handshake", "Transfer rx/tx", "Session"
    );
    for p in data.as_array().into_iter().flatten() {
        let session = &p["session"];
        let routes = if session.is_null() {
            "-".to_string()
        } else {
            format!(
                "{} imported, {} exported",
                text(&session["routes"]["imported"]),
                text(&session["routes"]["exported"])
            )
        };
        let _ = writeln!(
            out,
            "{:<12} {:<12} {:<44} {:<22} {:<20} {:<23} {:<12} {routes}",
            text(&p["name"]),
            text(&p["interface"]),
            text(&p["public_key"]),
            text(&p["endpoint"]),
            handshake_text(p),
            transfer_text(p),
            text(&session["state"]),
        );
    }
    out
}

/// Renders `show wireguard` like `wg show`: per interface its key and
/// port, then a line per peer.
pub fn render_wireguard(data: &Value) -> String {
    let mut out = String::new();
    for (i, w) in data.as_array().into_iter().flatten().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "interface: {} ({}, {})",
            text(&w["interface"]),
            text(&w["backend"]),
            w["address"]
                .as_array()
                .map(|a| a.iter().map(text).collect::<Vec<_>>().join(", "))
                .filter(|a| !a.is_empty())
                .unwrap_or_else(|| "no address".into())
        );
        let _ = writeln!(out, "  public key: {}", text(&w["public_key"]));
        let _ = writeln!(out, "  listening port: {}", text(&w["listen_port"]));
        if !w["config"].is_null() {
            let _ = writeln!(out, "  config: {}", text(&w["config"]));
        }
        let c = &w["cluster"];
        if !c.is_null() {
            let _ = writeln!(
                out,
                "  cluster: listening on {}, {}; {} session(s) of ours told, {} handover(s), {} message(s) refused",
                text(&c["listen"]),
                if c["synced"] == true {
                    "synced"
                } else {
                    "syncing"
                },
                text(&c["sessions_held"]),
                text(&c["handovers"]),
                text(&c["refused"]),
            );
            for m in c["members"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "    member {}: {}{}, {} session(s), last heard {}",
                    text(&m["address"]),
                    if m["connected"] == true {
                        "connected"
                    } else {
                        "not heard"
                    },
                    if m["synced"] == true { ", synced" } else { "" },
                    text(&m["sessions"]),
                    if m["last_heard"].is_null() {
                        "never".to_string()
                    } else {
                        text(&m["last_heard"])
                    },
                );
            }
        }
        let _ = writeln!(
            out,
            "  {:<44} {:<22} {:<16} {:<20} {:<23} Allowed IPs",
            "Peer", "Endpoint", "Answered from", "Handshake", "Transfer rx/tx"
        );
        for p in w["peers"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  {:<44} {:<22} {:<16} {:<20} {:<23} {}",
                text(&p["public_key"]),
                text(&p["endpoint"]),
                text(&p["local_address"]),
                handshake_text(p),
                transfer_text(p),
                p["allowed_ips"]
                    .as_array()
                    .map(|a| a.iter().map(text).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default()
            );
        }
    }
    out
}

/// `show mesh`: this node (its NAT and candidates), then a line per peer:
/// path, endpoint, last handshake (as an age, from `now`, Unix seconds)
/// and the round trip through the tunnel.
pub fn render_mesh(data: &Value, now: u64) -> String {
    let mut out = String::new();
    let node = &data["node"];
    let list = |v: &Value| {
        v.as_array()
            .map(|a| a.iter().map(text).collect::<Vec<_>>().join(", "))
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| "-".into())
    };
    let _ = writeln!(
        out,
        "node: {} ({}), NAT: {}",
        text(&node["name"]),
        list(&node["addresses"]),
        nat_text(&node["nat"])
    );
    if node["candidates"].as_array().is_some_and(|c| !c.is_empty()) {
        let _ = writeln!(out, "  candidates: {}", list(&node["candidates"]));
    }
    let exit = |v: &Value| match v.as_str() {
        Some(name) => format!("via {name}"),
        None => "its own".into(),
    };
    let _ = writeln!(
        out,
        "  default route: IPv4 {}, IPv6 {}",
        exit(&node["exit4"]),
        exit(&node["exit6"])
    );
    let _ = writeln!(
        out,
        "{:<16} {:<18} {:<8} {:<24} {:<12} {:<9} NAT",
        "Peer", "Address", "Path", "Endpoint", "Handshake", "RTT"
    );
    for p in data["peers"].as_array().into_iter().flatten() {
        let handshake = match p["last_handshake"].as_u64() {
            Some(t) => format!("{}s ago", now.saturating_sub(t)),
            None => "never".into(),
        };
        let rtt = match p["rtt_ms"].as_f64() {
            Some(ms) => format!("{ms:.1} ms"),
            None => "-".into(),
        };
        let address = p["addresses"]
            .as_array()
            .and_then(|a| a.first())
            .map(text)
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<16} {:<18} {:<8} {:<24} {:<12} {:<9} {}",
            text(&p["name"]),
            address,
            text(&p["path"]),
            text(&p["endpoint"]),
            handshake,
            rtt,
            nat_text(&p["nat"])
        );
    }
    let r = &data["relay"];
    if !r.is_null() {
        let d = &r["dropped"];
        let _ = writeln!(
            out,
            "relay: {} channel(s), {} datagram(s) forwarded ({} bytes); dropped: {} unauthenticated, {} unbound, {} oversized, {} malformed, {} rate-limited",
            text(&r["channels"]),
            text(&r["forwarded_datagrams"]),
            text(&r["forwarded_bytes"]),
            text(&d["unauthenticated"]),
            text(&d["unbound"]),
            text(&d["oversized"]),
            text(&d["malformed"]),
            text(&d["rate_limited"]),
        );
    }
    out
}

fn nat_text(v: &Value) -> String {
    match v.as_str() {
        Some("none") => "none".into(),
        Some("endpoint_independent") => "endpoint-independent".into(),
        Some("endpoint_dependent") => "endpoint-dependent".into(),
        _ => "-".into(),
    }
}

/// Bytes received and sent, `rx / tx`.
fn transfer_text(p: &Value) -> String {
    format!(
        "{} / {}",
        bytes_text(&p["rx_bytes"]),
        bytes_text(&p["tx_bytes"])
    )
}

/// The latest handshake's time, or `never`.
fn handshake_text(p: &Value) -> String {
    if p["last_handshake"].is_null() {
        "never".to_string()
    } else {
        text(&p["last_handshake"])
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Renders `show protocols` like birdc.
pub fn render_protocols(data: &Value, all: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<8} {:<6} {:<20} Info",
        "Name", "Proto", "State", "Since"
    );
    for p in data.as_array().into_iter().flatten() {
        let state = if p["up"].as_bool() == Some(true) {
            "up"
        } else if p["enabled"].as_bool() == Some(false) {
            "down"
        } else {
            "start"
        };
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:<6} {:<20} {}",
            text(&p["name"]),
            text(&p["proto"]),
            state,
            text(&p["since"]),
            text(&p["info"])
        );
        if all {
            let _ = writeln!(out, "  BGP state:          {}", text(&p["state"]));
            let _ = writeln!(
                out,
                "    Neighbor address: {}",
                text(&p["neighbor_address"])
            );
            let _ = writeln!(out, "    Neighbor AS:      {}", text(&p["neighbor_as"]));
            let _ = writeln!(out, "    Local AS:         {}", text(&p["local_as"]));
            let _ = writeln!(out, "    Session:          {}", text(&p["session"]));
            if p["up"].as_bool() == Some(true) {
                let _ = writeln!(out, "    Neighbor ID:      {}", text(&p["neighbor_id"]));
                let _ = writeln!(out, "    Source address:   {}", text(&p["local_address"]));
                let _ = writeln!(
                    out,
                    "    Hold timer:       {} s, keepalive {} s",
                    text(&p["hold_time"]),
                    text(&p["keepalive"])
                );
                let families: Vec<String> = p["families"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(text)
                    .collect();
                let _ = writeln!(out, "    Families:         {}", families.join(", "));
            }
            if !p["last_error"].is_null() {
                let _ = writeln!(out, "    Last error:       {}", text(&p["last_error"]));
            }
            let _ = writeln!(
                out,
                "    Routes:           {} imported, {} exported",
                text(&p["routes"]["imported"]),
                text(&p["routes"]["exported"])
            );
            let s = &p["stats"];
            let _ = writeln!(
                out,
                "    Updates:          {} received, {} withdrawn, {} filtered; {} sent, {} withdrawn",
                text(&s["updates_received"]),
                text(&s["withdraws_received"]),
                text(&s["filtered_in"]),
                text(&s["updates_sent"]),
                text(&s["withdraws_sent"])
            );
            out.push('\n');
        }
    }
    out
}

/// Renders `show route` like birdc: one line per path, attributes with `all`.
pub fn render_routes(data: &Value, all: bool) -> String {
    let mut out = String::new();
    for route in data.as_array().into_iter().flatten() {
        for (i, p) in route["paths"].as_array().into_iter().flatten().enumerate() {
            let prefix = if i == 0 {
                text(&route["prefix"])
            } else {
                String::new()
            };
            let mark = if p["best"].as_bool() == Some(true) {
                "*"
            } else if p["multipath"].as_bool() == Some(true) {
                "+"
            } else {
                " "
            };
            let origin = match p["origin"].as_str() {
                Some("IGP") => "i",
                Some("EGP") => "e",
                _ => "?",
            };
            let as_path = text(&p["as_path_text"]);
            let path_note = if as_path.is_empty() {
                format!("[{origin}]")
            } else {
                format!("[AS{} {origin}]", as_path.replace(' ', " AS"))
            };
            let kernel = if i == 0 && route["in_kernel"].as_bool() == Some(true) {
                " (in kernel)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "{prefix:<24} unicast [{}] {mark} {path_note}{kernel}",
                text(&p["source"])
            );
            let _ = writeln!(out, "\tvia {}", text(&p["next_hop"]));
            if all {
                let _ = writeln!(out, "\tBGP.origin: {}", text(&p["origin"]));
                let _ = writeln!(out, "\tBGP.as_path: {as_path}");
                let _ = writeln!(out, "\tBGP.next_hop: {}", text(&p["next_hop"]));
                for (key, label) in [
                    ("med", "BGP.med"),
                    ("local_pref", "BGP.local_pref"),
                    ("aggregator", "BGP.aggregator"),
                    ("originator_id", "BGP.originator_id"),
                ] {
                    if !p[key].is_null() {
                        let _ = writeln!(out, "\t{label}: {}", text(&p[key]));
                    }
                }
                for (key, label) in [
                    ("communities", "BGP.community"),
                    ("large_communities", "BGP.large_community"),
                    ("extended_communities", "BGP.ext_community"),
                    ("cluster_list", "BGP.cluster_list"),
                ] {
                    let list: Vec<String> =
                        p[key].as_array().into_iter().flatten().map(text).collect();
                    if !list.is_empty() {
                        let _ = writeln!(out, "\t{label}: {}", list.join(" "));
                    }
                }
            }
        }
    }
    out
}

/// `show overlay`: the bridge, then a line per wire.
pub fn render_overlay(data: &Value) -> String {
    let mut out = format!(
        "bridge {}, MTU {}, spanning tree: {}\n",
        text(&data["bridge"]),
        data["mtu"],
        match data["stp"].as_str() {
            Some("stp") => "the kernel's (802.1D)",
            Some("fast") => "ours (RSTP)",
            _ => "none",
        }
    );
    if let Some(root) = data["root"].as_str() {
        let root_port = data["root_port"]
            .as_str()
            .unwrap_or("none (this is the root)");
        let mut line = format!(
            "bridge id {}, root {root} via {root_port}",
            text(&data["bridge_id"])
        );
        if let Some(cost) = data["root_path_cost"].as_u64() {
            line.push_str(&format!(" (cost {cost})"));
        }
        if let Some(changes) = data["topology_changes"].as_u64() {
            line.push_str(&format!(", {changes} topology change(s)"));
        }
        if let Some(t) = data["last_topology_change_at"].as_u64() {
            line.push_str(&format!(", the last at {} UTC", utc_text(t)));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(&format!(
        "{:<12} {:<9} {:<11} {:<10} {:<8} {:<26} {:<26} over\n",
        "Port", "VNI", "State", "Role", "Via", "Local", "Remote"
    ));
    for w in data["wires"].as_array().into_iter().flatten() {
        // The kernel's STP: whether the tunnel answers, the rest in
        // `bridge link show`.
        let state = match (w["state"].as_str(), w["alive"].as_bool()) {
            (Some(state), _) => state,
            (None, Some(false)) => "down",
            (None, Some(true)) => "up",
            (None, None) => "-",
        };
        out.push_str(&format!(
            "{:<12} {:<9} {:<11} {:<10} {:<8} {:<26} {:<26} {}\n",
            text(&w["port"]),
            w["vni"].as_u64().map(|v| v.to_string()).unwrap_or_default(),
            state,
            w["role"].as_str().unwrap_or("-"),
            text(&w["via"]),
            text(&w["local"]),
            text(&w["remote"]),
            text(&w["over"])
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overlay_shows_its_bridge_and_each_wire() {
        let data = serde_json::json!({
            "bridge": "br-l2", "mtu": 1500, "stp": "stp",
            "wires": [{"port": "b4vx-00abcd", "over": "peering:rho", "vni": 43981,
                       "local": "10.88.88.4", "remote": "10.88.88.2", "via": "wg-rho"}],
        });
        let shown = render_overlay(&data);
        assert!(
            shown.starts_with("bridge br-l2, MTU 1500, spanning tree: the kernel's (802.1D)\n")
        );
        let wire = shown.lines().nth(2).unwrap_or_default();
        for field in [
            "b4vx-00abcd",
            "43981",
            "wg-rho",
            "10.88.88.4",
            "10.88.88.2",
            "peering:rho",
        ] {
            assert!(wire.contains(field), "{field} missing: {wire}");
        }
    }

    #[test]
    fn our_spanning_tree_shows_its_root_and_each_port_state() {
        let data = serde_json::json!({
            "bridge": "br-l2", "mtu": 1500, "stp": "fast",
            "bridge_id": "8000.020000000003", "root": "1000.020000000001",
            "root_port": "b4vx-000001", "root_path_cost": 20000, "topology_changes": 2,
            "last_topology_change_at": 951_782_400u64,
            "wires": [{"port": "b4vx-000001", "over": "peering:rho", "vni": 1,
                       "local": "10.88.88.3", "remote": "10.88.88.1", "via": "wg-rho",
                       "state": "forwarding", "role": "root", "alive": true},
                      {"port": "b4vx-000002", "over": "peering:bob", "vni": 2,
                       "local": "10.88.88.3", "remote": "10.88.88.2", "via": "wg-bob",
                       "state": "down", "role": "disabled", "alive": false}],
        });
        let shown = render_overlay(&data);
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(
            lines[1],
            "bridge id 8000.020000000003, root 1000.020000000001 via b4vx-000001 (cost 20000), \
             2 topology change(s), the last at 2000-02-29 00:00:00 UTC"
        );
        assert!(
            lines[3].contains("forwarding") && lines[3].contains("root"),
            "{}",
            lines[3]
        );
        assert!(
            lines[4].contains("down") && lines[4].contains("disabled"),
            "{}",
            lines[4]
        );
    }

    #[test]
    fn utc_text_matches_known_dates() {
        assert_eq!(utc_text(0), "1970-01-01 00:00:00");
        assert_eq!(utc_text(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_text(1_795_316_495), "2026-11-22 03:01:35");
    }

    #[test]
    fn routes_render_like_birdc() {
        let data = json!([{ "prefix": "192.0.2.0/24", "paths": [
            { "source": "isp", "best": true, "multipath": true, "origin": "IGP", "as_path_text": "65001 65010",
              "next_hop": "172.30.0.1", "local_pref": 100, "med": null, "communities": ["65001:7"],
              "large_communities": [], "extended_communities": [], "cluster_list": [], "aggregator": null, "originator_id": null }
        ]}]);
        let text = render_routes(&data, true);
        assert!(
            text.starts_with(
                "192.0.2.0/24             unicast [isp] * [AS65001 AS65010 i]\n\tvia 172.30.0.1\n"
            ),
            "{text}"
        );
        assert!(text.contains("\tBGP.local_pref: 100\n"), "{text}");
        assert!(text.contains("\tBGP.community: 65001:7\n"), "{text}");
        assert!(!text.contains("BGP.med"), "{text}");
    }
}
