//! BGP's TCP side: the listeners, outgoing connection attempts, and a
//! reader and a writer task per connection. The speaker knows connections
//! by [`ConnId`]; this is where those ids meet sockets.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bgp4mesh_bgp::rib::NeighborId;
use bgp4mesh_bgp::session::ConnId;
use bgp4mesh_bgp::speaker::Speaker;
use bgp4mesh_bgp::wire::Codec;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use super::{Inbound, Inbox, canonical};
use crate::bgp_reader::{MessageReader, Received};
use crate::config::{BgpConfig, Transport};
use crate::transport;

/// Reads (of up to 32 KiB) one connection may have queued for the speaker:
/// enough for the reader to decode the next while the speaker works on
/// this one. Decoded, a read takes about six times its bytes; with 8 of
/// them in flight a full table's flap peaked 5 MB higher, for no speed.
const READ_AHEAD: usize = 2;

/// UPDATE bytes a neighbour may have queued for its socket before the
/// speaker holds the rest back as pending slots (4 bytes a prefix): a
/// slow peer, or a fast table to a peer on the same machine, never has a
/// full table encoded and waiting in memory.
pub(super) const SEND_WINDOW: usize = 512 * 1024;

/// How long a closing connection may take to flush what was queued (a
/// NOTIFICATION) before it is torn down anyway: a peer that stopped reading
/// must not keep the socket and its queue alive.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

enum WriterCommand {
    Data(Vec<u8>),
    Close,
}

struct Conn {
    neighbor: NeighborId,
    /// Reads the reader task may have in flight: it stops reading (and
    /// TCP pushes back on the peer) while the speaker is behind, instead
    /// of queueing a whole table in memory.
    credit: Arc<Semaphore>,
    /// Set once the session has negotiated: from then on the reader
    /// decodes what it reads.
    codec: Arc<OnceLock<Codec>>,
    writer: mpsc::UnboundedSender<WriterCommand>,
    reader: JoinHandle<()>,
    writer_task: JoinHandle<()>,
}

impl Conn {
    /// Flushes what is queued, then closes; aborts after [`CLOSE_GRACE`].
    fn close(self) {
        self.reader.abort();
        let _ = self.writer.send(WriterCommand::Close);
        let writer_task = self.writer_task;
        tokio::spawn(async move {
            tokio::time::sleep(CLOSE_GRACE).await;
            writer_task.abort();
        });
    }
}

/// The listeners, connection attempts and open connections.
pub(super) struct Connections {
    inbox: Inbox,
    conns: HashMap<ConnId, Conn>,
    connecting: HashMap<NeighborId, (u64, JoinHandle<()>)>,
    next_conn: ConnId,
    next_attempt: u64,
    listeners: Vec<JoinHandle<()>>,
    /// The listening sockets, for TCP-MD5 keys set at reload.
    listener_sockets: Vec<Arc<TcpListener>>,
    /// Socket options by neighbour name (ids change across reloads).
    transports: HashMap<String, Transport>,
}

fn transports_by_name(config: &BgpConfig) -> HashMap<String, Transport> {
    config
        .speaker
        .neighbors
        .iter()
        .zip(&config.transport)
        .map(|(n, t)| (n.name.clone(), t.clone()))
        .collect()
}

impl Connections {
    /// Binds the listeners; fails (naming the address) when one cannot be.
    pub(super) fn bind(config: &BgpConfig, inbox: &Inbox) -> anyhow::Result<Connections> {
        let mut listeners = Vec::new();
        let mut listener_sockets = Vec::new();
        for addr in &config.listen {
            let listener = Arc::new(
                transport::listen(*addr)
                    .map_err(|e| anyhow::anyhow!("bgp.listen: cannot listen on {addr}: {e}"))?,
            );
            listener_sockets.push(listener.clone());
            // TCP-MD5 keys must be on the listening socket to accept.
            for (n, t) in config.speaker.neighbors.iter().zip(&config.transport) {
                if let Some(password) = &t.password
                    && n.address.is_ipv4() == addr.is_ipv4()
                {
                    transport::set_md5(&listener, n.address, password.as_bytes()).map_err(|e| {
                        anyhow::anyhow!("neighbor {}: cannot set TCP-MD5 key: {e}", n.name)
                    })?;
                }
            }
            listeners.push(tokio::spawn(accept_loop(listener, inbox.clone())));
        }
        Ok(Connections {
            inbox: inbox.clone(),
            conns: HashMap::new(),
            connecting: HashMap::new(),
            next_conn: ConnId(1),
            next_attempt: 1,
            listeners,
            listener_sockets,
            transports: transports_by_name(config),
        })
    }

    fn transport(&self, speaker: &Speaker, neighbor: NeighborId) -> Option<&Transport> {
        self.transports.get(speaker.neighbor_name(neighbor))
    }

    /// Starts a connection attempt to `neighbor`, replacing one under way.
    pub(super) fn connect(&mut self, speaker: &Speaker, neighbor: NeighborId) {
        let Some(status) = speaker.neighbor(neighbor) else {
            return;
        };
        let Some(t) = self.transport(speaker, neighbor).cloned() else {
            return;
        };
        let peer = SocketAddr::new(status.config.address, t.port);
        let attempt = self.next_attempt;
        self.next_attempt += 1;
        let tx = self.inbox.clone();
        let task = tokio::spawn(async move {
            let result = transport::connect(peer, &t).await;
            let _ = tx.send(Inbound::Connected {
                neighbor,
                attempt,
                result,
            });
        });
        if let Some((_, old)) = self.connecting.insert(neighbor, (attempt, task)) {
            old.abort();
        }
    }

    /// Queues bytes for a connection's writer.
    pub(super) fn send(&self, conn: ConnId, bytes: Vec<u8>) {
        if let Some(c) = self.conns.get(&conn) {
            let _ = c.writer.send(WriterCommand::Data(bytes));
        }
    }

    /// Closes a connection once what was queued for it is written.
    pub(super) fn close(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.remove(&conn) {
            c.close();
        }
    }

    /// Closes every connection, each once what was queued is written.
    pub(super) fn close_all(&mut self) {
        for (_, c) in self.conns.drain() {
            c.close();
        }
    }

    /// Stops accepting connections.
    pub(super) fn stop_listening(&self) {
        for l in &self.listeners {
            l.abort();
        }
    }

    pub(super) fn accepted(
        &mut self,
        speaker: &mut Speaker,
        now: Instant,
        stream: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
    ) {
        let peer_ip = canonical(peer.ip());
        let Some(neighbor) = speaker.neighbor_by_address(peer_ip) else {
            tracing::info!("refused BGP connection from {peer}: not a configured neighbor");
            return;
        };
        // A link-local address is the neighbour's only on its interface.
        if let SocketAddr::V6(v6) = peer
            && v6.ip().is_unicast_link_local()
        {
            let interface = self
                .transport(speaker, neighbor)
                .and_then(|t| t.interface.clone());
            let index = interface.as_deref().map(transport::interface_index);
            if !matches!(index, Some(Ok(i)) if i == v6.scope_id()) {
                tracing::info!(
                    "refused BGP connection from {peer}: {} is on interface {}",
                    speaker.neighbor_name(neighbor),
                    interface.as_deref().unwrap_or("?")
                );
                return;
            }
        }
        if let Some(t) = self.transport(speaker, neighbor).cloned()
            && let Err(e) = transport::apply_options(SockRef::from(&stream), peer_ip, &t)
        {
            tracing::warn!(
                "{}: socket options on accepted connection: {e}",
                speaker.neighbor_name(neighbor)
            );
        }
        let _ = stream.set_nodelay(true);
        let conn = self.add_conn(neighbor, stream);
        speaker.tcp_connected(now, neighbor, conn, false, canonical(local.ip()));
    }

    pub(super) fn connected(
        &mut self,
        speaker: &mut Speaker,
        now: Instant,
        neighbor: NeighborId,
        attempt: u64,
        result: std::io::Result<TcpStream>,
    ) {
        if self.connecting.get(&neighbor).map(|(a, _)| *a) != Some(attempt) {
            return; // a newer attempt replaced this one
        }
        self.connecting.remove(&neighbor);
        match result {
            // A neighbour removed by a reload meanwhile: just drop it.
            Ok(_) if speaker.neighbor(neighbor).is_none() => {}
            Ok(stream) => match stream.local_addr() {
                Ok(local) => {
                    let conn = self.add_conn(neighbor, stream);
                    speaker.tcp_connected(now, neighbor, conn, true, canonical(local.ip()));
                }
                Err(e) => speaker.tcp_connect_failed(now, neighbor, &e.to_string()),
            },
            Err(e) => speaker.tcp_connect_failed(now, neighbor, &e.to_string()),
        }
    }

    /// What a connection's reader took from the socket, for the speaker.
    pub(super) fn received(
        &self,
        speaker: &mut Speaker,
        now: Instant,
        conn: ConnId,
        received: Received,
    ) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let neighbor = c.neighbor;
        c.credit.add_permits(1);
        match received {
            Received::Bytes(data) => {
                speaker.received(now, neighbor, conn, &data);
                // The OPENs may be through: hand the reader the codec, so
                // it decodes the table off this task.
                if let Some(c) = self.conns.get(&conn)
                    && c.codec.get().is_none()
                    && let Some(codec) = speaker.codec(neighbor, conn)
                {
                    let _ = c.codec.set(codec);
                }
            }
            Received::Messages(messages) => {
                speaker.received_decoded(now, neighbor, conn, messages);
            }
        }
    }

    pub(super) fn written(&self, speaker: &mut Speaker, now: Instant, conn: ConnId, bytes: usize) {
        if let Some(c) = self.conns.get(&conn) {
            speaker.written(now, c.neighbor, conn, bytes);
        }
    }

    pub(super) fn closed(&mut self, speaker: &mut Speaker, now: Instant, conn: ConnId) {
        if let Some(c) = self.conns.remove(&conn) {
            speaker.tcp_closed(now, c.neighbor, conn);
        }
    }

    /// Takes the socket options of a new config: TCP-MD5 keys on the
    /// listeners follow it at once (an empty key removes one). Returns the
    /// options as they were.
    pub(super) fn set_transports(&mut self, bgp: &BgpConfig) -> HashMap<String, Transport> {
        let old = std::mem::replace(&mut self.transports, transports_by_name(bgp));
        for n in &bgp.speaker.neighbors {
            let (was, now_key) = (
                old.get(&n.name).and_then(|t| t.password.clone()),
                self.transports
                    .get(&n.name)
                    .and_then(|t| t.password.clone()),
            );
            if was != now_key {
                for listener in &self.listener_sockets {
                    let family_matches = listener
                        .local_addr()
                        .is_ok_and(|a| a.is_ipv4() == n.address.is_ipv4());
                    if family_matches
                        && let Err(e) = transport::set_md5(
                            &**listener,
                            n.address,
                            now_key.as_deref().unwrap_or("").as_bytes(),
                        )
                    {
                        tracing::warn!(
                            "neighbor {}: cannot set TCP-MD5 key on the listener: {e}",
                            n.name
                        );
                    }
                }
            }
        }
        old
    }

    /// Socket options by neighbour name.
    pub(super) fn transports(&self) -> &HashMap<String, Transport> {
        &self.transports
    }

    fn add_conn(&mut self, neighbor: NeighborId, stream: TcpStream) -> ConnId {
        let conn = self.next_conn;
        self.next_conn.0 += 1;
        let (read, write) = stream.into_split();
        let (writer, commands) = mpsc::unbounded_channel::<WriterCommand>();
        let credit = Arc::new(Semaphore::new(READ_AHEAD));
        let codec = Arc::new(OnceLock::new());
        let reader = tokio::spawn(read_loop(
            conn,
            read,
            credit.clone(),
            codec.clone(),
            self.inbox.clone(),
        ));
        let writer_task = tokio::spawn(write_loop(conn, write, commands, self.inbox.clone()));
        self.conns.insert(
            conn,
            Conn {
                neighbor,
                credit,
                codec,
                writer,
                reader,
                writer_task,
            },
        );
        conn
    }
}

/// Accepts connections until the BGP task is gone; after an error (out of
/// file descriptors, say) it waits before trying again.
async fn accept_loop(listener: Arc<TcpListener>, tx: Inbox) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let local = stream.local_addr().unwrap_or(peer);
                if tx
                    .send(Inbound::Accepted {
                        stream,
                        peer,
                        local,
                    })
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(
                    "accept on {}: {e}",
                    listener
                        .local_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads whole messages for the speaker, one read in flight per credit.
async fn read_loop(
    conn: ConnId,
    mut read: tokio::net::tcp::OwnedReadHalf,
    credit: Arc<Semaphore>,
    codec: Arc<OnceLock<Codec>>,
    tx: Inbox,
) {
    let mut messages = MessageReader::default();
    loop {
        match credit.acquire().await {
            Ok(permit) => permit.forget(),
            Err(_) => return,
        }
        loop {
            match read.read(messages.space()).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Inbound::Closed { conn });
                    return;
                }
                Ok(n) => messages.filled(n),
            }
            // Nothing whole yet: read on, on the same credit.
            if let Some(received) = messages.take(codec.get()) {
                if tx.send(Inbound::Received { conn, received }).is_err() {
                    return;
                }
                break;
            }
        }
    }
}

/// Writes what the speaker sends, reporting the bytes written in sums.
async fn write_loop(
    conn: ConnId,
    mut write: tokio::net::tcp::OwnedWriteHalf,
    mut commands: mpsc::UnboundedReceiver<WriterCommand>,
    tx: Inbox,
) {
    let mut written = 0;
    while let Some(command) = commands.recv().await {
        match command {
            WriterCommand::Data(bytes) => {
                if write.write_all(&bytes).await.is_err() {
                    let _ = tx.send(Inbound::Closed { conn });
                    return;
                }
                // Reported in sums: the speaker's send window opens as the
                // socket takes what it was given.
                written += bytes.len();
                if written >= SEND_WINDOW / 4 || commands.is_empty() {
                    let bytes = std::mem::take(&mut written);
                    let _ = tx.send(Inbound::Written { conn, bytes });
                }
            }
            WriterCommand::Close => {
                let _ = write.shutdown().await;
                return;
            }
        }
    }
}
