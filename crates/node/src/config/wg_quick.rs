//! wg-quick's file format (`/etc/wireguard/wg0.conf`), read so that a
//! `[[wireguard]]` can be `config = "/etc/wireguard/wg0.conf"` and users
//! keep the files they have.
//!
//! What `wg setconf` reads ([Interface] PrivateKey, ListenPort, FwMark;
//! [Peer] PublicKey, PresharedKey, AllowedIPs, Endpoint,
//! PersistentKeepalive) and wg-quick's Address and MTU are taken as they
//! do: keys and section names in any case, white space anywhere ignored,
//! `#` starts a comment, AllowedIPs and Address comma-separated and
//! repeatable, an address without a prefix a host's. wg-quick's other keys
//! (DNS, Table, the Up/Down hooks, SaveConfig) are refused each with what
//! to do instead. Errors give the line; they never hold a key.

use std::net::{IpAddr, SocketAddr};

use bgp4mesh_wireguard::Key;
use ipnet::IpNet;

/// One wg-quick file as read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WgQuickFile {
    pub private_key: Option<Key>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub address: Vec<IpNet>,
    pub mtu: Option<u16>,
    pub peers: Vec<WgQuickPeer>,
}

/// One [Peer] section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgQuickPeer {
    /// The line of its `[Peer]`.
    pub line: usize,
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    pub allowed_ips: Vec<IpNet>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
}

/// A [Peer] being read: its public key may come on any of its lines.
struct PeerDraft {
    line: usize,
    public_key: Option<Key>,
    preshared_key: Option<Key>,
    allowed_ips: Vec<IpNet>,
    endpoint: Option<SocketAddr>,
    persistent_keepalive: Option<u16>,
    seen: Vec<String>,
}

enum Section {
    None,
    Interface,
    Peer(PeerDraft),
}

/// What to do instead of each of wg-quick's own keys.
fn wg_quick_own(key: &str) -> Option<&'static str> {
    Some(match key {
        "dns" => {
            "bgp4mesh sets no resolver (wg-quick calls resolvconf): remove the line and set DNS on the system"
        }
        "table" => {
            "bgp4mesh routes each peer's AllowedIPs into the interface (what Table = auto does) and takes other routes from BGP or [[bgp.static]]: remove the line"
        }
        "preup" | "postup" | "predown" | "postdown" => {
            "bgp4mesh runs no commands: remove the line (routes belong in [[bgp.static]] or BGP; anything else in the service's ExecStartPre/ExecStartPost)"
        }
        "saveconfig" => "bgp4mesh never writes the file: remove the line",
        _ => return None,
    })
}

/// The key's name as wg-quick writes it, for messages.
fn spelled(key: &str) -> &str {
    match key {
        "dns" => "DNS",
        "table" => "Table",
        "preup" => "PreUp",
        "postup" => "PostUp",
        "predown" => "PreDown",
        "postdown" => "PostDown",
        "saveconfig" => "SaveConfig",
        "privatekey" => "PrivateKey",
        "listenport" => "ListenPort",
        "fwmark" => "FwMark",
        "address" => "Address",
        "mtu" => "MTU",
        "publickey" => "PublicKey",
        "presharedkey" => "PresharedKey",
        "allowedips" => "AllowedIPs",
        "endpoint" => "Endpoint",
        "persistentkeepalive" => "PersistentKeepalive",
        other => other,
    }
}

/// An address or network; an address alone is a host's (/32, /128).
fn parse_net(text: &str) -> Result<IpNet, String> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net);
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{text:?} is not an address or network"))
}

/// `IP:port` (`[v6]:port`); a host name is refused, not resolved.
pub fn parse_endpoint(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if addr.port() == 0 || addr.ip().is_unspecified() {
            return Err(format!("{addr} is not an address and port to send to"));
        }
        return Ok(addr);
    }
    match text.rsplit_once(':') {
        Some((host, port))
            if port.parse::<u16>().is_ok()
                && !host.is_empty()
                && host.parse::<IpAddr>().is_err()
                && !host.starts_with('[') =>
        {
            Err(format!(
                "{text:?} names a host; bgp4mesh resolves no names: give its address as IP:port"
            ))
        }
        _ => Err(format!("{text:?} is not IP:port")),
    }
}

/// `off` or 0 to 65535 (PersistentKeepalive).
fn parse_keepalive(text: &str) -> Result<Option<u16>, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let n: u16 = text
        .parse()
        .map_err(|_| format!("{text:?} is not off or 0 to 65535 seconds"))?;
    Ok((n > 0).then_some(n))
}

/// `off`, decimal or 0x hex (FwMark).
fn parse_fwmark(text: &str) -> Result<u32, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(0);
    }
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("{text:?} is not off or a 32-bit number"))
}

fn parse_key(key: &str, value: &str) -> Result<Key, String> {
    // The value is a secret for PrivateKey and PresharedKey: never echoed.
    Key::from_base64(value).map_err(|e| format!("{}: {e}", spelled(key)))
}

/// Reads a wg-quick file's text. The error is `line N: ...`.
pub fn parse(text: &str) -> Result<WgQuickFile, String> {
    let mut file = WgQuickFile::default();
    let mut section = Section::None;
    let mut interface_seen = false;
    let mut interface_keys: Vec<String> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let at = |message: String| format!("line {n}: {message}");
        let content = raw.split('#').next().unwrap_or_default();
        let line: String = content.chars().filter(|c| !c.is_whitespace()).collect();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            let name = line
                .strip_prefix('[')
                .and_then(|l| l.strip_suffix(']'))
                .ok_or_else(|| at(format!("{line:?} is not a section header")))?;
            finish_peer(&mut section, &mut file)?;
            section = if name.eq_ignore_ascii_case("interface") {
                if interface_seen {
                    return Err(at("a second [Interface]; a file has one".into()));
                }
                interface_seen = true;
                Section::Interface
            } else if name.eq_ignore_ascii_case("peer") {
                Section::Peer(PeerDraft {
                    line: n,
                    public_key: None,
                    preshared_key: None,
                    allowed_ips: Vec::new(),
                    endpoint: None,
                    persistent_keepalive: None,
                    seen: Vec::new(),
                })
            } else {
                return Err(at(format!(
                    "[{name}] is not a section of a wg-quick file ([Interface], [Peer])"
                )));
            };
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            // A line without '=' may be a pasted key: none of it is shown.
            return Err(at("not a section header or Key = value".into()));
        };
        let key = key.to_ascii_lowercase();
        if key.is_empty() {
            return Err(at("a value without a key".into()));
        }
        if let Some(instead) = wg_quick_own(&key) {
            if key == "table" && value.eq_ignore_ascii_case("auto") {
                continue;
            }
            return Err(at(format!(
                "{} is wg-quick's own; {instead}",
                spelled(&key)
            )));
        }
        if value.is_empty() {
            return Err(at(format!("{} has no value", spelled(&key))));
        }
        let repeatable = key == "allowedips" || key == "address";
        match &mut section {
            Section::None => {
                return Err(at(format!(
                    "{} before any [Interface] or [Peer]",
                    spelled(&key)
                )));
            }
            Section::Interface => {
                if !repeatable && interface_keys.contains(&key) {
                    return Err(at(format!(
                        "{} is given twice in [Interface]",
                        spelled(&key)
                    )));
                }
                interface_keys.push(key.clone());
                match key.as_str() {
                    "privatekey" => file.private_key = Some(parse_key(&key, value).map_err(at)?),
                    "listenport" => {
                        file.listen_port = Some(value.parse().map_err(|_| {
                            at(format!("ListenPort: {value:?} is not a port (0 to 65535)"))
                        })?)
                    }
                    "fwmark" => {
                        file.fwmark =
                            Some(parse_fwmark(value).map_err(|e| at(format!("FwMark: {e}")))?)
                    }
                    "mtu" => {
                        file.mtu = Some(
                            value
                                .parse()
                                .map_err(|_| at(format!("MTU: {value:?} is not a number")))?,
                        )
                    }
                    "address" => {
                        for part in value.split(',').filter(|p| !p.is_empty()) {
                            file.address
                                .push(parse_net(part).map_err(|e| at(format!("Address: {e}")))?);
                        }
                    }
                    other => {
                        return Err(at(format!(
                            "{other:?} is not a key of [Interface] (PrivateKey, ListenPort, FwMark, Address, MTU)"
                        )));
                    }
                }
            }
            Section::Peer(peer) => {
                if !repeatable && peer.seen.contains(&key) {
                    return Err(at(format!(
                        "{} is given twice in this [Peer]",
                        spelled(&key)
                    )));
                }
                peer.seen.push(key.clone());
                match key.as_str() {
                    "publickey" => peer.public_key = Some(parse_key(&key, value).map_err(at)?),
                    "presharedkey" => {
                        peer.preshared_key = Some(parse_key(&key, value).map_err(at)?)
                    }
                    "allowedips" => {
                        for part in value.split(',').filter(|p| !p.is_empty()) {
                            peer.allowed_ips
                                .push(parse_net(part).map_err(|e| at(format!("AllowedIPs: {e}")))?);
                        }
                    }
                    "endpoint" => {
                        peer.endpoint =
                            Some(parse_endpoint(value).map_err(|e| at(format!("Endpoint: {e}")))?)
                    }
                    "persistentkeepalive" => {
                        peer.persistent_keepalive = parse_keepalive(value)
                            .map_err(|e| at(format!("PersistentKeepalive: {e}")))?
                    }
                    other => {
                        return Err(at(format!(
                            "{other:?} is not a key of [Peer] (PublicKey, PresharedKey, AllowedIPs, Endpoint, PersistentKeepalive)"
                        )));
                    }
                }
            }
        }
    }
    finish_peer(&mut section, &mut file)?;
    if !interface_seen {
        return Err("no [Interface] section".into());
    }
    Ok(file)
}

fn finish_peer(section: &mut Section, file: &mut WgQuickFile) -> Result<(), String> {
    if let Section::Peer(draft) = std::mem::replace(section, Section::None) {
        let public_key = draft
            .public_key
            .ok_or_else(|| format!("line {}: this [Peer] has no PublicKey", draft.line))?;
        if let Some(other) = file.peers.iter().find(|p| p.public_key == public_key) {
            return Err(format!(
                "line {}: this [Peer]'s PublicKey is also the one of line {}",
                draft.line, other.line
            ));
        }
        file.peers.push(WgQuickPeer {
            line: draft.line,
            public_key,
            preshared_key: draft.preshared_key,
            allowed_ips: draft.allowed_ips,
            endpoint: draft.endpoint,
            persistent_keepalive: draft.persistent_keepalive,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIVATE: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PEER_A: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const PEER_B: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";
    const PSK: &str = "FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE=";

    fn good() -> String {
        format!(
            "# seed 001's server\n[Interface]\nPrivateKey = {PRIVATE}\nAddress = 192.168.20.1/24\nListenPort = 51820\nMTU = 1420\nTable = auto\n\n[Peer] # phone\nPublicKey = {PEER_A}\nPresharedKey = {PSK}\nAllowedIPs = 192.168.20.2/32\n\n[peer]\npublickey={PEER_B}\nAllowedIPs = 192.168.20.3, fd20::3/128\nAllowedIPs = 10.9.0.0/24\nEndpoint = [2001:db8::7]:51820\nPersistentKeepalive = 25\n"
        )
    }

    #[test]
    fn a_wg_quick_file_is_read_as_wg_reads_it() {
        let f = parse(&good()).expect("good");
        assert_eq!(
            f.private_key.map(|k| k.to_base64()).as_deref(),
            Some(PRIVATE)
        );
        assert_eq!(f.listen_port, Some(51820));
        assert_eq!(f.mtu, Some(1420));
        assert_eq!(
            f.address,
            vec!["192.168.20.1/24".parse::<IpNet>().expect("net")]
        );
        assert_eq!(f.peers.len(), 2);
        let (a, b) = (&f.peers[0], &f.peers[1]);
        assert_eq!(a.line, 9);
        assert_eq!(a.public_key.to_base64(), PEER_A);
        assert_eq!(a.preshared_key.map(|k| k.to_base64()).as_deref(), Some(PSK));
        assert_eq!(a.endpoint, None);
        assert_eq!(b.public_key.to_base64(), PEER_B);
        let ips: Vec<String> = b.allowed_ips.iter().map(|n| n.to_string()).collect();
        assert_eq!(ips, ["192.168.20.3/32", "fd20::3/128", "10.9.0.0/24"]);
        assert_eq!(
            b.endpoint.map(|e| e.to_string()).as_deref(),
            Some("[2001:db8::7]:51820")
        );
        assert_eq!(b.persistent_keepalive, Some(25));
        let f = parse("[Interface]\nFwMark = 0x10\n").expect("fwmark");
        assert_eq!(f.fwmark, Some(16));
    }

    #[test]
    fn wg_quick_s_own_keys_are_refused_each_with_what_to_do() {
        for (line, key, instead) in [
            ("DNS = 1.1.1.1", "DNS", "resolver"),
            ("Table = off", "Table", "[[bgp.static]]"),
            ("Table = 1234", "Table", "BGP"),
            ("PreUp = true", "PreUp", "runs no commands"),
            (
                "PostUp = iptables -A FORWARD -i %i -j ACCEPT",
                "PostUp",
                "runs no commands",
            ),
            ("PreDown = true", "PreDown", "runs no commands"),
            ("postdown = true", "PostDown", "runs no commands"),
            ("SaveConfig = true", "SaveConfig", "never writes"),
        ] {
            let text = format!("[Interface]\nPrivateKey = {PRIVATE}\n{line}\n");
            let e = parse(&text).expect_err(line);
            assert!(
                e.starts_with(&format!("line 3: {key} is wg-quick's own; ")) && e.contains(instead),
                "{e}"
            );
        }
    }

    #[test]
    fn malformed_lines_are_refused_with_their_line() {
        for (text, expected) in [
            (
                "ListenPort = 1\n".to_string(),
                "line 1: ListenPort before any [Interface]",
            ),
            (
                "[Interface]\n[Interface]\n".into(),
                "line 2: a second [Interface]",
            ),
            (
                "[Interface\n".into(),
                "line 1: \"[Interface\" is not a section header",
            ),
            ("[Wat]\n".into(), "line 1: [Wat] is not a section"),
            (
                "[Interface]\nListenPort\n".into(),
                "line 2: not a section header or Key = value",
            ),
            (
                "[Interface]\nListenPort = 99999\n".into(),
                "line 2: ListenPort: \"99999\" is not a port",
            ),
            (
                "[Interface]\nListenPort =\n".into(),
                "line 2: ListenPort has no value",
            ),
            (
                "[Interface]\nMTU = 1420\nMTU = 1280\n".into(),
                "line 3: MTU is given twice",
            ),
            (
                "[Interface]\nAddress = 10.0.0.1/33\n".into(),
                "line 2: Address: \"10.0.0.1/33\" is not an address",
            ),
            (
                "[Interface]\nColour = blue\n".into(),
                "line 2: \"colour\" is not a key of [Interface]",
            ),
            (
                "[Interface]\nPrivateKey = c2VjcmV0\n".into(),
                "line 2: PrivateKey: a key is 32 bytes, this is 6",
            ),
            (
                format!(
                    "[Interface]\n[Peer]\nPublicKey = {PEER_A}\nEndpoint = vpn.example.com:51820\n"
                ),
                "line 4: Endpoint: \"vpn.example.com:51820\" names a host; bgp4mesh resolves no names",
            ),
            (
                format!("[Interface]\n[Peer]\nPublicKey = {PEER_A}\nEndpoint = 192.0.2.1\n"),
                "line 4: Endpoint: \"192.0.2.1\" is not IP:port",
            ),
            (
                format!("[Interface]\n[Peer]\nPublicKey = {PEER_A}\nPersistentKeepalive = often\n"),
                "line 4: PersistentKeepalive: \"often\"",
            ),
            (
                format!(
                    "[Interface]\n[Peer]\nPublicKey = {PEER_A}\nAllowedIPs = 10.0.0.0/8, nope\n"
                ),
                "line 4: AllowedIPs: \"nope\"",
            ),
            (
                "[Interface]\n[Peer]\nAllowedIPs = 10.0.0.2/32\n".into(),
                "line 2: this [Peer] has no PublicKey",
            ),
            (
                format!(
                    "[Interface]\n[Peer]\nPublicKey = {PEER_A}\n[Peer]\nPublicKey = {PEER_A}\n"
                ),
                "line 4: this [Peer]'s PublicKey is also the one of line 2",
            ),
            (
                format!("[Peer]\nPublicKey = {PEER_A}\n"),
                "no [Interface] section",
            ),
        ] {
            let e = parse(&text).expect_err(&text);
            assert!(
                e.starts_with(expected) || e == expected,
                "{expected:?} is not the start of {e:?}"
            );
        }
    }

    #[test]
    fn errors_never_hold_a_key() {
        let secret = "c2VjcmV0-secret-secret-secret-secret-secret";
        for text in [
            format!("[Interface]\nPrivateKey = {secret}\n"),
            format!("[Interface]\n[Peer]\nPublicKey = {PEER_A}\nPresharedKey = {secret}x\n"),
            format!("[Interface]\n{secret}\n"),
        ] {
            let e = parse(&text).expect_err("bad");
            assert!(!e.contains(secret), "{e}");
        }
        let e = parse(&format!(
            "[Interface]\nPrivateKey = {PRIVATE}\nPostUp = x\n"
        ))
        .expect_err("postup");
        assert!(!e.contains(PRIVATE), "{e}");
    }
}
