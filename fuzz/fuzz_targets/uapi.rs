//! Any bytes as the lines of a UAPI `set=1` request: parsing must never
//! panic, and an accepted request applied to the allowed-IPs table (the
//! part of a device that needs no TUN) must leave it consistent.
//!
//! Each input line is a key chosen by its first byte and a value: the rest
//! of the line as text, or (high bit of the first byte) a key, prefix,
//! endpoint or number built from its bytes. std's address parsers are not
//! instrumented, so coverage alone would not teach the fuzzer their syntax;
//! built prefixes come from a small space, so peers fight over the same
//! networks. A first byte of 0xff passes the line as it is.
#![no_main]

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bgp4mesh_wireguard::allowed_ips::AllowedIps;
use bgp4mesh_wireguard::uapi::SetParser;
use bgp4mesh_wireguard::{AllowedIpChange, Key};
use libfuzzer_sys::fuzz_target;

const KEYS: [&str; 14] = [
    "public_key",
    "private_key",
    "listen_port",
    "fwmark",
    "replace_peers",
    "remove",
    "update_only",
    "preshared_key",
    "endpoint",
    "persistent_keepalive_interval",
    "replace_allowed_ips",
    "allowed_ip",
    "protocol_version",
    "unknown",
];

fn byte(b: &[u8], i: usize) -> u8 {
    b.get(i).copied().unwrap_or(0)
}

fn address(b: &[u8]) -> IpAddr {
    if byte(b, 0) & 2 == 0 {
        IpAddr::V4(Ipv4Addr::new(10, 0, byte(b, 1), byte(b, 2)))
    } else {
        let low = u16::from_be_bytes([byte(b, 1), byte(b, 2)]);
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, low))
    }
}

fn built_value(key: &str, b: &[u8]) -> String {
    match key {
        "public_key" | "private_key" | "preshared_key" => Key([byte(b, 0) % 8; 32]).to_hex(),
        "allowed_ip" => {
            let addr = address(b);
            let bits = if addr.is_ipv4() { 33 } else { 129 };
            let remove = if byte(b, 0) & 1 == 1 { "-" } else { "" };
            format!("{remove}{addr}/{}", byte(b, 3) % bits)
        }
        "endpoint" => SocketAddr::new(address(b), u16::from(byte(b, 3))).to_string(),
        _ if byte(b, 0) & 1 == 0 => "true".into(),
        _ => u32::from_be_bytes([byte(b, 1), byte(b, 2), byte(b, 3), byte(b, 4)]).to_string(),
    }
}

fn request_line(raw: &[u8]) -> Option<String> {
    let (&first, rest) = raw.split_first()?;
    if first == 0xff {
        return std::str::from_utf8(rest).ok().map(str::to_owned);
    }
    let key = KEYS[usize::from(first & 0x7f) % KEYS.len()];
    let value = if first & 0x80 != 0 {
        built_value(key, rest)
    } else {
        // The server refuses a line that is not UTF-8 before parsing it.
        std::str::from_utf8(rest).ok()?.to_owned()
    };
    Some(format!("{key}={value}"))
}

fuzz_target!(|data: &[u8]| {
    let mut parser = SetParser::default();
    for raw in data.split(|b| *b == b'\n') {
        let Some(line) = request_line(raw) else {
            continue;
        };
        if parser.line(&line).is_err() {
            return;
        }
    }
    let request = parser.finish();

    // The device's semantics for peers and their allowed IPs.
    let mut table = AllowedIps::<Key>::new();
    let mut peers: HashSet<Key> = HashSet::new();
    if request.replace_peers {
        for key in peers.drain() {
            table.clear(&key);
        }
    }
    for change in &request.peers {
        let key = change.public_key;
        if change.remove {
            peers.remove(&key);
            table.clear(&key);
            continue;
        }
        if !peers.contains(&key) {
            if change.update_only {
                continue;
            }
            peers.insert(key);
        }
        if change.replace_allowed_ips {
            table.clear(&key);
        }
        for allowed in &change.allowed_ips {
            match *allowed {
                AllowedIpChange::Add(net) => {
                    table.insert(net, &key);
                    if net.prefix_len() == net.max_prefix_len() {
                        // Nothing is more specific than a host route.
                        assert_eq!(table.lookup(net.addr()), Some(&key), "{net}");
                    }
                }
                AllowedIpChange::Remove(net) => {
                    table.remove(net, &key);
                    assert!(table.of(&key).all(|n| n != net.trunc()), "{net}");
                }
            }
        }
    }
    if let Err(e) = table.check() {
        panic!("allowed IPs inconsistent: {e}");
    }
    let listed: usize = peers.iter().map(|k| table.of(k).count()).sum();
    assert_eq!(listed, table.len());
});
