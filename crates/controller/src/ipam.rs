//! Mesh addresses from the network's range: the lowest free host address,
//! never one in use, pinned addresses checked against the range. A node's
//! address is released when the node is deleted.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// The host addresses of a range: without the network and broadcast
/// addresses, except in /31 and /32 where every address is a host.
fn hosts4(range: Ipv4Net) -> impl Iterator<Item = Ipv4Addr> {
    let (first, last) = (u32::from(range.network()), u32::from(range.broadcast()));
    let (first, last) = if range.prefix_len() >= 31 {
        (first, last)
    } else {
        (first + 1, last - 1)
    };
    (first..=last).map(Ipv4Addr::from)
}

pub fn allocate_v4(range: Ipv4Net, used: &HashSet<Ipv4Addr>) -> Result<Ipv4Addr, String> {
    hosts4(range).find(|a| !used.contains(a)).ok_or_else(|| {
        format!(
            "address range {range} is exhausted: all {} host addresses are in use",
            hosts4(range).count()
        )
    })
}

pub fn check_pinned_v4(
    range: Ipv4Net,
    used: &HashSet<Ipv4Addr>,
    address: Ipv4Addr,
) -> Result<Ipv4Addr, String> {
    if !range.contains(&address) {
        return Err(format!(
            "address {address} is outside the network's range {range}"
        ));
    }
    if range.prefix_len() < 31 && (address == range.network() || address == range.broadcast()) {
        return Err(format!(
            "address {address} is the network or broadcast address of {range}"
        ));
    }
    if used.contains(&address) {
        return Err(format!("address {address} is already in use"));
    }
    Ok(address)
}

/// IPv6: the lowest free host number in the range, from ::1, looking at
/// most 65,536 addresses ahead.
pub fn allocate_v6(range: Ipv6Net, used: &HashSet<Ipv6Addr>) -> Result<Ipv6Addr, String> {
    let base = u128::from(range.network());
    let size = if range.prefix_len() == 0 {
        u128::MAX
    } else {
        (1u128 << (128 - u32::from(range.prefix_len()))) - 1
    };
    (1..=size.min(65_536))
        .map(|i| Ipv6Addr::from(base + i))
        .find(|a| !used.contains(a))
        .ok_or_else(|| format!("address range {range} is exhausted"))
}

pub fn check_pinned_v6(
    range: Ipv6Net,
    used: &HashSet<Ipv6Addr>,
    address: Ipv6Addr,
) -> Result<Ipv6Addr, String> {
    if !range.contains(&address) {
        return Err(format!(
            "address6 {address} is outside the network's IPv6 range {range}"
        ));
    }
    if address == range.network() {
        return Err(format!(
            "address6 {address} is the subnet-router anycast address of {range}"
        ));
    }
    if used.contains(&address) {
        return Err(format!("address6 {address} is already in use"));
    }
    Ok(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("net")
    }

    #[test]
    fn lowest_free_host_never_twice_and_exhaustion_is_named() {
        let range = net("44.30.127.0/29");
        let mut used = HashSet::new();
        let mut got = Vec::new();
        for _ in 0..6 {
            let a = allocate_v4(range, &used).expect("free");
            assert!(used.insert(a), "{a} handed out twice");
            got.push(a.to_string());
        }
        assert_eq!(got.first().map(String::as_str), Some("44.30.127.1"));
        assert_eq!(got.last().map(String::as_str), Some("44.30.127.6"));
        let err = allocate_v4(range, &used).expect_err("full");
        assert!(err.contains("exhausted") && err.contains("all 6"), "{err}");
        // A released address is free again.
        used.remove(&"44.30.127.3".parse().expect("ip"));
        assert_eq!(
            allocate_v4(range, &used),
            Ok("44.30.127.3".parse().expect("ip"))
        );
    }

    #[test]
    fn pinned_addresses_are_checked() {
        let range = net("44.30.127.0/24");
        let used = HashSet::from(["44.30.127.5".parse().expect("ip")]);
        assert!(check_pinned_v4(range, &used, "44.30.127.1".parse().expect("ip")).is_ok());
        for (a, why) in [
            ("44.30.128.1", "outside"),
            ("44.30.127.0", "network or broadcast"),
            ("44.30.127.255", "network or broadcast"),
            ("44.30.127.5", "in use"),
        ] {
            let err = check_pinned_v4(range, &used, a.parse().expect("ip")).expect_err(a);
            assert!(err.contains(why), "{a}: {err}");
        }
        assert_eq!(
            allocate_v4(net("192.0.2.7/32"), &HashSet::new()),
            Ok("192.0.2.7".parse().expect("ip"))
        );
    }

    #[test]
    fn ipv6_hosts_count_from_one() {
        let range: Ipv6Net = "fd44::/64".parse().expect("net");
        let used = HashSet::from(["fd44::1".parse().expect("ip")]);
        assert_eq!(
            allocate_v6(range, &used),
            Ok("fd44::2".parse().expect("ip"))
        );
        assert!(check_pinned_v6(range, &used, "fd44::".parse().expect("ip")).is_err());
    }
}
