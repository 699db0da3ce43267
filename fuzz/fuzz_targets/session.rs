//! Any bytes received by a session in any state: must never panic, and
//! must end in a NOTIFICATION or keep going.
#![no_main]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use bgp4mesh_bgp::session::{ConnId, Session, SessionConfig};
use bgp4mesh_bgp::wire::Family;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let config = SessionConfig {
        local_as: 65000,
        remote_as: 65001,
        router_id: Ipv4Addr::new(10, 0, 0, 1),
        hold_time: 90,
        passive: true,
        connect_retry: Duration::from_secs(5),
        idle_hold: Duration::from_secs(1),
        idle_hold_max: Duration::from_secs(60),
        families: vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST],
        extended_message: true,
        extended_next_hop: true,
        graceful_restart: Some(120),
        restarting: false,
    };
    let mut session = Session::new(config, now);
    session.start(now);
    session.tcp_connected(now, ConnId(1), false);
    for chunk in data.chunks(97) {
        session.received(now, ConnId(1), chunk);
        while session.poll_output().is_some() {}
    }
    session.handle_timeout(now + Duration::from_secs(300));
});
