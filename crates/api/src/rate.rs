//! The flood limits of the UDP services that answer before they know who
//! asks (the controller's endpoint discovery, a relay's binds and echoes):
//! a token bucket per source (an IPv4 address, an IPv6 /64: one host or
//! site) and one for all sources together.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// Sources tracked at once; a flood of new sources beyond it is refused
/// until old ones have rested (and are forgotten).
pub const MAX_SOURCES: usize = 65_536;

/// A token bucket: `burst` at once, `rate` a second on average.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
    }

    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Whose rate a source counts against: its IPv4 address, its IPv6 /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Per-source and global token buckets.
#[derive(Debug)]
pub struct SourceLimiter {
    rate: f64,
    burst: f64,
    global_rate: f64,
    global_burst: f64,
    global: Bucket,
    sources: HashMap<IpAddr, Bucket>,
    last_prune: Option<Instant>,
}

impl SourceLimiter {
    /// `rate` a second and `burst` at once per source; `global_rate` and
    /// `global_burst` for all together.
    pub fn new(rate: f64, burst: f64, global_rate: f64, global_burst: f64) -> SourceLimiter {
        SourceLimiter {
            rate,
            burst,
            global_rate,
            global_burst,
            global: Bucket::full(global_burst, Instant::now()),
            sources: HashMap::new(),
            last_prune: None,
        }
    }

    /// Whether one more message from `ip` is within its source's rate and
    /// the global one (each message takes a token from both).
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let key = source_key(ip);
        if !self.sources.contains_key(&key) && self.sources.len() >= MAX_SOURCES {
            self.prune(now);
            if self.sources.len() >= MAX_SOURCES {
                return false;
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        let source = self
            .sources
            .entry(key)
            .or_insert_with(|| Bucket::full(burst, now));
        source.take(rate, burst, now) && self.global.take(self.global_rate, self.global_burst, now)
    }

    /// Forgets the sources whose bucket is full again (they start afresh),
    /// at most once a second: a flood of new sources does not make every
    /// message scan the table.
    pub fn prune(&mut self, now: Instant) {
        if self
            .last_prune
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.last_prune = Some(now);
        let (rate, burst) = (self.rate, self.burst);
        self.sources.retain(|_, b| {
            b.refill(rate, burst, now);
            b.tokens < burst
        });
    }

    /// How many sources are tracked now.
    pub fn sources(&self) -> usize {
        self.sources.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_burst_then_its_rate_and_an_ipv6_64_is_one_source() {
        let now = Instant::now();
        let mut limiter = SourceLimiter::new(10.0, 4.0, 1000.0, 1000.0);
        let one: IpAddr = "2001:db8::1".parse().expect("address");
        let same_64: IpAddr = "2001:db8::ffff".parse().expect("address");
        let allowed = (0..10)
            .filter(|i| limiter.allow(if i % 2 == 0 { one } else { same_64 }, now))
            .count();
        assert_eq!(allowed, 4, "one /64, one burst");
        let other: IpAddr = "192.0.2.1".parse().expect("address");
        assert!(limiter.allow(other, now), "another source is not held back");
        let later = now + Duration::from_millis(100);
        assert!(
            limiter.allow(one, later),
            "a token back after 100 ms at 10/s"
        );
        assert!(!limiter.allow(one, later));
    }

    #[test]
    fn the_global_bucket_holds_all_sources_back_and_rested_sources_are_forgotten() {
        let now = Instant::now();
        let mut limiter = SourceLimiter::new(10.0, 10.0, 3.0, 3.0);
        let allowed = (1..=10u8)
            .filter(|i| limiter.allow(IpAddr::from([192, 0, 2, *i]), now))
            .count();
        assert_eq!(allowed, 3);
        assert_eq!(limiter.sources(), 10);
        limiter.prune(now + Duration::from_secs(5));
        assert_eq!(limiter.sources(), 0, "all rested");
        assert_eq!(
            source_key("::ffff:192.0.2.7".parse().expect("mapped")),
            "192.0.2.7".parse::<IpAddr>().expect("v4")
        );
    }
}
