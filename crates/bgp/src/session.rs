//! One neighbour's BGP session: the RFC 4271 §8 state machine, with
//! connection collision (§6.8), hold/keepalive negotiation, idle-hold
//! backoff after errors, and RFC 6608 FSM error subcodes.
//!
//! Sans-IO: the driver reports TCP events and received bytes with the
//! current time, asks [`Session::poll_timeout`] when to call
//! [`Session::handle_timeout`], and carries out what
//! [`Session::poll_output`] returns.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::wire::{
    Capability, Codec, Decoded, DecodedUpdate, Family, Message, Notification, Open, RouteRefresh,
    cease, decode_message, error_code, next_frame, open_error,
};

/// Identifies one TCP connection; chosen by the driver, unique among the
/// connections it has open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// RFC 4271 session states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// What a session needs to know about its neighbour and itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    pub local_as: u32,
    pub remote_as: u32,
    pub router_id: Ipv4Addr,
    /// Proposed hold time: 0 (no keepalives) or at least 3 s.
    pub hold_time: u16,
    /// Wait for the neighbour to connect; never connect out.
    pub passive: bool,
    pub connect_retry: Duration,
    /// First wait before reconnecting after an error; doubles up to
    /// `idle_hold_max` while errors repeat.
    pub idle_hold: Duration,
    pub idle_hold_max: Duration,
    pub families: Vec<Family>,
    pub extended_message: bool,
    /// Offer IPv4 routes with IPv6 next hops (RFC 8950).
    pub extended_next_hop: bool,
    /// Advertise graceful restart (RFC 4724) with this restart time: we
    /// keep a restarting neighbour's routes (helper). Forwarding state is
    /// not claimed as preserved across our own restarts.
    pub graceful_restart: Option<u16>,
    /// We restarted keeping our forwarding state: the graceful restart
    /// capability says so (R bit, F bit per family).
    pub restarting: bool,
}

impl SessionConfig {
    pub fn is_ebgp(&self) -> bool {
        self.local_as != self.remote_as
    }
}

/// What the two OPENs agreed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub peer_as: u32,
    pub peer_id: Ipv4Addr,
    /// 0 = no hold timer, no keepalives.
    pub hold_time: u16,
    pub keepalive: Duration,
    pub codec: Codec,
    /// Families both sides announced.
    pub families: Vec<Family>,
    pub route_refresh: bool,
    pub enhanced_route_refresh: bool,
    /// Families for which the peer accepts an IPv6 next hop (RFC 8950).
    pub extended_next_hop: Vec<Family>,
    pub peer_open: Open,
}

/// What the driver must do, or what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Open a TCP connection to the neighbour; report with
    /// `tcp_connected(.., outgoing = true)` or `tcp_connect_failed`.
    Connect,
    /// Write these bytes on the connection.
    Send(ConnId, Vec<u8>),
    /// Close the connection once what was sent is flushed.
    Close(ConnId),
    /// The session reached Established.
    Established(Box<Negotiated>),
    /// The session left Established. `graceful`: it ended without a
    /// NOTIFICATION (the transport failed), so RFC 4724 helpers keep the
    /// neighbour's routes.
    Down { reason: String, graceful: bool },
    /// An UPDATE arrived in Established.
    Update(Box<DecodedUpdate>),
    /// The neighbour asked for our routes again (RFC 2918/7313), or marks
    /// the beginning or end of its re-advertisement.
    RouteRefresh(RouteRefresh),
    /// Something worth a log line that changes nothing above.
    Log(String),
}

#[derive(Debug)]
struct Connection {
    id: ConnId,
    outgoing: bool,
    state: State,
    rx: Vec<u8>,
    hold_deadline: Option<Instant>,
    keepalive_deadline: Option<Instant>,
    negotiated: Option<Negotiated>,
}

/// Seconds RFC 4271 §8 suggests for the hold timer before an OPEN arrives.
const OPEN_HOLD: Duration = Duration::from_secs(240);

/// One neighbour's session.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    enabled: bool,
    connecting: bool,
    conns: Vec<Connection>,
    connect_retry_deadline: Option<Instant>,
    idle_until: Option<Instant>,
    refuse_until: Option<Instant>,
    backoff: Duration,
    established_at: Option<Instant>,
    since: Instant,
    last_error: Option<String>,
    out: VecDeque<Output>,
}

impl Session {
    pub fn new(config: SessionConfig, now: Instant) -> Self {
        Session {
            backoff: config.idle_hold,
            config,
            enabled: false,
            connecting: false,
            conns: Vec::new(),
            connect_retry_deadline: None,
            idle_until: None,
            refuse_until: None,
            established_at: None,
            since: now,
            last_error: None,
            out: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Replaces the config; takes effect at the next connection.
    pub fn set_config(&mut self, config: SessionConfig) {
        self.config = config;
    }

    /// The state as RFC 4271 names it.
    pub fn state(&self) -> State {
        let best = self.conns.iter().map(|c| c.state).max_by_key(|s| rank(*s));
        match best {
            Some(s) => s,
            None if !self.enabled || self.idle_until.is_some() => State::Idle,
            None if self.connecting => State::Connect,
            None => State::Active,
        }
    }

    /// When the state last changed to or from Established, or the session
    /// was enabled or disabled.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// Why the session last went down, for `show protocols`.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.established().and_then(|c| c.negotiated.as_ref())
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The connection the session is Established on.
    pub fn established_conn(&self) -> Option<ConnId> {
        self.established().map(|c| c.id)
    }

    fn established(&self) -> Option<&Connection> {
        self.conns.iter().find(|c| c.state == State::Established)
    }

    /// Next output for the driver.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The earliest time `handle_timeout` must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let conn_deadlines = self
            .conns
            .iter()
            .flat_map(|c| [c.hold_deadline, c.keepalive_deadline])
            .flatten();
        [self.connect_retry_deadline, self.idle_until]
            .into_iter()
            .flatten()
            .chain(conn_deadlines)
            .min()
    }

    /// ManualStart: begin connecting (or waiting, when passive).
    pub fn start(&mut self, now: Instant) {
        if self.enabled {
            return;
        }
        self.enabled = true;
        self.refuse_until = None;
        self.since = now;
        self.backoff = self.config.idle_hold;
        self.idle_until = None;
        self.try_connect(now);
    }

    /// ManualStop: Cease / Administrative Shutdown with `message`, and stay
    /// down until `start`.
    pub fn stop(&mut self, now: Instant, message: &str) {
        self.enabled = false;
        self.connecting = false;
        self.connect_retry_deadline = None;
        self.idle_until = None;
        let n = Notification::cease_with_message(cease::ADMIN_SHUTDOWN, message);
        self.close_all(now, Some(n), "administratively shut down");
        self.since = now;
    }

    /// Cease / Administrative Reset, then reconnect at once.
    pub fn restart(&mut self, now: Instant, message: &str) {
        let n = Notification::cease_with_message(cease::ADMIN_RESET, message);
        self.close_all(now, Some(n), "administratively reset");
        self.connecting = false;
        self.idle_until = None;
        self.refuse_until = None;
        self.backoff = self.config.idle_hold;
        self.try_connect(now);
    }

    /// Cease with another subcode (e.g. Maximum Number of Prefixes), then
    /// wait `hold_down` before reconnecting (`None`: stay down until
    /// `start`).
    pub fn shutdown(
        &mut self,
        now: Instant,
        notification: Notification,
        hold_down: Option<Duration>,
    ) {
        let reason = format!("sent NOTIFICATION: {notification}");
        self.close_all(now, Some(notification), &reason);
        self.connecting = false;
        self.connect_retry_deadline = None;
        match hold_down {
            Some(wait) => {
                self.idle_until = Some(now + wait);
                // Unlike the error backoff, this hold-down refuses the
                // neighbour's connections too (max-prefix restart timer).
                self.refuse_until = Some(now + wait);
            }
            None => {
                self.enabled = false;
                self.idle_until = None;
            }
        }
    }

    fn try_connect(&mut self, now: Instant) {
        if !self.enabled || self.idle_until.is_some() {
            return;
        }
        if self.config.passive {
            self.connect_retry_deadline = None;
            return;
        }
        if !self.connecting && self.conns.is_empty() {
            self.connecting = true;
            self.out.push_back(Output::Connect);
        }
        self.connect_retry_deadline = Some(now + self.config.connect_retry);
    }

    /// An outgoing connection attempt failed.
    pub fn tcp_connect_failed(&mut self, _now: Instant, error: &str) {
        self.connecting = false;
        self.last_error = Some(format!("connect: {error}"));
        // The connect-retry deadline set at the attempt triggers the next one.
    }

    /// The path to the neighbour is gone (BFD says so): drop the
    /// connections without a NOTIFICATION, which could not arrive anyway.
    pub fn transport_failed(&mut self, now: Instant, reason: &str) {
        while !self.conns.is_empty() {
            self.drop_connection(now, 0, reason.to_string(), true, true);
        }
    }

    /// A TCP connection is up: ours (`outgoing`) or accepted from the peer.
    pub fn tcp_connected(&mut self, now: Instant, id: ConnId, outgoing: bool) {
        if outgoing {
            self.connecting = false;
        }
        // While holding down after an error we do not connect out, but a
        // neighbour that connects to us is welcome: refusing it too would
        // keep two speakers with equal backoffs refusing each other.
        if !self.enabled {
            self.reject(id, "session is administratively disabled");
            return;
        }
        if self.refuse_until.is_some_and(|t| now < t) {
            self.reject(id, "holding down after closing the session");
            return;
        }
        if self.established().is_some() || self.conns.len() >= 2 {
            // RFC 4271 §6.8: a connection colliding with an Established one
            // is closed.
            let n = Notification::new(error_code::CEASE, cease::COLLISION_RESOLUTION, vec![]);
            self.out.push_back(Output::Send(
                id,
                Message::Notification(n).encode(&Codec::INITIAL),
            ));
            self.out.push_back(Output::Close(id));
            return;
        }
        self.connect_retry_deadline = None;
        let open = self.our_open();
        self.out.push_back(Output::Send(
            id,
            Message::Open(open).encode(&Codec::INITIAL),
        ));
        self.conns.push(Connection {
            id,
            outgoing,
            state: State::OpenSent,
            rx: Vec::new(),
            hold_deadline: Some(now + OPEN_HOLD),
            keepalive_deadline: None,
            negotiated: None,
        });
    }

    fn reject(&mut self, id: ConnId, why: &str) {
        let n = Notification::cease_with_message(cease::CONNECTION_REJECTED, why);
        self.out.push_back(Output::Send(
            id,
            Message::Notification(n).encode(&Codec::INITIAL),
        ));
        self.out.push_back(Output::Close(id));
    }

    fn our_open(&self) -> Open {
        let mut caps: Vec<Capability> = self
            .config
            .families
            .iter()
            .map(|f| Capability::Multiprotocol(*f))
            .collect();
        caps.push(Capability::RouteRefresh);
        caps.push(Capability::EnhancedRouteRefresh);
        if self.config.extended_message {
            caps.push(Capability::ExtendedMessage);
        }
        if self.config.extended_next_hop && self.config.families.contains(&Family::IPV4_UNICAST) {
            caps.push(Capability::ExtendedNextHop(vec![(
                Family::IPV4_UNICAST,
                crate::wire::AFI_IPV6,
            )]));
        }
        if let Some(restart_time) = self.config.graceful_restart {
            let restarting = self.config.restarting;
            caps.push(Capability::GracefulRestart(crate::wire::GracefulRestart {
                restarting,
                notification: false,
                restart_time: restart_time.min(4095),
                families: self
                    .config
                    .families
                    .iter()
                    .map(|f| (*f, restarting))
                    .collect(),
            }));
        }
        Open::new(
            self.config.local_as,
            self.config.hold_time,
            self.config.router_id,
            caps,
        )
    }

    /// The peer (or the network) closed connection `id`.
    pub fn tcp_closed(&mut self, now: Instant, id: ConnId) {
        if let Some(i) = self.conns.iter().position(|c| c.id == id) {
            self.drop_connection(
                now,
                i,
                "connection closed by the neighbour".into(),
                true,
                true,
            );
        }
    }

    /// Bytes arrived on connection `id`.
    pub fn received(&mut self, now: Instant, id: ConnId, bytes: &[u8]) {
        let Some(i) = self.conns.iter().position(|c| c.id == id) else {
            return;
        };
        self.conns[i].rx.extend_from_slice(bytes);
        let mut consumed = 0;
        loop {
            // The connection may be gone after the previous message.
            let Some(i) = self.conns.iter().position(|c| c.id == id) else {
                return;
            };
            let codec = self.conns[i]
                .negotiated
                .as_ref()
                .map(|n| n.codec)
                .unwrap_or(Codec::INITIAL);
            let frame = match next_frame(&self.conns[i].rx[consumed..], &codec) {
                Ok(Some((_, len))) => len,
                Ok(None) => break,
                Err(n) => {
                    self.fail(now, i, n);
                    return;
                }
            };
            let message = decode_message(&self.conns[i].rx[consumed..consumed + frame], &codec);
            consumed += frame;
            match message {
                Ok(decoded) => self.on_message(now, i, decoded),
                Err(n) => {
                    self.fail(now, i, n);
                    return;
                }
            }
        }
        if let Some(i) = self.conns.iter().position(|c| c.id == id) {
            self.conns[i].rx.drain(..consumed);
        }
    }

    /// Messages of connection `id` that the driver framed and decoded
    /// itself (with [`Session::codec`]), in the order they arrived. An
    /// error fails the connection, as it would in [`Session::received`];
    /// what follows it is dropped.
    pub fn received_decoded(
        &mut self,
        now: Instant,
        id: ConnId,
        messages: Vec<Result<Decoded, Notification>>,
    ) {
        for message in messages {
            // The connection may be gone after the previous message.
            let Some(i) = self.conns.iter().position(|c| c.id == id) else {
                return;
            };
            match message {
                Ok(decoded) => self.on_message(now, i, decoded),
                Err(n) => return self.fail(now, i, n),
            }
        }
    }

    /// How messages on connection `id` are decoded, once its OPENs are
    /// exchanged (it never changes after that).
    pub fn codec(&self, id: ConnId) -> Option<Codec> {
        let conn = self.conns.iter().find(|c| c.id == id)?;
        conn.negotiated.as_ref().map(|n| n.codec)
    }

    fn on_message(&mut self, now: Instant, i: usize, decoded: Decoded) {
        let state = self.conns[i].state;
        let fsm_error = |sub: u8| Notification::new(error_code::FSM, sub, vec![]);
        match (state, decoded) {
            (_, Decoded::Message(Message::Notification(n))) => {
                let reason = format!("received NOTIFICATION: {n}");
                self.drop_connection(now, i, reason, true, false);
            }
            (State::OpenSent, Decoded::Message(Message::Open(open))) => self.on_open(now, i, open),
            (State::OpenSent, _) => self.fail(now, i, fsm_error(1)),
            (State::OpenConfirm, Decoded::Message(Message::Keepalive)) => {
                self.on_established(now, i)
            }
            (State::OpenConfirm, _) => self.fail(now, i, fsm_error(2)),
            (State::Established, Decoded::Message(Message::Keepalive)) => self.refresh_hold(now, i),
            (State::Established, Decoded::Update(update)) => {
                self.refresh_hold(now, i);
                self.out.push_back(Output::Update(update));
            }
            (State::Established, Decoded::Message(Message::RouteRefresh(rr))) => {
                let negotiated = self.conns[i].negotiated.as_ref();
                if negotiated.is_some_and(|n| n.route_refresh && n.families.contains(&rr.family)) {
                    self.out.push_back(Output::RouteRefresh(rr));
                } else {
                    self.out.push_back(Output::Log(format!(
                        "ignored ROUTE-REFRESH for {}",
                        rr.family
                    )));
                }
            }
            (State::Established, _) => self.fail(now, i, fsm_error(3)),
            (other, d) => self
                .out
                .push_back(Output::Log(format!("ignored {d:?} in {other}"))),
        }
    }

    fn on_open(&mut self, now: Instant, i: usize, open: Open) {
        let cfg = self.config.clone();
        let open_error = |sub: u8, data: Vec<u8>| Notification::new(error_code::OPEN, sub, data);
        if open.asn() != cfg.remote_as {
            let data = open.my_as.to_be_bytes().to_vec();
            return self.fail(now, i, open_error(open_error::BAD_PEER_AS, data));
        }
        if open.hold_time == 1 || open.hold_time == 2 {
            return self.fail(
                now,
                i,
                open_error(open_error::UNACCEPTABLE_HOLD_TIME, vec![]),
            );
        }
        let id_clash = !cfg.is_ebgp() && open.bgp_id == cfg.router_id;
        if open.bgp_id.is_unspecified() || id_clash {
            let data = open.bgp_id.octets().to_vec();
            return self.fail(now, i, open_error(open_error::BAD_BGP_IDENTIFIER, data));
        }
        // RFC 4271 §6.8: with two connections, the one started by the
        // speaker with the higher BGP Identifier survives.
        if let Some(j) = (0..self.conns.len()).find(|&j| j != i) {
            if self.conns[j].state == State::OpenConfirm || self.conns[j].state == State::OpenSent {
                // Equal identifiers (eBGP, RFC 6286 §2.3): the larger AS wins.
                let local_wins =
                    (u32::from(cfg.router_id), cfg.local_as) > (u32::from(open.bgp_id), open.asn());
                // Keep the connection initiated by the winner.
                let keep_outgoing = local_wins;
                let loser = if self.conns[i].outgoing == keep_outgoing {
                    j
                } else {
                    i
                };
                let n = Notification::new(error_code::CEASE, cease::COLLISION_RESOLUTION, vec![]);
                let loser_id = self.conns[loser].id;
                self.out.push_back(Output::Log(format!(
                    "connection collision: closing connection {loser_id}"
                )));
                self.send(loser, Message::Notification(n));
                self.out.push_back(Output::Close(loser_id));
                self.conns.remove(loser);
                if loser == i {
                    return;
                }
            }
        }
        let Some(i) = self.conns.iter().position(|c| c.state == State::OpenSent) else {
            return;
        };
        let hold_time = cfg.hold_time.min(open.hold_time);
        let both = |c: fn(&Capability) -> bool| open.has(c);
        let four_octet_as = open.four_octet_as().is_some();
        let families: Vec<Family> = cfg
            .families
            .iter()
            .copied()
            .filter(|f| open.families().contains(f))
            .collect();
        let extended_next_hop = open
            .capabilities
            .iter()
            .filter_map(|c| match c {
                Capability::ExtendedNextHop(list) => Some(list.clone()),
                _ => None,
            })
            .flatten()
            .filter(|(_, nh_afi)| *nh_afi == crate::wire::AFI_IPV6)
            .map(|(f, _)| f)
            .filter(|_| cfg.extended_next_hop)
            .collect();
        let negotiated = Negotiated {
            peer_as: open.asn(),
            peer_id: open.bgp_id,
            hold_time,
            keepalive: Duration::from_secs(u64::from(hold_time / 3)),
            codec: Codec {
                four_octet_as,
                extended_message: cfg.extended_message
                    && both(|c| matches!(c, Capability::ExtendedMessage)),
                ebgp: cfg.is_ebgp(),
            },
            families,
            route_refresh: both(|c| matches!(c, Capability::RouteRefresh)),
            enhanced_route_refresh: both(|c| matches!(c, Capability::EnhancedRouteRefresh)),
            extended_next_hop,
            peer_open: open,
        };
        let conn = &mut self.conns[i];
        conn.state = State::OpenConfirm;
        conn.hold_deadline = (hold_time > 0).then(|| now + Duration::from_secs(hold_time.into()));
        conn.keepalive_deadline = (hold_time > 0).then(|| now + negotiated.keepalive);
        conn.negotiated = Some(negotiated);
        self.send(i, Message::Keepalive);
    }

    fn on_established(&mut self, now: Instant, i: usize) {
        self.refresh_hold(now, i);
        self.conns[i].state = State::Established;
        self.since = now;
        self.established_at = Some(now);
        self.last_error = None;
        self.connect_retry_deadline = None;
        self.idle_until = None;
        // A connection still in OpenSent loses to the Established one.
        let others: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|c| c.state != State::Established)
            .map(|c| c.id)
            .collect();
        for id in others {
            if let Some(j) = self.conns.iter().position(|c| c.id == id) {
                let n = Notification::new(error_code::CEASE, cease::COLLISION_RESOLUTION, vec![]);
                self.send(j, Message::Notification(n));
                self.out.push_back(Output::Close(id));
                self.conns.remove(j);
            }
        }
        if let Some(n) = self.negotiated().cloned() {
            self.out.push_back(Output::Established(Box::new(n)));
        }
    }

    fn refresh_hold(&mut self, now: Instant, i: usize) {
        let conn = &mut self.conns[i];
        if let Some(n) = &conn.negotiated
            && n.hold_time > 0
        {
            conn.hold_deadline = Some(now + Duration::from_secs(n.hold_time.into()));
        }
    }

    fn send(&mut self, i: usize, message: Message) {
        let codec = self.conns[i]
            .negotiated
            .as_ref()
            .map(|n| n.codec)
            .unwrap_or(Codec::INITIAL);
        self.out
            .push_back(Output::Send(self.conns[i].id, message.encode(&codec)));
    }

    /// Sends already-encoded UPDATE bytes on the Established connection.
    /// Returns false when the session is not Established.
    pub fn send_bytes(&mut self, bytes: Vec<u8>) -> bool {
        match self.established() {
            Some(c) => {
                self.out.push_back(Output::Send(c.id, bytes));
                true
            }
            None => false,
        }
    }

    /// Sends a message on the Established connection.
    pub fn send_message(&mut self, message: &Message) -> bool {
        let Some(c) = self.established() else {
            return false;
        };
        let codec = c
            .negotiated
            .as_ref()
            .map(|n| n.codec)
            .unwrap_or(Codec::INITIAL);
        let id = c.id;
        self.out.push_back(Output::Send(id, message.encode(&codec)));
        true
    }

    /// Sends NOTIFICATION `n` and closes connection `i`: an error.
    fn fail(&mut self, now: Instant, i: usize, n: Notification) {
        let reason = format!("sent NOTIFICATION: {n}");
        self.send(i, Message::Notification(n));
        self.drop_connection(now, i, reason, true, false);
    }

    fn drop_connection(
        &mut self,
        now: Instant,
        i: usize,
        reason: String,
        error: bool,
        graceful: bool,
    ) {
        let conn = self.conns.remove(i);
        self.out.push_back(Output::Close(conn.id));
        let was_established = conn.state == State::Established;
        if was_established {
            self.since = now;
            self.out.push_back(Output::Down {
                reason: reason.clone(),
                graceful,
            });
        } else {
            self.out.push_back(Output::Log(format!(
                "connection {} ({}): {reason}",
                conn.id, conn.state
            )));
        }
        self.last_error = Some(reason);
        // After an error the session holds down, then reconnects; an
        // administrative close leaves what happens next to its caller.
        if error && self.conns.is_empty() && self.enabled {
            self.hold_down(now, was_established);
        }
    }

    /// Idle-hold before reconnecting, doubling while failures repeat. A
    /// session that stayed up long enough starts again from the minimum.
    fn hold_down(&mut self, now: Instant, was_established: bool) {
        let stable = self
            .established_at
            .is_some_and(|t| now.saturating_duration_since(t) >= self.config.idle_hold_max);
        if was_established && stable {
            self.backoff = self.config.idle_hold;
        }
        self.connecting = false;
        self.connect_retry_deadline = None;
        self.idle_until = Some(now + self.backoff);
        self.backoff = (self.backoff * 2)
            .min(self.config.idle_hold_max)
            .max(self.config.idle_hold);
    }

    fn close_all(&mut self, now: Instant, notification: Option<Notification>, reason: &str) {
        while !self.conns.is_empty() {
            if let Some(n) = notification.clone() {
                self.send(0, Message::Notification(n));
            }
            self.drop_connection(now, 0, reason.to_string(), false, false);
        }
    }

    /// Fires the timers that are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.idle_until.is_some_and(|t| t <= now) {
            self.idle_until = None;
            self.try_connect(now);
        }
        if self.connect_retry_deadline.is_some_and(|t| t <= now) {
            self.connect_retry_deadline = None;
            if self.conns.is_empty() {
                // A connect still pending is abandoned and retried.
                self.connecting = false;
                self.try_connect(now);
            }
        }
        let mut i = 0;
        while i < self.conns.len() {
            if self.conns[i].hold_deadline.is_some_and(|t| t <= now) {
                let n = Notification::new(error_code::HOLD_TIMER_EXPIRED, 0, vec![]);
                self.fail(now, i, n);
                continue;
            }
            if let Some(t) = self.conns[i].keepalive_deadline
                && t <= now
            {
                let every = self.conns[i]
                    .negotiated
                    .as_ref()
                    .map(|n| n.keepalive)
                    .unwrap_or_default();
                self.conns[i].keepalive_deadline = Some(now + every.max(Duration::from_secs(1)));
                self.send(i, Message::Keepalive);
            }
            i += 1;
        }
    }
}

fn rank(state: State) -> u8 {
    match state {
        State::Idle => 0,
        State::Connect => 1,
        State::Active => 2,
        State::OpenSent => 3,
        State::OpenConfirm => 4,
        State::Established => 5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Codec, Decoded, decode_message};

    fn config(local_as: u32, remote_as: u32, id: [u8; 4]) -> SessionConfig {
        SessionConfig {
            local_as,
            remote_as,
            router_id: Ipv4Addr::from(id),
            hold_time: 90,
            passive: false,
            connect_retry: Duration::from_secs(5),
            idle_hold: Duration::from_secs(2),
            idle_hold_max: Duration::from_secs(60),
            families: vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST],
            extended_message: true,
            extended_next_hop: false,
            graceful_restart: None,
            restarting: false,
        }
    }

    /// Two sessions wired back to back in memory, on virtual time. The
    /// same ConnId names both ends of a connection.
    struct Pair {
        a: Session,
        b: Session,
        now: Instant,
        next_conn: ConnId,
        /// A frozen side neither reads nor runs timers (SIGSTOP).
        b_frozen: bool,
        events_a: Vec<Output>,
        events_b: Vec<Output>,
        /// Every message b received, decoded.
        seen_by_b: Vec<Message>,
        seen_by_a: Vec<Message>,
        /// Whether b accepts connections (listening).
        b_listening: bool,
        a_listening: bool,
    }

    impl Pair {
        fn new(a: SessionConfig, b: SessionConfig) -> Pair {
            let now = Instant::now();
            Pair {
                a: Session::new(a, now),
                b: Session::new(b, now),
                now,
                next_conn: ConnId(1),
                b_frozen: false,
                events_a: vec![],
                events_b: vec![],
                seen_by_a: vec![],
                seen_by_b: vec![],
                b_listening: true,
                a_listening: true,
            }
        }

        fn pump(&mut self) {
            for _ in 0..1000 {
                let mut moved = false;
                while let Some(o) = self.a.poll_output() {
                    moved = true;
                    self.deliver(true, o);
                }
                if !self.b_frozen {
                    while let Some(o) = self.b.poll_output() {
                        moved = true;
                        self.deliver(false, o);
                    }
                }
                if !moved {
                    return;
                }
            }
            panic!("the sessions never settle");
        }

        fn deliver(&mut self, from_a: bool, o: Output) {
            let now = self.now;
            let (listening, seen) = if from_a {
                (self.b_listening, &mut self.seen_by_b)
            } else {
                (self.a_listening, &mut self.seen_by_a)
            };
            match &o {
                Output::Connect => {
                    let id = self.next_conn;
                    self.next_conn.0 += 1;
                    let (this, other) = if from_a {
                        (&mut self.a, &mut self.b)
                    } else {
                        (&mut self.b, &mut self.a)
                    };
                    if listening {
                        this.tcp_connected(now, id, true);
                        other.tcp_connected(now, id, false);
                    } else {
                        this.tcp_connect_failed(now, "connection refused");
                    }
                }
                Output::Send(id, bytes) => {
                    let mut rest = &bytes[..];
                    while let Ok(Some((_, len))) = next_frame(
                        rest,
                        &Codec {
                            extended_message: true,
                            ..Codec::INITIAL
                        },
                    ) {
                        if let Ok(Decoded::Message(m)) = decode_message(
                            &rest[..len],
                            &Codec {
                                four_octet_as: true,
                                extended_message: true,
                                ebgp: true,
                            },
                        ) {
                            seen.push(m);
                        }
                        rest = &rest[len..];
                    }
                    let frozen = self.b_frozen && from_a;
                    let other = if from_a { &mut self.b } else { &mut self.a };
                    if !frozen {
                        other.received(now, *id, bytes);
                    }
                }
                Output::Close(id) => {
                    let other = if from_a { &mut self.b } else { &mut self.a };
                    if !(self.b_frozen && from_a) {
                        other.tcp_closed(now, *id);
                    }
                }
                _ => {}
            }
            if from_a {
                self.events_a.push(o)
            } else {
                self.events_b.push(o)
            }
        }

        /// Moves virtual time forward, firing timers in order.
        fn advance(&mut self, by: Duration) {
            let end = self.now + by;
            loop {
                let next = [
                    self.a.poll_timeout(),
                    if self.b_frozen {
                        None
                    } else {
                        self.b.poll_timeout()
                    },
                ]
                .into_iter()
                .flatten()
                .filter(|t| *t <= end)
                .min();
                let Some(t) = next else { break };
                self.now = t.max(self.now);
                self.a.handle_timeout(self.now);
                if !self.b_frozen {
                    self.b.handle_timeout(self.now);
                }
                self.pump();
            }
            self.now = end;
        }

        fn start(&mut self) {
            let now = self.now;
            self.b.start(now);
            self.a.start(now);
            self.pump();
        }
    }

    fn downs(events: &[Output]) -> Vec<&str> {
        events
            .iter()
            .filter_map(|e| match e {
                Output::Down { reason, .. } => Some(reason.as_str()),
                _ => None,
            })
            .collect()
    }

    fn notifications(seen: &[Message]) -> Vec<(u8, u8)> {
        seen.iter()
            .filter_map(|m| match m {
                Message::Notification(n) => Some((n.code, n.subcode)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn active_and_passive_reach_established_with_the_smaller_hold_time() {
        let mut b = config(65002, 65001, [10, 0, 0, 2]);
        b.passive = true;
        b.hold_time = 30;
        let mut p = Pair::new(config(65001, 65002, [10, 0, 0, 1]), b);
        p.start();
        assert_eq!(p.a.state(), State::Established);
        assert_eq!(p.b.state(), State::Established);
        let n = p.a.negotiated().expect("negotiated");
        assert_eq!((n.hold_time, n.keepalive), (30, Duration::from_secs(10)));
        assert_eq!(n.peer_as, 65002);
        assert!(n.codec.four_octet_as && n.codec.extended_message && n.codec.ebgp);
        assert_eq!(n.families, vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST]);
        assert!(n.route_refresh && n.enhanced_route_refresh);
        // Keepalives every 10 s keep it up for ever.
        p.advance(Duration::from_secs(600));
        assert_eq!(p.a.state(), State::Established);
        assert!(
            p.seen_by_b
                .iter()
                .filter(|m| **m == Message::Keepalive)
                .count()
                >= 59
        );
    }

    #[test]
    fn a_frozen_peer_expires_the_hold_timer_then_the_session_comes_back() {
        let mut p = Pair::new(
            config(65001, 65002, [10, 0, 0, 1]),
            config(65002, 65001, [10, 0, 0, 2]),
        );
        p.start();
        assert_eq!(p.a.state(), State::Established);
        p.b_frozen = true;
        p.advance(Duration::from_secs(89));
        assert_eq!(p.a.state(), State::Established, "not before 90 s");
        p.advance(Duration::from_secs(2));
        assert_ne!(p.a.state(), State::Established);
        assert_eq!(
            downs(&p.events_a),
            vec!["sent NOTIFICATION: Hold Timer Expired"]
        );
        assert_eq!(
            p.a.last_error(),
            Some("sent NOTIFICATION: Hold Timer Expired")
        );
        // The peer thaws (and, having missed everything, restarts).
        p.b_frozen = false;
        p.b = Session::new(config(65002, 65001, [10, 0, 0, 2]), p.now);
        p.b.start(p.now);
        p.pump();
        p.advance(Duration::from_secs(10));
        assert_eq!(
            p.a.state(),
            State::Established,
            "reconnected after the idle hold"
        );
    }

    #[test]
    fn hold_timer_runs_in_open_sent_and_open_confirm() {
        // OpenSent: the peer accepts TCP but never sends its OPEN.
        let mut p = Pair::new(
            config(65001, 65002, [10, 0, 0, 1]),
            config(65002, 65001, [10, 0, 0, 2]),
        );
        p.b_frozen = true;
        p.a.start(p.now);
        p.pump();
        assert_eq!(p.a.state(), State::OpenSent);
        p.advance(Duration::from_secs(239));
        assert_eq!(p.a.state(), State::OpenSent);
        p.advance(Duration::from_secs(2));
        assert_eq!(p.a.state(), State::Idle, "holding down after the error");
        assert!(
            p.events_a
                .iter()
                .any(|e| matches!(e, Output::Log(l) if l.contains("Hold Timer Expired")))
        );

        // OpenConfirm: the OPEN arrives, the KEEPALIVE never does.
        let mut p = Pair::new(
            config(65001, 65002, [10, 0, 0, 1]),
            config(65002, 65001, [10, 0, 0, 2]),
        );
        p.a.start(p.now);
        p.b.start(p.now);
        // Only the connection made below: drop both Connect requests.
        while p.a.poll_output().is_some() {}
        // Deliver b's OPEN to a, then freeze b before its KEEPALIVE.
        let id = ConnId(99);
        p.a.tcp_connected(p.now, id, true);
        p.b.tcp_connected(p.now, id, false);
        while let Some(o) = p.b.poll_output() {
            if let Output::Send(_, bytes) = o {
                if bytes[18] == crate::wire::MSG_OPEN {
                    p.a.received(p.now, id, &bytes);
                }
            }
        }
        p.b_frozen = true;
        p.pump();
        assert_eq!(p.a.state(), State::OpenConfirm);
        p.advance(Duration::from_secs(91));
        assert_eq!(p.a.state(), State::Idle);
    }

    #[test]
    fn wrong_remote_as_is_refused_with_bad_peer_as() {
        let mut p = Pair::new(
            config(65001, 65099, [10, 0, 0, 1]),
            config(65002, 65001, [10, 0, 0, 2]),
        );
        p.start();
        assert_ne!(p.a.state(), State::Established);
        let sent = notifications(&p.seen_by_b);
        assert_eq!(
            sent.first(),
            Some(&(2, 2)),
            "OPEN Message Error / Bad Peer AS"
        );
        let data = p.seen_by_b.iter().find_map(|m| match m {
            Message::Notification(n) => Some(n.data.clone()),
            _ => None,
        });
        assert_eq!(data, Some(65002u16.to_be_bytes().to_vec()));
        assert!(
            p.a.last_error().is_some_and(|e| e.contains("Bad Peer AS")),
            "{:?}",
            p.a.last_error()
        );
        assert!(
            p.b.last_error()
                .is_some_and(|e| e.contains("received NOTIFICATION")),
            "{:?}",
            p.b.last_error()
        );
    }

    #[test]
    fn ibgp_with_our_own_router_id_is_a_bad_bgp_identifier() {
        let mut p = Pair::new(
            config(65001, 65001, [10, 0, 0, 1]),
            config(65001, 65001, [10, 0, 0, 1]),
        );
        p.start();
        assert_ne!(p.a.state(), State::Established);
        assert!(
            notifications(&p.seen_by_b).contains(&(2, 3))
                || notifications(&p.seen_by_a).contains(&(2, 3))
        );
        // eBGP may share an identifier (RFC 6286).
        let mut p = Pair::new(
            config(65001, 65002, [10, 0, 0, 1]),
            config(65002, 65001, [10, 0, 0, 1]),
        );
        p.start();
        assert_eq!(p.a.state(), State::Established);
    }

    #[test]
    fn unacceptable_hold_time_and_unexpected_messages_are_refused() {
        let mut p = Pair::new(
            config(65001, 65002, [10, 0, 0, 1]),
            config(65002, 65001, [10, 0, 0, 2]),
        );
        p.a.start(p.now);
        p.a.tcp_connected(p.now, ConnId(7), true);
        let open = Open::new(65002, 2, Ipv4Addr::new(10, 0, 0, 2), vec![]);
        p.a.received(
            p.now,
            ConnId(7),
            &Message::Open(open).encode(&Codec::INITIAL),
        );
        let sent: Vec<Output> = std::iter::from_fn(|| p.a.poll_output()).collect();
        let notes: Vec<(u8, u8)> = sent
            .iter()
            .filter_map(|o| match o {
                Output::Send(_, b) => match decode_message(b, &Codec::INITIAL) {
                    Ok(Decoded::Message(Message::Notification(n))) => Some((n.code, n.subcode)),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        assert_eq!(notes, vec![(2, 6)], "Unacceptable Hold Time");

        // A KEEPALIVE in OpenSent is an FSM error (RFC 6608 subcode 1).
        let mut s = Session::new(config(65001, 65002, [10, 0, 0, 1]), p.now);
        s.start(p.now);
        s.tcp_connected(p.now, ConnId(8), true);
        s.received(
            p.now,
            ConnId(8),
            &Message::Keepalive.encode(&Codec::INITIAL),
        );
        let notes: Vec<(u8, u8)> = std::iter::from_fn(|| s.poll_output())
            .filter_map(|o| match o {
                Output::Send(_, b) => match decode_message(&b, &Codec::INITIAL) {
                    Ok(Decoded::Message(Message::Notification(n))) => Some((n.code, n.subcode)),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        assert_eq!(notes, vec![(5, 1)]);
    }

    #[test]
    fn unknown_capabilities_are_ignored() {
        let mut s = Session::new(config(65001, 65002, [10, 0, 0, 1]), Instant::now());
        let now = Instant::now();
        s.start(now);
        s.tcp_connected(now, ConnId(1), true);
        let open = Open::new(
            65002,
            90,
            Ipv4Addr::new(10, 0, 0, 2),
            vec![
                Capability::Unknown {
                    code: 250,
                    data: vec![1, 2, 3],
                },
                Capability::Multiprotocol(Family::IPV4_UNICAST),
            ],
        );
        s.received(now, ConnId(1), &Message::Open(open).encode(&Codec::INITIAL));
        s.received(now, ConnId(1), &Message::Keepalive.encode(&Codec::INITIAL));
        assert_eq!(s.state(), State::Established);
        assert_eq!(
            s.negotiated().map(|n| n.families.clone()),
            Some(vec![Family::IPV4_UNICAST])
        );
    }

    #[test]
    fn connection_collision_keeps_the_connection_of_the_higher_identifier() {
        for (a_id, b_id) in [
            ([10, 0, 0, 9], [10, 0, 0, 2]),
            ([10, 0, 0, 1], [10, 0, 0, 2]),
        ] {
            let mut p = Pair::new(config(65001, 65002, a_id), config(65002, 65001, b_id));
            let now = p.now;
            p.a.start(now);
            p.b.start(now);
            // Both connect out at once: drop the Connect outputs and make
            // two crossing connections by hand.
            while p.a.poll_output().is_some() {}
            while p.b.poll_output().is_some() {}
            p.a.tcp_connected(now, ConnId(1), true);
            p.b.tcp_connected(now, ConnId(1), false);
            p.b.tcp_connected(now, ConnId(2), true);
            p.a.tcp_connected(now, ConnId(2), false);
            p.pump();
            assert_eq!(p.a.state(), State::Established);
            assert_eq!(p.b.state(), State::Established);
            let survivor = p.a.established().map(|c| c.id);
            let a_higher = u32::from(Ipv4Addr::from(a_id)) > u32::from(Ipv4Addr::from(b_id));
            assert_eq!(
                survivor,
                Some(ConnId(if a_higher { 1 } else { 2 })),
                "a's id {a_id:?}, b's id {b_id:?}"
            );
            assert!(
                notifications(&p.seen_by_a).contains(&(6, 7))
                    || notifications(&p.seen_by_b).contains(&(6, 7))
            );
            assert!(
                downs(&p.events_a).is_empty(),
                "a collision is not a session flap"
            );
        }
    }

    #[test]
    fn idle_hold_doubles_while_errors_repeat() {
        let mut p = Pair::new(
            config(65001, 65099, [10, 0, 0, 1]),
            config(65002, 65001, [10, 0, 0, 2]),
        );
        p.start();
        let connects = |p: &Pair| p.events_a.iter().filter(|e| **e == Output::Connect).count();
        assert_eq!(connects(&p), 1);
        // Waits: 2 s, 4 s, 8 s (the peer's own hold-down may add more).
        p.advance(Duration::from_millis(2100));
        assert_eq!(connects(&p), 2);
        p.advance(Duration::from_millis(3000));
        assert_eq!(connects(&p), 2, "second wait is 4 s");
        p.advance(Duration::from_millis(1100));
        assert_eq!(connects(&p), 3);
    }

    #[test]
    fn stop_sends_an_administrative_shutdown_with_the_message_and_stays_down() {
        let mut p = Pair::new(
            config(65001, 65002, [10, 0, 0, 1]),
            config(65002, 65001, [10, 0, 0, 2]),
        );
        p.start();
        p.a.stop(p.now, "maintenance");
        p.pump();
        let shutdown = p.seen_by_b.iter().find_map(|m| match m {
            Message::Notification(n) if n.subcode == cease::ADMIN_SHUTDOWN => Some(n.clone()),
            _ => None,
        });
        assert_eq!(
            shutdown.as_ref().and_then(|n| n.shutdown_message()),
            Some("maintenance")
        );
        assert_eq!(p.a.state(), State::Idle);
        p.advance(Duration::from_secs(300));
        assert_eq!(p.a.state(), State::Idle);
        assert_eq!(
            downs(&p.events_b),
            vec!["received NOTIFICATION: Cease / Administrative Shutdown: \"maintenance\""]
        );
        p.a.start(p.now);
        p.pump();
        p.advance(Duration::from_secs(130));
        assert_eq!(p.a.state(), State::Established);
    }

    #[test]
    fn passive_sessions_never_connect_out() {
        let mut cfg = config(65001, 65002, [10, 0, 0, 1]);
        cfg.passive = true;
        let mut s = Session::new(cfg, Instant::now());
        s.start(Instant::now());
        assert_eq!(s.state(), State::Active);
        assert_eq!(s.poll_output(), None);
        assert_eq!(s.poll_timeout(), None);
    }
}
