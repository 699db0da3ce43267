//! The speaker alone on a full table, in memory: no sockets, no kernel.
//!
//! One eBGP injector sends N IPv4 /24s with M distinct attribute sets to a
//! `Speaker`, which exports them to one eBGP monitor; then the injector
//! withdraws everything. Prints the time each step took in the sans-IO
//! core and what the process's resident memory grew by, per prefix.
//!
//! ```sh
//! cargo run --release -p bgp4mesh-bgp --example full_table -- 1000000 100000
//! ```
//! `FULL_TABLE_LOAD_ONLY=1` stops after the load (to profile it alone).
//! Under callgrind (repeatable instruction counts on a noisy machine):
//! `valgrind --tool=callgrind target/release/examples/full_table 100000 10000`.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use bgp4mesh_bgp::policy::Policy;
use bgp4mesh_bgp::rib::{NeighborId, Selection};
use bgp4mesh_bgp::session::ConnId;
use bgp4mesh_bgp::speaker::{Event, NeighborConfig, Speaker, SpeakerConfig};
use bgp4mesh_bgp::wire::{
    AsPath, Capability, Codec, Community, Family, Message, NextHop, Open, Origin, PathAttributes,
    UpdateBuilder,
};
use ipnet::{IpNet, Ipv4Net};

/// The daemon's allocator (src/main.rs), so the figures are the daemon's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const INJECTOR: NeighborId = NeighborId(0);
const MONITOR: NeighborId = NeighborId(1);
/// The connections to them.
const INJECTOR_CONN: ConnId = ConnId(1);
const MONITOR_CONN: ConnId = ConnId(2);

fn vm_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn prefix(n: u32) -> IpNet {
    let base = 0x0100_0000u32 + (n << 8);
    IpNet::V4(Ipv4Net::new(Ipv4Addr::from(base), 24).unwrap_or_default())
}

fn table(prefixes: u32, paths: u32, next_hop: Ipv4Addr) -> (Vec<u8>, Vec<u8>) {
    let paths = paths.clamp(1, prefixes.max(1));
    let mut groups: Vec<Vec<IpNet>> = vec![Vec::new(); paths as usize];
    for n in 0..prefixes {
        groups[(n % paths) as usize].push(prefix(n));
    }
    let builder = UpdateBuilder::new(Codec {
        four_octet_as: true,
        extended_message: false,
        ebgp: true,
    });
    let (mut announce, mut withdraw) = (Vec::new(), Vec::new());
    for (i, group) in groups.iter().enumerate() {
        let i = i as u32;
        let attrs = PathAttributes {
            origin: Origin::Igp,
            as_path: AsPath::sequence([65001, 64512 + (i % 400), 4_200_000_000 + i / 400]),
            next_hop: Some(NextHop::V4(next_hop)),
            communities: vec![Community::new(65001, (i % 65535) as u16)],
            ..PathAttributes::default()
        };
        builder.announce(&mut announce, &attrs, group);
        builder.withdraw(&mut withdraw, group);
    }
    (announce, withdraw)
}

fn open_bytes(asn: u32, id: Ipv4Addr) -> Vec<u8> {
    let open = Open::new(
        asn,
        0,
        id,
        vec![
            Capability::Multiprotocol(Family::IPV4_UNICAST),
            Capability::RouteRefresh,
        ],
    );
    let mut b = Message::Open(open).encode(&Codec::INITIAL);
    b.extend(Message::Keepalive.encode(&Codec::INITIAL));
    b
}

/// Drains events; returns the bytes sent to the monitor.
fn pump(speaker: &mut Speaker, now: Instant) -> usize {
    let mut sent = 0;
    while let Some(e) = speaker.poll_event() {
        match e {
            Event::Send {
                neighbor: MONITOR,
                bytes,
                ..
            } => sent += bytes.len(),
            Event::Connect { neighbor } => speaker.tcp_connected(
                now,
                neighbor,
                MONITOR_CONN,
                true,
                IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1)),
            ),
            _ => {}
        }
    }
    sent
}

fn feed(speaker: &mut Speaker, now: Instant, bytes: &[u8]) -> usize {
    let mut sent = 0;
    for chunk in bytes.chunks(1 << 16) {
        speaker.received(now, INJECTOR, INJECTOR_CONN, chunk);
        sent += pump(speaker, now);
    }
    sent
}

fn main() {
    let mut args = std::env::args().skip(1);
    let prefixes: u32 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let paths: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let (announce, withdraw) = table(prefixes, paths, Ipv4Addr::new(10, 0, 0, 2));
    let all = Arc::new(Policy::accept_all());
    let none = Arc::new(Policy::reject_all());
    let mut injector = NeighborConfig::new(
        "injector",
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
        65001,
        all.clone(),
        none.clone(),
    );
    injector.passive = true;
    injector.families = vec![Family::IPV4_UNICAST];
    let mut monitor = NeighborConfig::new(
        "monitor",
        IpAddr::V4(Ipv4Addr::new(10, 0, 1, 2)),
        64999,
        none,
        all,
    );
    monitor.families = vec![Family::IPV4_UNICAST];
    let config = SpeakerConfig {
        asn: 65000,
        router_id: Ipv4Addr::new(10, 255, 0, 1),
        cluster_id: None,
        selection: Selection::default(),
        neighbors: vec![injector, monitor],
        statics: vec![],
    };
    let now = Instant::now();
    let mut speaker = Speaker::new(config, now);
    // As `bench bgp` runs it: `[kernel] enabled = false`, no route events.
    speaker.set_route_events(false);
    speaker.start(now);
    pump(&mut speaker, now);
    speaker.tcp_connected(
        now,
        INJECTOR,
        INJECTOR_CONN,
        false,
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
    );
    pump(&mut speaker, now);
    speaker.received(
        now,
        MONITOR,
        MONITOR_CONN,
        &open_bytes(64999, Ipv4Addr::new(10, 0, 1, 2)),
    );
    pump(&mut speaker, now);
    speaker.received(
        now,
        INJECTOR,
        INJECTOR_CONN,
        &open_bytes(65001, Ipv4Addr::new(10, 0, 0, 2)),
    );
    pump(&mut speaker, now);

    let base_kb = vm_kb("VmRSS:");
    let t = Instant::now();
    let sent = feed(&mut speaker, now, &announce);
    let load = t.elapsed();
    let loaded_kb = vm_kb("VmRSS:");
    let peak_kb = vm_kb("VmHWM:");
    println!(
        "load:     {prefixes} prefixes, {paths} attribute sets: {:.3} s, {:.0} k prefixes/s, \
         {sent} bytes to the monitor",
        load.as_secs_f64(),
        prefixes as f64 / load.as_secs_f64() / 1e3
    );
    println!(
        "memory:   RSS +{:.1} MB after the load ({:.0} bytes per prefix), peak {:.1} MB \
         (the encoded table alone is {:.1} MB)",
        (loaded_kb.saturating_sub(base_kb)) as f64 / 1024.0,
        (loaded_kb.saturating_sub(base_kb)) as f64 * 1024.0 / prefixes.max(1) as f64,
        peak_kb as f64 / 1024.0,
        (announce.len() + withdraw.len()) as f64 / 1e6
    );
    let m = speaker.memory();
    let per = |b: usize| b as f64 / m.prefixes.max(1) as f64;
    println!(
        "rib:      {} prefixes, {} interned attribute sets ({:.1} prefixes each), interner hit rate {:.3} \
         (one lookup per UPDATE)",
        m.prefixes,
        m.attribute_sets,
        m.prefixes as f64 / m.attribute_sets.max(1) as f64,
        speaker.interner().hit_rate()
    );
    println!(
        "bytes per prefix: Loc-RIB slots {:.1}, Loc-RIB index {:.1}, Adj-RIB-In {:.1}, \
         Adj-RIB-Out {:.1}, attribute sets {:.1} ({:.0} bytes a set); total {:.1}",
        per(m.loc_rib),
        per(m.loc_rib_index),
        per(m.adj_rib_in),
        per(m.adj_rib_out),
        per(m.attributes),
        m.attributes as f64 / m.attribute_sets.max(1) as f64,
        per(m.loc_rib + m.loc_rib_index + m.adj_rib_in + m.adj_rib_out + m.attributes)
    );
    if std::env::var_os("FULL_TABLE_LOAD_ONLY").is_some() {
        // For profiling the load alone: no withdrawal, no teardown.
        std::process::exit(0);
    }
    let t = Instant::now();
    let sent = feed(&mut speaker, now, &withdraw);
    println!(
        "withdraw: {:.3} s, {sent} bytes to the monitor, {} prefixes left",
        t.elapsed().as_secs_f64(),
        speaker.rib().len()
    );
}
