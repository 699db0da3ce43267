//! Who may hold a connection to the controller, and for how long.
//!
//! The controller faces the Internet, and every agent holds a connection
//! to it, so a connection is a resource an attacker can exhaust without
//! knowing any key. `Admission` is the listener's acceptor (it runs on the
//! TCP stream before TLS) and bounds that:
//!
//! - **Header timeout**: a connection must deliver a complete request head
//!   within `header_timeout` of its accept (TLS handshake included), and of
//!   the first byte of every later request. An idle TLS client or a
//!   slowloris sending a byte at a time is closed then.
//! - **Idle timeout**: a connection with no request in flight that reads
//!   and writes nothing for `idle_timeout` is closed. An agent's push
//!   stream writes a heartbeat every 15 s and gateways pulse several times
//!   a second, so live agents are never idle.
//! - **Request timeout**: a handler (body reading included) that takes
//!   longer than `request_timeout` is answered 408.
//! - **Unproven connections**: until a connection has carried a request
//!   with a valid credential it is *unproven*. Unproven connections that
//!   are waiting (no request in flight) are capped per source address
//!   (IPv4 address, IPv6 /64) and in total; a new connection over a cap
//!   closes the oldest waiting unproven one of that source, or of all.
//! - **Total**: at most `max_connections` (default: the open-files limit
//!   less a reserve for the database and files). Over it, the oldest
//!   waiting unproven connection is closed for the new one; when there is
//!   none, the new connection is refused.
//!
//! Proven connections are never closed for a newcomer, so an attacker
//! without a key cannot push out agents or the admin.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::{Future, Ready};
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::response::Response;
use futures::task::AtomicWaker;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// `[limits]` of server.toml. Every field has a default; see
/// docs/controller.md ("Security").
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConnectionLimits {
    /// Seconds a connection has to send a complete request head.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_secs: u64,
    /// Seconds without traffic after which a connection with no request in
    /// flight is closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// Seconds a request (its body included) may take.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// Connections in total; 0: the open-files limit less a reserve.
    #[serde(default)]
    pub max_connections: usize,
    /// Waiting unproven connections in total; 0: a quarter of
    /// `max_connections`.
    #[serde(default)]
    pub max_unproven: usize,
    /// Waiting unproven connections from one IPv4 address or IPv6 /64.
    #[serde(default = "default_per_source")]
    pub max_unproven_per_source: usize,
}

fn default_header_timeout() -> u64 {
    10
}
fn default_idle_timeout() -> u64 {
    90
}
fn default_request_timeout() -> u64 {
    60
}
fn default_per_source() -> usize {
    256
}

impl Default for ConnectionLimits {
    fn default() -> ConnectionLimits {
        ConnectionLimits {
            header_timeout_secs: default_header_timeout(),
            idle_timeout_secs: default_idle_timeout(),
            request_timeout_secs: default_request_timeout(),
            max_connections: 0,
            max_unproven: 0,
            max_unproven_per_source: default_per_source(),
        }
    }
}

impl ConnectionLimits {
    /// Refuses values that would disable a limit; names the field.
    pub fn check(&self) -> Result<(), String> {
        let secs = [
            ("header_timeout_secs", self.header_timeout_secs, 3600),
            ("idle_timeout_secs", self.idle_timeout_secs, 86_400),
            ("request_timeout_secs", self.request_timeout_secs, 3600),
        ];
        for (name, value, most) in secs {
            if value == 0 || value > most {
                return Err(format!("limits.{name}: 1 to {most}"));
            }
        }
        if self.max_unproven_per_source == 0 {
            return Err("limits.max_unproven_per_source: at least 1".into());
        }
        Ok(())
    }

    /// The caps in force with this open-files limit: the configured ones,
    /// or the limit less a reserve (an eighth of it, 64 to 1024) for the
    /// database, the listener and files.
    fn resolved(&self, open_files: u64) -> (usize, usize) {
        let open_files = usize::try_from(open_files).unwrap_or(usize::MAX);
        let reserve = (open_files / 8).clamp(64, 1024);
        let total = match self.max_connections {
            0 => open_files.saturating_sub(reserve).max(16),
            n => n,
        };
        let unproven = match self.max_unproven {
            0 => (total / 4).max(8),
            n => n.min(total),
        };
        (total, unproven)
    }
}

/// The soft open-files limit of this process.
pub fn open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a local rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    }
}

/// Connection counters for /metrics.
#[derive(Default)]
pub struct ConnectionStats {
    pub open: AtomicU64,
    pub unproven: AtomicU64,
    pub refused: AtomicU64,
    pub evicted: AtomicU64,
    pub timed_out: AtomicU64,
}

/// Where a connection comes from, as far as limits go: an IPv4 address
/// or an IPv6 /64 (one subscriber's usual allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Source(IpAddr);

impl Source {
    pub(crate) fn of(ip: IpAddr) -> Source {
        Source(bgp4mesh_api::rate::source_key(ip))
    }
}

/// The listener's acceptor: admits or refuses each TCP connection and
/// wraps it in the timeouts. Cheap to clone.
#[derive(Clone)]
pub struct Admission {
    registry: Arc<Registry>,
}

struct Registry {
    header_timeout: Duration,
    idle_timeout: Duration,
    request_timeout: Duration,
    max_total: usize,
    max_unproven: usize,
    max_per_source: usize,
    epoch: Instant,
    next_id: AtomicU64,
    stats: Arc<ConnectionStats>,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    /// Admitted and not closed or evicted.
    total: usize,
    /// Waiting unproven connections, oldest first.
    waiting: BTreeMap<u64, Arc<Connection>>,
    by_source: HashMap<Source, BTreeSet<u64>>,
}

impl Table {
    fn unlist(&mut self, id: u64, source: Source) -> Option<Arc<Connection>> {
        let conn = self.waiting.remove(&id)?;
        if let Some(ids) = self.by_source.get_mut(&source) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_source.remove(&source);
            }
        }
        Some(conn)
    }
}

/// One admitted connection's state, shared by its stream and its service.
pub struct Connection {
    id: u64,
    source: Source,
    proven: AtomicBool,
    /// Closed for a newcomer; the stream fails at its next poll.
    evicted: AtomicBool,
    waker: AtomicWaker,
    in_flight: AtomicU32,
    /// Milliseconds since the registry's epoch; 0: no head being read.
    head_deadline: AtomicU64,
    last_progress: AtomicU64,
}

/// A request's handle on its connection (a request extension): the API
/// marks the connection proven once the request's credential checks out.
#[derive(Clone)]
pub struct ConnectionHandle {
    conn: Arc<Connection>,
    registry: Arc<Registry>,
}

impl ConnectionHandle {
    /// The request carried a valid credential: the connection is no longer
    /// counted as unproven and is never closed for a newcomer.
    pub fn prove(&self) {
        if self.conn.proven.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut table = self.registry.lock();
        if table.unlist(self.conn.id, self.conn.source).is_some() {
            self.registry.stats.unproven.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn millis(&self) -> u64 {
        // At least 1: 0 means "no deadline".
        (Instant::now().duration_since(self.epoch).as_millis() as u64).max(1)
    }

    fn evict(&self, table: &mut Table, id: u64, source: Source) {
        if let Some(conn) = table.unlist(id, source) {
            conn.evicted.store(true, Ordering::Release);
            table.total -= 1;
            self.stats.unproven.fetch_sub(1, Ordering::Relaxed);
            self.stats.open.fetch_sub(1, Ordering::Relaxed);
            self.stats.evicted.fetch_add(1, Ordering::Relaxed);
            conn.waker.wake();
        }
    }

    fn oldest_waiting(table: &Table, source: Option<Source>) -> Option<(u64, Source)> {
        match source {
            Some(s) => {
                let id = *table.by_source.get(&s)?.first()?;
                Some((id, s))
            }
            None => table
                .waiting
                .first_key_value()
                .map(|(id, c)| (*id, c.source)),
        }
    }

    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Arc<Connection>> {
        let source = Source::of(ip);
        let now = self.millis();
        let mut table = self.lock();
        let from_source = table.by_source.get(&source).map_or(0, BTreeSet::len);
        if from_source >= self.max_per_source
            && let Some((id, s)) = Self::oldest_waiting(&table, Some(source))
        {
            self.evict(&mut table, id, s);
        }
        if table.waiting.len() >= self.max_unproven
            && let Some((id, s)) = Self::oldest_waiting(&table, None)
        {
            self.evict(&mut table, id, s);
        }
        if table.total >= self.max_total {
            match Self::oldest_waiting(&table, None) {
                Some((id, s)) => self.evict(&mut table, id, s),
                None => {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
        let conn = Arc::new(Connection {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            source,
            proven: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            in_flight: AtomicU32::new(0),
            head_deadline: AtomicU64::new(now + self.header_timeout.as_millis() as u64),
            last_progress: AtomicU64::new(now),
        });
        table.total += 1;
        table.waiting.insert(conn.id, Arc::clone(&conn));
        table.by_source.entry(source).or_default().insert(conn.id);
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        self.stats.unproven.fetch_add(1, Ordering::Relaxed);
        Some(conn)
    }

    /// A request head is in: the connection is busy, not waiting.
    fn request_started(&self, conn: &Arc<Connection>) {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        conn.head_deadline.store(0, Ordering::Release);
        if !conn.proven.load(Ordering::Acquire) {
            let mut table = self.lock();
            if table.unlist(conn.id, conn.source).is_some() {
                self.stats.unproven.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn request_ended(&self, conn: &Arc<Connection>) {
        conn.last_progress.store(self.millis(), Ordering::Release);
        let left = conn.in_flight.fetch_sub(1, Ordering::AcqRel) - 1;
        if left == 0 && !conn.proven.load(Ordering::Acquire) {
            let mut table = self.lock();
            // Checked again under the lock: `prove` and `evict` take it too.
            let waiting =
                !conn.proven.load(Ordering::Acquire) && !conn.evicted.load(Ordering::Acquire);
            if waiting
                && let std::collections::btree_map::Entry::Vacant(entry) =
                    table.waiting.entry(conn.id)
            {
                entry.insert(Arc::clone(conn));
                table
                    .by_source
                    .entry(conn.source)
                    .or_default()
                    .insert(conn.id);
                self.stats.unproven.fetch_add(1, Ordering::Relaxed);
            }
        }
        // The stream may be parked on a read with no deadline running.
        conn.waker.wake();
    }

    fn closed(&self, conn: &Connection) {
        let mut table = self.lock();
        if conn.evicted.load(Ordering::Acquire) {
            return; // counted out when evicted
        }
        table.total -= 1;
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
        if table.unlist(conn.id, conn.source).is_some() {
            self.stats.unproven.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Admission {
    /// Caps resolved against this process's open-files limit now.
    pub fn new(limits: &ConnectionLimits, stats: Arc<ConnectionStats>) -> Admission {
        let (max_total, max_unproven) = limits.resolved(open_files_limit());
        tracing::info!(
            max_connections = max_total,
            max_unproven,
            max_unproven_per_source = limits.max_unproven_per_source,
            "connection limits"
        );
        Admission {
            registry: Arc::new(Registry {
                header_timeout: Duration::from_secs(limits.header_timeout_secs),
                idle_timeout: Duration::from_secs(limits.idle_timeout_secs),
                request_timeout: Duration::from_secs(limits.request_timeout_secs),
                max_total,
                max_unproven,
                max_per_source: limits.max_unproven_per_source,
                epoch: Instant::now(),
                next_id: AtomicU64::new(1),
                stats,
                table: Mutex::new(Table::default()),
            }),
        }
    }

    /// The connection limit in force.
    pub fn max_connections(&self) -> usize {
        self.registry.max_total
    }
}

impl<S> axum_server::accept::Accept<TcpStream, S> for Admission {
    type Stream = Guarded<TcpStream>;
    type Service = Tracked<S>;
    type Future = Ready<io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let admitted = stream
            .peer_addr()
            .ok()
            .and_then(|peer| self.registry.admit(peer.ip()));
        let Some(conn) = admitted else {
            return std::future::ready(Err(io::Error::other("connection limit reached")));
        };
        let _ = stream.set_nodelay(true);
        let registry = Arc::clone(&self.registry);
        std::future::ready(Ok((
            Guarded {
                io: stream,
                conn: Arc::clone(&conn),
                registry: Arc::clone(&registry),
                timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
                linger: None,
            },
            Tracked {
                inner: service,
                handle: ConnectionHandle { conn, registry },
            },
        )))
    }
}

/// A connection's byte stream under the header and idle timeouts: a read
/// or write that would wait past a deadline fails instead, which closes
/// the connection.
pub struct Guarded<S> {
    io: S,
    conn: Arc<Connection>,
    registry: Arc<Registry>,
    timer: Pin<Box<Sleep>>,
    /// Set once our side is shut down: the deadline and byte budget for
    /// reading what the client still sends (lingering close).
    linger: Option<Linger>,
}

/// After the last response, what the client is still sending (the rest
/// of a body that was refused unread) is read and dropped for a while
/// before the socket closes: closing with unread bytes makes the kernel
/// send a reset, and a client still writing its body then loses the
/// response it was sent. nginx calls this lingering close.
struct Linger {
    until: Instant,
    budget: usize,
}

/// How long and how much a closing connection reads and drops.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 8 << 20;

impl<S> Guarded<S> {
    fn progressed(&self, reading: bool) {
        let now = self.registry.millis();
        self.conn.last_progress.store(now, Ordering::Release);
        if reading
            && self.conn.in_flight.load(Ordering::Acquire) == 0
            && self.conn.head_deadline.load(Ordering::Acquire) == 0
        {
            // The first bytes of a new request.
            let deadline = now + self.registry.header_timeout.as_millis() as u64;
            self.conn.head_deadline.store(deadline, Ordering::Release);
        }
    }

    /// The stream would wait: fail if a deadline has passed, else make
    /// sure the task is woken at the next one (or by an eviction).
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.conn.waker.register(cx.waker());
        if self.conn.evicted.load(Ordering::Acquire) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed for a newer connection",
            )));
        }
        let head = self.conn.head_deadline.load(Ordering::Acquire);
        let deadline = if head != 0 {
            head
        } else if self.conn.in_flight.load(Ordering::Acquire) == 0 {
            self.conn.last_progress.load(Ordering::Acquire)
                + self.registry.idle_timeout.as_millis() as u64
        } else {
            return Poll::Pending; // the request timeout bounds a busy one
        };
        let now = self.registry.millis();
        if now >= deadline {
            self.registry
                .stats
                .timed_out
                .fetch_add(1, Ordering::Relaxed);
            let what = if head != 0 { "request head" } else { "idle" };
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what} timeout"),
            )));
        }
        let at = self.registry.epoch + Duration::from_millis(deadline);
        if self.timer.deadline() != at {
            self.timer.as_mut().reset(at);
        }
        // Registers the waker; a timer that fired is checked on the next
        // poll, with the deadline as it is then.
        if self.timer.as_mut().poll(cx).is_ready() {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

impl<S> Drop for Guarded<S> {
    fn drop(&mut self) {
        self.registry.closed(&self.conn);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.conn.evicted.load(Ordering::Acquire) {
            return this.check(cx);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.progressed(true);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.check(cx),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.progressed(false);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.check(cx).map_ok(|()| 0),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                this.progressed(false);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.check(cx).map_ok(|()| 0),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending => this.check(cx),
            done => done,
        }
    }

    /// Sends our end of the stream, then lingers (`Linger`): reads and
    /// drops until the client closes too, `LINGER_TIME` passes or
    /// `LINGER_BYTES` have come.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.linger.is_none() {
            std::task::ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            let until = Instant::now() + LINGER_TIME;
            this.timer.as_mut().reset(until);
            this.linger = Some(Linger {
                until,
                budget: LINGER_BYTES,
            });
        }
        let mut scratch = [0u8; 8192];
        loop {
            let Some(linger) = this.linger.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            if linger.budget == 0 || Instant::now() >= linger.until {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    linger.budget = linger.budget.saturating_sub(buf.filled().len());
                }
                // The client's end, or an error: nothing more to wait for.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    return match this.timer.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Ok(())),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }
}

/// The connection's service: counts the request in flight, hands it its
/// `ConnectionHandle`, and bounds it by the request timeout.
#[derive(Clone)]
pub struct Tracked<S> {
    inner: S,
    handle: ConnectionHandle,
}

/// Ends a request's turn on its connection when the handler finishes or
/// is dropped.
struct InFlight(ConnectionHandle);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.registry.request_ended(&self.0.conn);
    }
}

type Reply = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl<S, B> tower_service::Service<Request<B>> for Tracked<S>
where
    S: tower_service::Service<Request<B>, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Reply;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Reply {
        self.handle.registry.request_started(&self.handle.conn);
        let in_flight = InFlight(self.handle.clone());
        let limit = self.handle.registry.request_timeout;
        request.extensions_mut().insert(self.handle.clone());
        let reply = self.inner.call(request);
        Box::pin(async move {
            let _in_flight = in_flight;
            match tokio::time::timeout(limit, reply).await {
                Ok(response) => response,
                Err(_) => Ok(request_timed_out(limit)),
            }
        })
    }
}

fn request_timed_out(limit: Duration) -> Response {
    let body = serde_json::json!({
        "message": format!("the request took longer than {} s", limit.as_secs())
    });
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = StatusCode::REQUEST_TIMEOUT;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn registry(total: usize, unproven: usize, per_source: usize) -> Arc<Registry> {
        let limits = ConnectionLimits {
            max_connections: total,
            max_unproven: unproven,
            max_unproven_per_source: per_source,
            ..ConnectionLimits::default()
        };
        Admission::new(&limits, Arc::default()).registry
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    #[test]
    fn sources_are_addresses_and_ipv6_slash_64s() {
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(Source::of(a), Source::of(b));
        assert_ne!(Source::of(a), Source::of(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        assert_eq!(Source::of(mapped), Source::of(ip(7)));
    }

    #[test]
    fn defaults_keep_a_reserve_below_the_open_files_limit() {
        let limits = ConnectionLimits::default();
        assert_eq!(limits.resolved(1024), (896, 224));
        assert_eq!(limits.resolved(1_048_576), (1_047_552, 261_888));
        let set = ConnectionLimits {
            max_connections: 100,
            max_unproven: 500,
            ..ConnectionLimits::default()
        };
        assert_eq!(set.resolved(1024), (100, 100));
        assert!(limits.check().is_ok());
        let zero = ConnectionLimits {
            header_timeout_secs: 0,
            ..ConnectionLimits::default()
        };
        assert!(zero.check().expect_err("0").contains("header_timeout_secs"));
    }

    #[test]
    fn a_source_over_its_cap_pushes_out_its_own_oldest() {
        let r = registry(100, 50, 3);
        let first: Vec<_> = (0..3).map(|_| r.admit(ip(1)).expect("admit")).collect();
        let other = r.admit(ip(2)).expect("admit");
        let fourth = r.admit(ip(1)).expect("admit");
        assert!(first[0].evicted.load(Ordering::Acquire));
        assert!(!first[1].evicted.load(Ordering::Acquire));
        assert!(!other.evicted.load(Ordering::Acquire));
        assert!(!fourth.evicted.load(Ordering::Acquire));
        assert_eq!(r.lock().total, 4);
    }

    #[test]
    fn proven_and_busy_connections_are_never_pushed_out() {
        let r = registry(3, 3, 3);
        let proven = r.admit(ip(1)).expect("admit");
        let busy = r.admit(ip(1)).expect("admit");
        let idle = r.admit(ip(1)).expect("admit");
        ConnectionHandle {
            conn: Arc::clone(&proven),
            registry: Arc::clone(&r),
        }
        .prove();
        r.request_started(&busy);
        // Full: the only waiting unproven one goes.
        let newcomer = r.admit(ip(9)).expect("admit");
        assert!(idle.evicted.load(Ordering::Acquire));
        assert!(!proven.evicted.load(Ordering::Acquire));
        assert!(!busy.evicted.load(Ordering::Acquire));
        // Full again, the newcomer is waiting: it goes for the next one.
        let next = r.admit(ip(9)).expect("admit");
        assert!(newcomer.evicted.load(Ordering::Acquire));
        r.request_started(&next);
        // Nothing left to push out: refused.
        assert!(r.admit(ip(9)).is_none());
        assert_eq!(r.stats.refused.load(Ordering::Relaxed), 1);
        // The busy one ends its request unproven: waiting again, and the
        // first to go.
        r.request_ended(&busy);
        assert!(r.admit(ip(9)).is_some());
        assert!(busy.evicted.load(Ordering::Acquire));
    }

    #[test]
    fn closing_frees_the_place() {
        let r = registry(1, 1, 1);
        let a = r.admit(ip(1)).expect("admit");
        r.request_started(&a);
        assert!(r.admit(ip(2)).is_none());
        r.closed(&a);
        assert!(r.admit(ip(2)).is_some());
        assert_eq!(r.stats.open.load(Ordering::Relaxed), 1);
    }
}
