//! Endpoint discovery on UDP (the wire format is `bgp4mesh_api::discovery`):
//! a node asks, from its WireGuard socket, which address and port its
//! datagrams come from. The service answers on two ports, the configured
//! one and the next: a node asks both and compares the mapped ports to
//! tell an endpoint-independent NAT from an endpoint-dependent one.
//!
//! Only well-formed requests are answered, from the socket they came in
//! on, to their source; an answer is never larger than its request. The
//! work is bounded by a token bucket per source (an IPv4 address or an
//! IPv6 /64) and one for all sources; the rest is dropped and counted
//! (`DiscoveryStats`, in /metrics). Nothing is logged per datagram above
//! debug: drops are summed up in one warning a minute at most.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bgp4mesh_api::discovery::{MESSAGE_LEN, answer, parse_request};
use serde::Deserialize;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use bgp4mesh_api::rate::SourceLimiter;

/// `[discovery]` in server.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// false: no UDP service; agents are told of none.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The address and first port it binds (the next port too). Default:
    /// the address and port of `listen`, on UDP.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Requests a second from one IPv4 address or IPv6 /64, on average.
    #[serde(default = "default_rate")]
    pub rate: u32,
    /// ... and at once.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Requests a second from all sources together.
    #[serde(default = "default_global_rate")]
    pub global_rate: u32,
}

fn yes() -> bool {
    true
}

fn default_rate() -> u32 {
    20
}

fn default_burst() -> u32 {
    40
}

fn default_global_rate() -> u32 {
    5000
}

impl Default for DiscoveryConfig {
    fn default() -> DiscoveryConfig {
        DiscoveryConfig {
            enabled: true,
            listen: None,
            rate: default_rate(),
            burst: default_burst(),
            global_rate: default_global_rate(),
        }
    }
}

/// The most any rate or burst may be.
const MOST: u32 = 1_000_000;

impl DiscoveryConfig {
    /// Refuses values that would disable a limit, or a port with no next
    /// one; names the field. `api` is the API's `listen`.
    pub fn check(&self, api: SocketAddr) -> Result<(), String> {
        for (name, value) in [
            ("rate", self.rate),
            ("burst", self.burst),
            ("global_rate", self.global_rate),
        ] {
            if value == 0 || value > MOST {
                return Err(format!("discovery.{name}: 1 to {MOST}"));
            }
        }
        if !self.enabled {
            return Ok(());
        }
        let (field, at) = match self.listen {
            Some(at) => ("discovery.listen", at),
            None => ("listen", api),
        };
        if at.port() == u16::MAX {
            return Err(format!(
                "{field}: discovery takes the port and the next one, and {} has none \
                 (set discovery.listen, or discovery.enabled = false)",
                u16::MAX
            ));
        }
        if at.port() == 0 && !at.ip().is_loopback() {
            return Err(format!(
                "{field}: port 0 picks a random port; give the port nodes will use"
            ));
        }
        Ok(())
    }

    /// Where the service binds its first port: `listen`, else the API's
    /// address and port (a random API port: a random pair).
    pub fn address(&self, api: SocketAddr) -> SocketAddr {
        self.listen.unwrap_or(api)
    }
}

/// What the service did, for /metrics.
#[derive(Debug, Default)]
pub struct DiscoveryStats {
    pub answered: AtomicU64,
    pub malformed: AtomicU64,
    pub rate_limited: AtomicU64,
}

/// The running service: its two sockets' tasks.
pub struct Discovery {
    /// The first port's address as bound; the second is the next port.
    pub addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Discovery {
    pub fn stop(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One UDP socket at `at`, dual-stack when `at` is the IPv6 unspecified
/// address.
fn bind_one(at: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(at), Type::DGRAM, Some(Protocol::UDP))?;
    if let IpAddr::V6(ip) = at.ip()
        && ip == Ipv6Addr::UNSPECIFIED
    {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&at.into())?;
    Ok(socket.into())
}

/// Binds `at` and the next port. With port 0 (tests), a free pair.
fn bind_pair(at: SocketAddr) -> Result<[std::net::UdpSocket; 2]> {
    let next = |a: SocketAddr| -> Result<SocketAddr> {
        let port = a
            .port()
            .checked_add(1)
            .with_context(|| format!("discovery on UDP {a}: port {} has no next port", a.port()))?;
        Ok(SocketAddr::new(a.ip(), port))
    };
    if at.port() != 0 {
        let first = bind_one(at).with_context(|| format!("discovery: binding UDP {at}"))?;
        let second_at = next(at)?;
        let second =
            bind_one(second_at).with_context(|| format!("discovery: binding UDP {second_at}"))?;
        return Ok([first, second]);
    }
    for _ in 0..64 {
        let first = bind_one(at).with_context(|| format!("discovery: binding UDP {at}"))?;
        let Ok(second_at) = next(first.local_addr()?) else {
            continue;
        };
        if let Ok(second) = bind_one(second_at) {
            return Ok([first, second]);
        }
    }
    bail!("discovery: no free pair of UDP ports on {}", at.ip())
}

/// Binds the service at `at` (and the next port) and starts its tasks.
/// A failure to bind names the address.
pub fn start(
    at: SocketAddr,
    config: &DiscoveryConfig,
    stats: Arc<DiscoveryStats>,
) -> Result<Discovery> {
    let sockets = bind_pair(at)?;
    let addr = sockets[0].local_addr()?;
    let limiter = Arc::new(Mutex::new(Limiter::new(config)));
    let mut tasks = Vec::new();
    for socket in sockets {
        let socket = UdpSocket::from_std(socket).context("discovery: the UDP socket")?;
        tasks.push(tokio::spawn(serve(
            socket,
            Arc::clone(&limiter),
            Arc::clone(&stats),
        )));
    }
    tracing::info!(
        %addr,
        second = addr.port().saturating_add(1),
        rate = config.rate,
        burst = config.burst,
        global_rate = config.global_rate,
        "endpoint discovery listening on UDP"
    );
    Ok(Discovery { addr, tasks })
}

async fn serve(socket: UdpSocket, limiter: Arc<Mutex<Limiter>>, stats: Arc<DiscoveryStats>) {
    // One byte more than a message: a longer datagram reads as malformed.
    let mut buf = [0u8; MESSAGE_LEN + 1];
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                // ICMP errors of earlier answers and the like; the socket
                // itself stays usable. A pause keeps a persistent error
                // from spinning.
                tracing::debug!("discovery: receiving: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(id) = buf.get(..len).and_then(parse_request) else {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%from, len, "discovery: not a request; dropped");
            continue;
        };
        let allowed = limiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .allow(from.ip(), Instant::now());
        if !allowed {
            stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%from, "discovery: over the rate limit; dropped");
            continue;
        }
        match socket.send_to(&answer(&id, from), from).await {
            Ok(_) => {
                stats.answered.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%from, "discovery: answered");
            }
            Err(e) => tracing::debug!(%from, "discovery: answering: {e}"),
        }
    }
}

/// Drops are summed up in a warning at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The rate limits of both sockets together.
struct Limiter {
    inner: SourceLimiter,
    dropped: u64,
    last_warning: Option<Instant>,
}

impl Limiter {
    fn new(config: &DiscoveryConfig) -> Limiter {
        let global_rate = f64::from(config.global_rate);
        Limiter {
            inner: SourceLimiter::new(
                f64::from(config.rate),
                f64::from(config.burst),
                global_rate,
                global_rate,
            ),
            dropped: 0,
            last_warning: None,
        }
    }

    /// Whether a request from `ip` may be answered now.
    fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let allowed = self.inner.allow(ip, now);
        if !allowed {
            self.dropped += 1;
            if self
                .last_warning
                .is_none_or(|t| now.saturating_duration_since(t) >= WARN_EVERY)
            {
                tracing::warn!(
                    dropped = self.dropped,
                    sources = self.inner.sources(),
                    "endpoint discovery: requests over the rate limits dropped \
                     (bgp4mesh_discovery_rate_limited_total counts them)"
                );
                self.dropped = 0;
                self.last_warning = Some(now);
            }
        }
        allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rate: u32, burst: u32, global_rate: u32) -> DiscoveryConfig {
        DiscoveryConfig {
            rate,
            burst,
            global_rate,
            ..DiscoveryConfig::default()
        }
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let mut l = Limiter::new(&config(20, 40, 5000));
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        assert_eq!((0..100).filter(|_| l.allow(ip, t0)).count(), 40);
        // Half a second later: ten more.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..100).filter(|_| l.allow(ip, t1)).count(), 10);
        // Another source is not held back by it.
        assert!(l.allow("192.0.2.2".parse().expect("ip"), t1));
    }

    #[test]
    fn an_ipv6_64_is_one_source_and_the_global_cap_holds() {
        let mut l = Limiter::new(&config(20, 4, 5000));
        let t0 = Instant::now();
        let allowed = (0..10u16)
            .filter(|i| l.allow(format!("2001:db8::{i}").parse().expect("ip"), t0))
            .count();
        assert_eq!(allowed, 4, "one /64");
        let mut l = Limiter::new(&config(20, 40, 10));
        let allowed = (0..50u8)
            .filter(|i| l.allow(IpAddr::from([198, 51, 100, *i]), t0))
            .count();
        assert_eq!(allowed, 10, "the global cap");
    }

    #[test]
    fn full_sources_are_forgotten() {
        let mut l = Limiter::new(&config(20, 40, 1_000_000));
        let t0 = Instant::now();
        l.allow("192.0.2.1".parse().expect("ip"), t0);
        l.inner.prune(t0 + Duration::from_secs(3));
        assert_eq!(l.inner.sources(), 0);
    }

    /// The service as the server starts it, on a free pair of loopback
    /// ports, and a client socket.
    async fn service(config: &DiscoveryConfig) -> (Discovery, Arc<DiscoveryStats>, UdpSocket) {
        let stats = Arc::new(DiscoveryStats::default());
        let at: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let d = start(at, config, Arc::clone(&stats)).expect("bound");
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("client");
        (d, stats, client)
    }

    async fn answer_to(client: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
        let mut buf = [0u8; 128];
        let got = tokio::time::timeout(Duration::from_millis(300), client.recv_from(&mut buf));
        match got.await {
            Ok(Ok((len, from))) => Some((buf[..len].to_vec(), from)),
            _ => None,
        }
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn both_ports_answer_with_the_observed_address_from_themselves() {
        use bgp4mesh_api::discovery::{parse_answer, request};
        let (d, stats, client) = service(&DiscoveryConfig::default()).await;
        let me = client.local_addr().expect("addr");
        let second = SocketAddr::new(d.addr.ip(), d.addr.port() + 1);
        for (i, to) in [d.addr, second].into_iter().enumerate() {
            let id = [i as u8 + 1; 16];
            client.send_to(&request(&id), to).await.expect("send");
            let (bytes, from) = answer_to(&client).await.expect("an answer");
            assert_eq!(from, to, "from the socket the request came in on");
            assert_eq!(parse_answer(&bytes), Some((id, me)));
        }
        assert_eq!(stats.answered.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn on_the_ipv6_wildcard_ipv4_senders_are_answered_as_ipv4() {
        use bgp4mesh_api::discovery::{parse_answer, request};
        let stats = Arc::new(DiscoveryStats::default());
        let at: SocketAddr = "[::]:0".parse().expect("addr");
        let Ok(d) = start(at, &DiscoveryConfig::default(), stats) else {
            eprintln!("SKIPPED: no IPv6 here");
            return;
        };
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("client");
        let id = [4u8; 16];
        let to = SocketAddr::from(([127, 0, 0, 1], d.addr.port()));
        client.send_to(&request(&id), to).await.expect("send");
        let (bytes, _) = answer_to(&client).await.expect("dual-stack");
        let me = client.local_addr().expect("addr");
        assert_eq!(parse_answer(&bytes), Some((id, me)));
    }

    #[tokio::test]
    async fn malformed_datagrams_get_no_answer_and_are_counted() {
        use bgp4mesh_api::discovery::{answer as answer_for, request};
        let (d, stats, client) = service(&DiscoveryConfig::default()).await;
        let id = [9u8; 16];
        let mut long = request(&id).to_vec();
        long.push(0);
        let mut bad_version = request(&id);
        bad_version[4] = 2;
        let wireguard = [1u8, 0, 0, 0, 7, 7, 7, 7];
        let me = client.local_addr().expect("addr");
        let bad: [&[u8]; 5] = [
            &request(&id)[..47],
            &long,
            &bad_version,
            &wireguard,
            &answer_for(&id, me),
        ];
        for datagram in bad {
            client.send_to(datagram, d.addr).await.expect("send");
        }
        until("5 malformed", || {
            stats.malformed.load(Ordering::Relaxed) == 5
        })
        .await;
        assert!(answer_to(&client).await.is_none(), "no answer");
        assert_eq!(stats.answered.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn requests_over_the_rate_are_dropped_and_counted() {
        use bgp4mesh_api::discovery::request;
        let (d, stats, client) = service(&config(1, 3, 5000)).await;
        let second = SocketAddr::new(d.addr.ip(), d.addr.port() + 1);
        // One source's limit holds across both ports.
        for i in 0..8u8 {
            let to = if i % 2 == 0 { d.addr } else { second };
            client.send_to(&request(&[i; 16]), to).await.expect("send");
        }
        until("8 handled", || {
            stats.answered.load(Ordering::Relaxed) + stats.rate_limited.load(Ordering::Relaxed) == 8
        })
        .await;
        let answered = stats.answered.load(Ordering::Relaxed);
        assert!(
            (3..=4).contains(&answered),
            "the burst (and maybe one refill): {answered}"
        );
        let mut answers = 0;
        while answer_to(&client).await.is_some() {
            answers += 1;
        }
        assert_eq!(answers, answered);
        assert_eq!(stats.rate_limited.load(Ordering::Relaxed), 8 - answered);
        d.stop();
    }

    #[tokio::test]
    async fn a_taken_port_is_an_error_naming_the_address() {
        let taken = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let at = taken.local_addr().expect("addr");
        let stats = Arc::new(DiscoveryStats::default());
        let err = start(at, &DiscoveryConfig::default(), stats)
            .err()
            .expect("taken");
        assert!(format!("{err:#}").contains(&at.to_string()), "{err:#}");
        // The next port taken is named, too.
        let below = SocketAddr::new(at.ip(), at.port() - 1);
        let stats = Arc::new(DiscoveryStats::default());
        if let Err(err) = start(below, &DiscoveryConfig::default(), stats) {
            assert!(format!("{err:#}").contains("127.0.0.1:"), "{err:#}");
        } else {
            panic!("{below} and {at}: the second is taken");
        }
    }

    #[test]
    fn bad_settings_name_the_field() {
        let api: SocketAddr = "0.0.0.0:8443".parse().expect("addr");
        assert!(DiscoveryConfig::default().check(api).is_ok());
        let err = config(0, 40, 5000).check(api).expect_err("rate 0");
        assert!(err.contains("discovery.rate"), "{err}");
        let err = config(20, 40, 0).check(api).expect_err("global 0");
        assert!(err.contains("discovery.global_rate"), "{err}");
        let top: SocketAddr = "0.0.0.0:65535".parse().expect("addr");
        let err = DiscoveryConfig::default().check(top).expect_err("no next");
        assert!(err.starts_with("listen:"), "{err}");
        let off = DiscoveryConfig {
            enabled: false,
            ..DiscoveryConfig::default()
        };
        assert!(off.check(top).is_ok(), "off: the port does not matter");
        let at = DiscoveryConfig {
            listen: Some(top),
            ..DiscoveryConfig::default()
        };
        let err = at.check(api).expect_err("no next");
        assert!(err.starts_with("discovery.listen:"), "{err}");
    }
}
