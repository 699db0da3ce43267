//! Any bytes as BFD control packets: decoding must never panic and a
//! decoded packet must encode back to itself; a speaker with two sessions,
//! fed packets (raw, or well-formed from the input's fields) and time steps
//! on virtual time, must never panic and must only ever send packets that
//! decode.
#![no_main]

use std::net::IpAddr;
use std::time::{Duration, Instant};

use bgp4mesh_bfd::{Bfd, ControlPacket, Diag, PACKET_LEN, SessionConfig, State};
use libfuzzer_sys::fuzz_target;

/// Takes `n` bytes from the front of `rest` (fewer at its end).
fn take<'a>(rest: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = rest.split_at(n.min(rest.len()));
    *rest = tail;
    head
}

fn u32_from(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0, |n, b| n << 8 | u32::from(*b))
}

fn sent_packets_decode(bfd: &mut Bfd, now: Instant) {
    bfd.handle_timeout(now);
    for (peer, bytes) in bfd.poll_transmit(now) {
        if let Err(e) = ControlPacket::decode(&bytes) {
            panic!("we sent {peer} a packet it must discard ({e}): {bytes:?}");
        }
    }
    while bfd.poll_event().is_some() {}
}

fuzz_target!(|data: &[u8]| {
    if let Ok(packet) = ControlPacket::decode(data) {
        assert_eq!(ControlPacket::decode(&packet.encode()), Ok(packet));
    }

    let peers: [IpAddr; 3] = [
        IpAddr::from([10, 0, 0, 2]),
        IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 2]),
        // No session: its packets are discarded.
        IpAddr::from([192, 0, 2, 9]),
    ];
    let mut now = Instant::now();
    let mut bfd = Bfd::new();
    for peer in &peers[..2] {
        bfd.add(now, *peer, SessionConfig::default());
    }
    let mut rest = data;
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        let peer = peers[usize::from(op >> 3) % peers.len()];
        match op & 7 {
            // Raw bytes from a peer.
            0 | 1 => {
                let len = usize::from(take(&mut rest, 1).first().copied().unwrap_or(0)) % 40;
                let _ = bfd.receive(now, peer, take(&mut rest, len));
            }
            // A packet that passes the checks, addressed to our session.
            2 | 3 => {
                let f = take(&mut rest, 12);
                let byte = |i: usize| f.get(i).copied().unwrap_or(0);
                let state = match byte(0) & 3 {
                    0 => State::AdminDown,
                    1 => State::Down,
                    2 => State::Init,
                    _ => State::Up,
                };
                let ours = bfd.session(peer).map_or(0, |s| s.local_discriminator());
                let mut p = ControlPacket {
                    diag: Diag::None,
                    state,
                    poll: byte(0) & 4 != 0,
                    final_: byte(0) & 8 != 0,
                    demand: false,
                    detect_mult: byte(1).max(1),
                    my_discriminator: u32::from(byte(2)).max(1),
                    your_discriminator: if byte(0) & 16 != 0 {
                        u32::from(byte(3))
                    } else {
                        ours
                    },
                    desired_min_tx: 0,
                    required_min_rx: 0,
                    required_min_echo_rx: 0,
                };
                if p.your_discriminator == 0 && matches!(state, State::Init | State::Up) {
                    p.your_discriminator = ours.max(1);
                }
                // Microseconds: up to 16.7 s, or anything (u32) now and then.
                p.desired_min_tx = u32_from(f.get(4..7).unwrap_or(&[]));
                p.required_min_rx = u32_from(f.get(7..10).unwrap_or(&[]));
                if byte(0) & 32 != 0 {
                    p.required_min_rx = u32_from(f.get(7..11).unwrap_or(&[]));
                }
                let bytes = p.encode();
                assert_eq!(bytes.len(), PACKET_LEN);
                let _ = bfd.receive(now, peer, &bytes);
            }
            // Time passes: up to 65 s.
            4 | 5 => {
                let step = take(&mut rest, 2);
                now += Duration::from_millis(u64::from(u32_from(step)));
            }
            // A session is retimed (or started again).
            6 => {
                let f = take(&mut rest, 3);
                let byte = |i: usize| f.get(i).copied().unwrap_or(1);
                let config = SessionConfig {
                    desired_min_tx: Duration::from_millis(u64::from(byte(0)) * 10),
                    required_min_rx: Duration::from_millis(u64::from(byte(1)) * 10),
                    detect_mult: byte(2).max(1),
                };
                bfd.add(now, peer, config);
            }
            // A session is stopped: its AdminDown packet must decode too.
            _ => {
                if let Some(bytes) = bfd.remove(peer) {
                    if let Err(e) = ControlPacket::decode(&bytes) {
                        panic!("the AdminDown packet to {peer} is refused ({e})");
                    }
                }
            }
        }
        sent_packets_decode(&mut bfd, now);
        if let Some(next) = bfd.poll_timeout() {
            // Jump to the next deadline now and then, as the driver does.
            if op & 0x40 != 0 && next > now {
                now = next;
                sent_packets_decode(&mut bfd, now);
            }
        }
    }
});
