//! Sans-IO BFD (RFC 5880 asynchronous mode; RFC 5881 single hop is the
//! driver's part: UDP 3784, TTL 255).
//!
//! [`Bfd`] holds one [`Session`] per peer address. The driver passes
//! received datagrams and the time in, sends what [`Bfd::poll_transmit`]
//! returns, sleeps until [`Bfd::poll_timeout`], and reads state changes from
//! [`Bfd::poll_event`]. Jitter comes from a small deterministic generator,
//! so tests on virtual time are repeatable.

#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Session states (RFC 5880 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    AdminDown,
    Down,
    Init,
    Up,
}

impl State {
    fn code(self) -> u8 {
        match self {
            State::AdminDown => 0,
            State::Down => 1,
            State::Init => 2,
            State::Up => 3,
        }
    }
    fn from_code(c: u8) -> State {
        match c & 3 {
            0 => State::AdminDown,
            1 => State::Down,
            2 => State::Init,
            _ => State::Up,
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Diagnostic codes (RFC 5880 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Diag {
    None,
    DetectionTimeExpired,
    NeighborSignaledDown,
    AdminDown,
    Other(u8),
}

impl Diag {
    fn code(self) -> u8 {
        match self {
            Diag::None => 0,
            Diag::DetectionTimeExpired => 1,
            Diag::NeighborSignaledDown => 3,
            Diag::AdminDown => 7,
            Diag::Other(c) => c,
        }
    }
    fn from_code(c: u8) -> Diag {
        match c {
            0 => Diag::None,
            1 => Diag::DetectionTimeExpired,
            3 => Diag::NeighborSignaledDown,
            7 => Diag::AdminDown,
            c => Diag::Other(c),
        }
    }
}

impl std::fmt::Display for Diag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Diag::None => "no diagnostic",
            Diag::DetectionTimeExpired => "control detection time expired",
            Diag::NeighborSignaledDown => "neighbor signaled session down",
            Diag::AdminDown => "administratively down",
            Diag::Other(1..=8) => "path or forwarding failure",
            Diag::Other(_) => "unknown diagnostic",
        })
    }
}

/// A BFD Control packet without authentication (24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlPacket {
    pub diag: Diag,
    pub state: State,
    pub poll: bool,
    pub final_: bool,
    pub demand: bool,
    pub detect_mult: u8,
    pub my_discriminator: u32,
    pub your_discriminator: u32,
    /// Microseconds.
    pub desired_min_tx: u32,
    pub required_min_rx: u32,
    pub required_min_echo_rx: u32,
}

pub const PACKET_LEN: usize = 24;

impl ControlPacket {
    pub fn encode(&self) -> [u8; PACKET_LEN] {
        let mut b = [0u8; PACKET_LEN];
        b[0] = (1 << 5) | (self.diag.code() & 0x1f);
        b[1] = (self.state.code() << 6)
            | if self.poll { 0x20 } else { 0 }
            | if self.final_ { 0x10 } else { 0 }
            | if self.demand { 0x02 } else { 0 };
        b[2] = self.detect_mult;
        b[3] = PACKET_LEN as u8;
        b[4..8].copy_from_slice(&self.my_discriminator.to_be_bytes());
        b[8..12].copy_from_slice(&self.your_discriminator.to_be_bytes());
        b[12..16].copy_from_slice(&self.desired_min_tx.to_be_bytes());
        b[16..20].copy_from_slice(&self.required_min_rx.to_be_bytes());
        b[20..24].copy_from_slice(&self.required_min_echo_rx.to_be_bytes());
        b
    }

    /// Decodes and checks a packet as RFC 5880 §6.8.6 asks; the error says
    /// why it is discarded.
    pub fn decode(bytes: &[u8]) -> Result<ControlPacket, &'static str> {
        if bytes.len() < PACKET_LEN {
            return Err("shorter than 24 bytes");
        }
        let u32_at =
            |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        if bytes[0] >> 5 != 1 {
            return Err("not version 1");
        }
        let length = bytes[3] as usize;
        if length < PACKET_LEN || length > bytes.len() {
            return Err("bad length");
        }
        if bytes[1] & 0x04 != 0 {
            return Err("authentication is not configured");
        }
        if bytes[1] & 0x01 != 0 {
            return Err("multipoint bit set");
        }
        if bytes[2] == 0 {
            return Err("detect multiplier 0");
        }
        let packet = ControlPacket {
            diag: Diag::from_code(bytes[0] & 0x1f),
            state: State::from_code(bytes[1] >> 6),
            poll: bytes[1] & 0x20 != 0,
            final_: bytes[1] & 0x10 != 0,
            demand: bytes[1] & 0x02 != 0,
            detect_mult: bytes[2],
            my_discriminator: u32_at(4),
            your_discriminator: u32_at(8),
            desired_min_tx: u32_at(12),
            required_min_rx: u32_at(16),
            required_min_echo_rx: u32_at(20),
        };
        if packet.my_discriminator == 0 {
            return Err("my discriminator 0");
        }
        if packet.your_discriminator == 0 && matches!(packet.state, State::Init | State::Up) {
            return Err("your discriminator 0 in Init or Up");
        }
        Ok(packet)
    }
}

/// Timers of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    pub desired_min_tx: Duration,
    pub required_min_rx: Duration,
    pub detect_mult: u8,
}

impl Default for SessionConfig {
    /// 100 ms × 5, like the seeds' BIRD configs.
    fn default() -> Self {
        SessionConfig {
            desired_min_tx: Duration::from_millis(100),
            required_min_rx: Duration::from_millis(100),
            detect_mult: 5,
        }
    }
}

/// RFC 5880 §6.8.3: no faster than one packet a second until Up.
const SLOW_TX: Duration = Duration::from_secs(1);

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// One BFD session's state machine.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    state: State,
    remote_state: State,
    local_diag: Diag,
    local_disc: u32,
    remote_disc: u32,
    remote_min_rx: Duration,
    remote_desired_tx: Duration,
    remote_detect_mult: u8,
    /// Poll sequence in progress (parameters changed, e.g. on Up).
    polling: bool,
    /// A Final answer is owed to the peer's Poll.
    final_owed: bool,
    next_tx: Instant,
    detect_deadline: Option<Instant>,
    since: Instant,
    rng: u64,
}

impl Session {
    fn new(config: SessionConfig, local_disc: u32, now: Instant) -> Self {
        Session {
            config,
            state: State::Down,
            remote_state: State::Down,
            local_diag: Diag::None,
            local_disc,
            remote_disc: 0,
            remote_min_rx: Duration::from_micros(1),
            remote_desired_tx: Duration::ZERO,
            remote_detect_mult: 0,
            polling: false,
            final_owed: false,
            next_tx: now,
            detect_deadline: None,
            since: now,
            rng: u64::from(local_disc) | 1,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn diag(&self) -> Diag {
        self.local_diag
    }

    pub fn since(&self) -> Instant {
        self.since
    }

    pub fn local_discriminator(&self) -> u32 {
        self.local_disc
    }

    pub fn remote_discriminator(&self) -> u32 {
        self.remote_disc
    }

    /// The interval we send at now.
    pub fn tx_interval(&self) -> Duration {
        let desired = if self.state == State::Up {
            self.config.desired_min_tx
        } else {
            SLOW_TX.max(self.config.desired_min_tx)
        };
        desired.max(self.remote_min_rx)
    }

    /// How long without a packet before we declare the session down.
    pub fn detection_time(&self) -> Duration {
        let rx = if self.state == State::Up {
            self.config.required_min_rx
        } else {
            self.config.required_min_rx.max(SLOW_TX)
        };
        rx.max(self.remote_desired_tx) * u32::from(self.remote_detect_mult.max(1))
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: enough for jitter.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Next transmission: 75–100 % of the interval (75–90 % with a detect
    /// multiplier of 1), RFC 5880 §6.8.7.
    fn schedule_tx(&mut self, now: Instant) {
        let interval = self.tx_interval();
        let max = if self.config.detect_mult == 1 {
            90
        } else {
            100
        };
        let percent = 75 + (self.random() % (max - 75 + 1));
        self.next_tx = now + interval * percent as u32 / 100;
    }

    fn packet(&mut self) -> ControlPacket {
        let final_ = std::mem::take(&mut self.final_owed);
        let up = self.state == State::Up;
        ControlPacket {
            diag: self.local_diag,
            state: self.state,
            poll: self.polling && !final_,
            final_,
            demand: false,
            detect_mult: self.config.detect_mult,
            my_discriminator: self.local_disc,
            your_discriminator: self.remote_disc,
            desired_min_tx: micros(if up {
                self.config.desired_min_tx
            } else {
                SLOW_TX.max(self.config.desired_min_tx)
            }),
            required_min_rx: micros(self.config.required_min_rx),
            required_min_echo_rx: 0,
        }
    }

    fn set_state(
        &mut self,
        now: Instant,
        to: State,
        diag: Diag,
        events: &mut VecDeque<(State, State, Diag)>,
    ) {
        if self.state == to {
            return;
        }
        let from = self.state;
        self.state = to;
        self.local_diag = diag;
        self.since = now;
        match to {
            State::Up => {
                // Switch to the fast rate with a poll sequence.
                self.polling = true;
                self.detect_deadline = Some(now + self.detection_time());
            }
            State::Down | State::AdminDown => {
                self.remote_disc = if to == State::AdminDown {
                    self.remote_disc
                } else {
                    0
                };
                self.detect_deadline = None;
                self.polling = false;
            }
            State::Init => self.detect_deadline = Some(now + self.detection_time()),
        }
        events.push_back((from, to, diag));
        // State changes are told to the peer at once.
        self.next_tx = now;
    }

    fn receive(
        &mut self,
        now: Instant,
        p: &ControlPacket,
        events: &mut VecDeque<(State, State, Diag)>,
    ) {
        self.remote_disc = p.my_discriminator;
        self.remote_state = p.state;
        self.remote_min_rx =
            Duration::from_micros(u64::from(p.required_min_rx)).max(Duration::from_micros(1));
        self.remote_desired_tx = Duration::from_micros(u64::from(p.desired_min_tx));
        self.remote_detect_mult = p.detect_mult;
        if p.final_ {
            self.polling = false;
        }
        if self.state == State::AdminDown {
            return;
        }
        match (self.state, p.state) {
            (State::Init | State::Up, State::AdminDown) => {
                self.set_state(now, State::Down, Diag::NeighborSignaledDown, events)
            }
            (State::Down, State::Down) => self.set_state(now, State::Init, Diag::None, events),
            (State::Down, State::Init) => self.set_state(now, State::Up, Diag::None, events),
            (State::Init, State::Init | State::Up) => {
                self.set_state(now, State::Up, Diag::None, events)
            }
            (State::Up, State::Down) => {
                self.set_state(now, State::Down, Diag::NeighborSignaledDown, events)
            }
            _ => {}
        }
        if matches!(self.state, State::Init | State::Up) {
            self.detect_deadline = Some(now + self.detection_time());
        }
        if p.poll {
            self.final_owed = true;
            self.next_tx = now;
        }
    }

    fn timeout(&mut self, now: Instant, events: &mut VecDeque<(State, State, Diag)>) {
        if self.detect_deadline.is_some_and(|t| t <= now) {
            self.set_state(now, State::Down, Diag::DetectionTimeExpired, events);
        }
    }

    fn next_deadline(&self) -> Instant {
        match self.detect_deadline {
            Some(d) => d.min(self.next_tx),
            None => self.next_tx,
        }
    }
}

/// A state change of the session with `peer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub peer: IpAddr,
    pub from: State,
    pub to: State,
    pub diag: Diag,
}

/// Every BFD session of this speaker.
#[derive(Debug, Default)]
pub struct Bfd {
    sessions: HashMap<IpAddr, Session>,
    by_discriminator: HashMap<u32, IpAddr>,
    next_discriminator: u32,
    events: VecDeque<Event>,
}

impl Bfd {
    pub fn new() -> Self {
        Bfd {
            next_discriminator: 1,
            ..Default::default()
        }
    }

    /// Starts (or retimes) the session with `peer`.
    pub fn add(&mut self, now: Instant, peer: IpAddr, config: SessionConfig) {
        if let Some(s) = self.sessions.get_mut(&peer) {
            s.config = config;
            s.polling = s.state == State::Up;
            return;
        }
        let disc = self.next_discriminator;
        self.next_discriminator = self.next_discriminator.wrapping_add(1).max(1);
        self.by_discriminator.insert(disc, peer);
        self.sessions.insert(peer, Session::new(config, disc, now));
    }

    /// Stops the session with `peer`, telling it AdminDown once.
    pub fn remove(&mut self, peer: IpAddr) -> Option<[u8; PACKET_LEN]> {
        let mut s = self.sessions.remove(&peer)?;
        self.by_discriminator.remove(&s.local_disc);
        s.state = State::AdminDown;
        s.local_diag = Diag::AdminDown;
        Some(s.packet().encode())
    }

    pub fn session(&self, peer: IpAddr) -> Option<&Session> {
        self.sessions.get(&peer)
    }

    pub fn sessions(&self) -> impl Iterator<Item = (&IpAddr, &Session)> {
        self.sessions.iter()
    }

    /// A datagram from `from`. Returns why it was discarded, if it was.
    pub fn receive(
        &mut self,
        now: Instant,
        from: IpAddr,
        bytes: &[u8],
    ) -> Result<(), &'static str> {
        let packet = ControlPacket::decode(bytes)?;
        let peer = match packet.your_discriminator {
            0 => from,
            disc => *self
                .by_discriminator
                .get(&disc)
                .ok_or("unknown discriminator")?,
        };
        if peer != from {
            return Err("discriminator of another peer");
        }
        let session = self
            .sessions
            .get_mut(&peer)
            .ok_or("no session with this peer")?;
        let mut changes = VecDeque::new();
        session.receive(now, &packet, &mut changes);
        self.events
            .extend(changes.into_iter().map(|(from, to, diag)| Event {
                peer,
                from,
                to,
                diag,
            }));
        Ok(())
    }

    /// Fires due detection timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        for (peer, session) in &mut self.sessions {
            let mut changes = VecDeque::new();
            session.timeout(now, &mut changes);
            self.events
                .extend(changes.into_iter().map(|(from, to, diag)| Event {
                    peer: *peer,
                    from,
                    to,
                    diag,
                }));
        }
    }

    /// Packets due at `now`, with their destination.
    pub fn poll_transmit(&mut self, now: Instant) -> Vec<(IpAddr, [u8; PACKET_LEN])> {
        let mut out = Vec::new();
        for (peer, session) in &mut self.sessions {
            if session.state != State::AdminDown && session.next_tx <= now {
                out.push((*peer, session.packet().encode()));
                session.schedule_tx(now);
            }
        }
        out
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.sessions.values().map(Session::next_deadline).min()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn packets_round_trip_and_bad_ones_are_refused() {
        let p = ControlPacket {
            diag: Diag::DetectionTimeExpired,
            state: State::Up,
            poll: true,
            final_: false,
            demand: false,
            detect_mult: 5,
            my_discriminator: 7,
            your_discriminator: 9,
            desired_min_tx: 100_000,
            required_min_rx: 100_000,
            required_min_echo_rx: 0,
        };
        let bytes = p.encode();
        assert_eq!(bytes[0], 0x21, "version 1, diag 1");
        assert_eq!(bytes[1], 0xe0, "Up + Poll");
        assert_eq!(ControlPacket::decode(&bytes), Ok(p));
        let mut bad = bytes;
        bad[0] = 0x41;
        assert!(ControlPacket::decode(&bad).is_err(), "version 2");
        let mut bad = bytes;
        bad[2] = 0;
        assert!(ControlPacket::decode(&bad).is_err(), "detect mult 0");
        let mut bad = bytes;
        bad[8..12].copy_from_slice(&[0; 4]);
        assert!(ControlPacket::decode(&bad).is_err(), "your disc 0 while Up");
        assert!(ControlPacket::decode(&bytes[..20]).is_err());
    }

    /// Two speakers back to back on virtual time.
    struct Pair {
        a: Bfd,
        b: Bfd,
        now: Instant,
        cut: bool,
        events: Vec<Event>,
    }

    impl Pair {
        fn new() -> Pair {
            let now = Instant::now();
            let (mut a, mut b) = (Bfd::new(), Bfd::new());
            b.next_discriminator = 1000;
            a.add(now, ip("10.0.0.2"), SessionConfig::default());
            b.add(now, ip("10.0.0.1"), SessionConfig::default());
            Pair {
                a,
                b,
                now,
                cut: false,
                events: vec![],
            }
        }

        fn run(&mut self, for_: Duration) {
            let end = self.now + for_;
            loop {
                let next = [self.a.poll_timeout(), self.b.poll_timeout()]
                    .into_iter()
                    .flatten()
                    .min();
                let Some(t) = next.filter(|t| *t <= end) else {
                    break;
                };
                self.now = t.max(self.now);
                self.a.handle_timeout(self.now);
                self.b.handle_timeout(self.now);
                for (_, bytes) in self.a.poll_transmit(self.now) {
                    if !self.cut {
                        let _ = self.b.receive(self.now, ip("10.0.0.1"), &bytes);
                    }
                }
                for (_, bytes) in self.b.poll_transmit(self.now) {
                    if !self.cut {
                        let _ = self.a.receive(self.now, ip("10.0.0.2"), &bytes);
                    }
                }
                while let Some(e) = self.a.poll_event() {
                    self.events.push(e);
                }
                while self.b.poll_event().is_some() {}
            }
            self.now = end;
        }
    }

    #[test]
    fn sessions_come_up_switch_to_fast_timers_and_detect_a_silent_peer() {
        let mut p = Pair::new();
        p.run(Duration::from_secs(3));
        let s = p.a.session(ip("10.0.0.2")).expect("session");
        assert_eq!(s.state(), State::Up);
        assert_eq!(
            s.tx_interval(),
            Duration::from_millis(100),
            "fast rate once Up"
        );
        assert_eq!(s.detection_time(), Duration::from_millis(500));
        // The link dies: Down within the detection time (100 ms × 5).
        p.cut = true;
        let cut_at = p.now;
        p.events.clear();
        p.run(Duration::from_secs(1));
        let down = p
            .events
            .iter()
            .find(|e| e.to == State::Down)
            .expect("went down");
        assert_eq!(down.diag, Diag::DetectionTimeExpired);
        let s = p.a.session(ip("10.0.0.2")).expect("session");
        let took = s.since().duration_since(cut_at);
        assert!(took <= Duration::from_millis(600), "down after {took:?}");
        // Back: Up again.
        p.cut = false;
        p.run(Duration::from_secs(5));
        assert_eq!(
            p.a.session(ip("10.0.0.2")).map(|s| s.state()),
            Some(State::Up)
        );
    }

    #[test]
    fn admin_down_from_the_peer_brings_us_down_with_its_diagnostic() {
        let mut p = Pair::new();
        p.run(Duration::from_secs(3));
        let bye = p.b.remove(ip("10.0.0.1")).expect("packet");
        p.events.clear();
        p.a.receive(p.now, ip("10.0.0.2"), &bye).expect("valid");
        while let Some(e) = p.a.poll_event() {
            p.events.push(e);
        }
        assert_eq!(
            p.events.last().map(|e| (e.to, e.diag)),
            Some((State::Down, Diag::NeighborSignaledDown))
        );
    }

    #[test]
    fn packets_for_unknown_sessions_are_discarded() {
        let now = Instant::now();
        let mut bfd = Bfd::new();
        bfd.add(now, ip("10.0.0.2"), SessionConfig::default());
        let mut p = ControlPacket::decode(&Bfd::new_packet_for_tests()).expect("valid");
        p.your_discriminator = 4242;
        p.state = State::Up;
        assert_eq!(
            bfd.receive(now, ip("10.0.0.2"), &p.encode()),
            Err("unknown discriminator")
        );
        p.your_discriminator = 0;
        p.state = State::Down;
        assert_eq!(
            bfd.receive(now, ip("10.0.0.9"), &p.encode()),
            Err("no session with this peer")
        );
    }

    impl Bfd {
        fn new_packet_for_tests() -> [u8; PACKET_LEN] {
            let mut s = Session::new(SessionConfig::default(), 77, Instant::now());
            s.packet().encode()
        }
    }
}
