//! NLRI prefixes: a length in bits, then just enough bytes (RFC 4271 §4.3).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{AFI_IPV4, AFI_IPV6, Reader};

/// Bytes a prefix takes on the wire.
pub fn prefix_wire_len(prefix: &IpNet) -> usize {
    1 + (prefix.prefix_len() as usize).div_ceil(8)
}

/// Appends one prefix.
pub fn encode_prefix(out: &mut Vec<u8>, prefix: &IpNet) {
    let len = prefix.prefix_len();
    let bytes = (len as usize).div_ceil(8);
    out.push(len);
    match prefix {
        IpNet::V4(p) => out.extend_from_slice(&p.network().octets()[..bytes]),
        IpNet::V6(p) => out.extend_from_slice(&p.network().octets()[..bytes]),
    }
}

/// Decodes a run of prefixes of family `afi`. Fails (with a reason) when a
/// length is too long for the family or the bytes run out: RFC 7606 §5.3
/// calls that a syntactically incorrect NLRI field. Host bits past the
/// length are cleared.
pub fn decode_prefixes(bytes: &[u8], afi: u16) -> Result<Vec<IpNet>, String> {
    let mut r = Reader::new(bytes);
    let mut out = Vec::with_capacity(bytes.len() / 4);
    while !r.is_empty() {
        out.push(decode_one(&mut r, afi)?);
    }
    Ok(out)
}

fn decode_one(r: &mut Reader<'_>, afi: u16) -> Result<IpNet, String> {
    let len = r.u8().ok_or("prefix length missing")?;
    let max = match afi {
        AFI_IPV4 => 32,
        AFI_IPV6 => 128,
        other => return Err(format!("prefixes of AFI {other} are not supported")),
    };
    if len > max {
        return Err(format!("prefix length {len} is longer than {max}"));
    }
    let n = (len as usize).div_ceil(8);
    let bytes = r
        .take(n)
        .ok_or_else(|| format!("prefix /{len} needs {n} bytes, {} left", r.remaining()))?;
    Ok(if afi == AFI_IPV4 {
        let mut octets = [0u8; 4];
        octets[..n].copy_from_slice(bytes);
        // Cannot fail: len <= 32 was checked above.
        let net = Ipv4Net::new(Ipv4Addr::from(octets), len).map_err(|e| e.to_string())?;
        IpNet::V4(net.trunc())
    } else {
        let mut octets = [0u8; 16];
        octets[..n].copy_from_slice(bytes);
        let net = Ipv6Net::new(Ipv6Addr::from(octets), len).map_err(|e| e.to_string())?;
        IpNet::V6(net.trunc())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("valid prefix")
    }

    #[test]
    fn byte_exact_encoding() {
        let mut out = Vec::new();
        for p in [
            "192.0.2.0/24",
            "10.0.0.0/8",
            "0.0.0.0/0",
            "44.30.127.3/32",
            "2001:db8::/32",
        ] {
            encode_prefix(&mut out, &net(p));
        }
        assert_eq!(
            out,
            [
                &[24, 192, 0, 2][..],
                &[8, 10],
                &[0],
                &[32, 44, 30, 127, 3],
                &[32, 0x20, 0x01, 0x0d, 0xb8]
            ]
            .concat()
        );
    }

    #[test]
    fn decoding_rejects_overlong_and_truncated_prefixes() {
        assert!(decode_prefixes(&[33, 1, 2, 3, 4, 5], AFI_IPV4).is_err());
        assert!(decode_prefixes(&[24, 192, 0], AFI_IPV4).is_err());
        assert!(decode_prefixes(&[129], AFI_IPV6).is_err());
        assert_eq!(decode_prefixes(&[], AFI_IPV4), Ok(vec![]));
    }

    #[test]
    fn host_bits_are_cleared() {
        assert_eq!(
            decode_prefixes(&[23, 192, 168, 43], AFI_IPV4),
            Ok(vec![net("192.168.42.0/23")])
        );
    }
}
