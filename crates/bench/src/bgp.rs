//! `bgp4mesh bench bgp`: full-table scenarios through BIRD, FRR, GoBGP and
//! bgp4mesh in one run, each speaker in namespaces of its own between
//! eBGP injectors and one eBGP monitor.
//!
//! The injectors and the monitor are this binary (`bench bgp-inject`,
//! `bench bgp-monitor`): every UPDATE is encoded before the clock starts,
//! and the monitor only counts prefixes. A null target (`bench
//! bgp-relay`, which copies the injectors' UPDATEs to the monitor as they
//! are) shows how fast the generator and the monitor are on their own.
//!
//! The clock starts when every injector has its session up, the monitor
//! has its session with the speaker up, and the harness says go; it stops
//! at the monitor's stamp. Processes print `word unix-nanoseconds` lines;
//! the harness reads them from their logs, and steers the injectors and
//! the monitor with files in a control directory (`go`, `flap`,
//! `withdraw`).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use bgp4mesh_bgp::wire::{
    AsPath, Capability, Codec, Community, Decoded, Family, MSG_UPDATE, Message, NextHop,
    Notification, Open, Origin, PathAttributes, UpdateBuilder, cease, decode_message, error_code,
    next_frame,
};
use bgp4mesh_lab::peers::{Bird, Frr, Gobgp};
use bgp4mesh_lab::{Lab, Node, Proc};
use bgp4mesh_node::bgp_reader::{MessageReader, Received};
use ipnet::{IpNet, Ipv6Net};

const SPEAKER_AS: u32 = 65000;
/// Injector k is AS 65001 + k.
const INJECTOR_AS: u32 = 65001;
const MONITOR_AS: u32 = 64999;
const SPEAKER_ID: &str = "10.255.0.1";

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn stamp(word: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{word} {}", unix_nanos())?;
    out.flush()?;
    Ok(())
}

fn family_of(addr: IpAddr) -> Family {
    if addr.is_ipv4() {
        Family::IPV4_UNICAST
    } else {
        Family::IPV6_UNICAST
    }
}

/// The n-th prefix of the benchmark: a /24 for IPv4 (1.0.0.0/24 up,
/// skipping 10/8 and 127/8), a /48 under 2400::/12 for IPv6.
fn prefix(family: Family, n: u32) -> IpNet {
    if family == Family::IPV4_UNICAST {
        crate::fib::prefix_v4(n)
    } else {
        let base = (0x2400u128 << 112) | ((n as u128) << 80);
        IpNet::V6(Ipv6Net::new(Ipv6Addr::from(base), 48).unwrap_or_default())
    }
}

/// Hold time offered: not 0, since GoBGP then times out its own writes.
const HOLD_TIME: u16 = 180;

/// One BGP connection of the bench's own speakers (injector, monitor,
/// relay): the socket, cut into whole messages by the daemon's
/// [`MessageReader`].
struct Connection {
    stream: TcpStream,
    reader: MessageReader,
}

impl Connection {
    fn new(stream: TcpStream) -> Connection {
        Connection {
            stream,
            reader: MessageReader::default(),
        }
    }

    /// The whole messages of the next read(s), as bytes: each is decoded,
    /// if at all, where it is used. None: the peer closed the connection.
    fn receive(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            let n = match self.stream.read(self.reader.space()) {
                Ok(n) => n,
                Err(e) => {
                    self.reader.filled(0);
                    return Err(e.into());
                }
            };
            self.reader.filled(n);
            if n == 0 {
                return Ok(None);
            }
            match self.reader.take(None) {
                Some(Received::Bytes(bytes)) => return Ok(Some(bytes)),
                Some(Received::Messages(_)) => bail!("messages decoded without a codec"),
                None => {}
            }
        }
    }

    /// OPEN, then KEEPALIVE both ways; returns the negotiated codec and the
    /// whole messages that came behind the KEEPALIVE in the same read, as
    /// bytes (they are for that codec). Part of a message stays in the
    /// reader.
    fn handshake(&mut self, asn: u32, id: Ipv4Addr, family: Family) -> Result<(Codec, Vec<u8>)> {
        let open = Open::new(
            asn,
            HOLD_TIME,
            id,
            vec![Capability::Multiprotocol(family), Capability::RouteRefresh],
        );
        self.stream
            .write_all(&Message::Open(open).encode(&Codec::INITIAL))?;
        let mut four_octet = false;
        loop {
            let bytes = self
                .receive()?
                .context("the peer closed the connection during the handshake")?;
            let mut end = 0;
            for (_, message) in messages(&bytes, &Codec::INITIAL)? {
                end += message.len();
                match decode_message(message, &Codec::INITIAL)
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                {
                    Decoded::Message(Message::Open(o)) => {
                        four_octet = o.four_octet_as().is_some();
                        self.stream
                            .write_all(&Message::Keepalive.encode(&Codec::INITIAL))?;
                    }
                    Decoded::Message(Message::Keepalive) => {
                        let codec = Codec {
                            four_octet_as: four_octet,
                            extended_message: false,
                            ebgp: true,
                        };
                        return Ok((codec, bytes[end..].to_vec()));
                    }
                    Decoded::Message(Message::Notification(n)) => bail!("the peer refused: {n}"),
                    _ => {}
                }
            }
        }
    }
}

/// Whole messages back to back (what [`MessageReader`] passes on as bytes),
/// each with its type, as the codec frames them.
fn messages<'a>(bytes: &'a [u8], codec: &Codec) -> Result<Vec<(u8, &'a [u8])>> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Some((kind, len)) = next_frame(rest, codec).map_err(|e| anyhow::anyhow!("{e}"))? {
        let (message, after) = rest.split_at(len);
        out.push((kind, message));
        rest = after;
    }
    Ok(out)
}

fn connect(peer: IpAddr, within: Duration) -> Result<TcpStream> {
    let start = Instant::now();
    loop {
        match TcpStream::connect(SocketAddr::new(peer, 179)) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) if start.elapsed() > within => {
                bail!("cannot connect to {peer}:179 within {within:?}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Sends a KEEPALIVE every 30 s through `stream` (shared with the sender,
/// so messages never interleave) until the connection fails.
fn keep_alive(stream: Arc<Mutex<TcpStream>>) {
    std::thread::spawn(move || {
        let keepalive = Message::Keepalive.encode(&Codec::INITIAL);
        loop {
            std::thread::sleep(Duration::from_secs(30));
            let Ok(mut s) = stream.lock() else { return };
            if s.write_all(&keepalive).is_err() {
                return;
            }
        }
    });
}

/// Reads and drops whatever the speaker sends, until it closes.
fn drain(stream: &TcpStream) -> Result<()> {
    let mut reader = stream.try_clone()?;
    std::thread::spawn(move || {
        let mut sink = vec![0u8; 1 << 16];
        while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
    });
    Ok(())
}

/// What one injector sends.
#[derive(Debug, Clone)]
pub struct InjectArgs {
    pub peer: IpAddr,
    pub local: IpAddr,
    pub asn: u32,
    pub router_id: Ipv4Addr,
    /// Index of its first prefix, and how many.
    pub first: u32,
    pub prefixes: u32,
    /// Distinct attribute sets among them.
    pub paths: u32,
    pub control: PathBuf,
}

/// The announcements and the withdrawals of one injector, encoded.
fn encode_table(args: &InjectArgs) -> (Vec<u8>, Vec<u8>) {
    let family = family_of(args.peer);
    let paths = args.paths.clamp(1, args.prefixes.max(1));
    let mut groups: Vec<Vec<IpNet>> = vec![Vec::new(); paths as usize];
    for i in 0..args.prefixes {
        groups[(i % paths) as usize].push(prefix(family, args.first + i));
    }
    let codec = Codec {
        four_octet_as: true,
        extended_message: false,
        ebgp: true,
    };
    let builder = UpdateBuilder::new(codec);
    let next_hop = match args.local {
        IpAddr::V4(a) => NextHop::V4(a),
        IpAddr::V6(global) => NextHop::V6 {
            global,
            link_local: None,
        },
    };
    let mut announce = Vec::with_capacity(args.prefixes as usize * 8);
    let mut withdraw = Vec::with_capacity(args.prefixes as usize * 5);
    // Attribute sets differ from one injector to the next too.
    let salt = args.first / args.prefixes.max(1) * paths;
    for (i, group) in groups.iter().enumerate() {
        let i = i as u32 + salt;
        let attrs = PathAttributes {
            origin: Origin::Igp,
            as_path: AsPath::sequence([args.asn, 64512 + (i % 400), 4_200_000_000 + i / 400]),
            next_hop: Some(next_hop),
            communities: vec![Community::new(65001, (i % 65535) as u16)],
            ..PathAttributes::default()
        };
        builder.announce(&mut announce, &attrs, group);
        builder.withdraw(&mut withdraw, group);
    }
    (announce, withdraw)
}

/// `bench bgp-inject`: connects to the speaker, prints `ready`, waits for
/// `go` in the control directory, sends its table (`start`, `sent`); on
/// `flap` it resets the session (`drop`) and sends the table again on a
/// new one (`restart`, `resent`); on `withdraw` it withdraws every prefix.
pub fn inject(args: &InjectArgs) -> Result<()> {
    let family = family_of(args.peer);
    let (announce, withdraw) = encode_table(args);
    let session = |within: Duration| -> Result<(Arc<Mutex<TcpStream>>, Codec)> {
        let mut tries = 0;
        loop {
            let mut conn = Connection::new(connect(args.peer, within)?);
            match conn.handshake(args.asn, args.router_id, family) {
                Ok((codec, _)) => {
                    ensure!(codec.four_octet_as, "the speaker does not speak 4-octet AS");
                    drain(&conn.stream)?;
                    let stream = Arc::new(Mutex::new(conn.stream));
                    keep_alive(stream.clone());
                    return Ok((stream, codec));
                }
                // Some speakers refuse a new session while they clean up
                // the old one.
                Err(_) if tries < 600 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    };
    let send = |stream: &Mutex<TcpStream>, bytes: &[u8]| -> Result<()> {
        stream
            .lock()
            .map_err(|_| anyhow::anyhow!("stream lock poisoned"))?
            .write_all(bytes)?;
        Ok(())
    };
    let (mut stream, codec) = session(Duration::from_secs(120))?;
    stamp("ready")?;
    wait_for_file(&args.control.join("go"));
    stamp("start")?;
    send(&stream, &announce)?;
    stamp("sent")?;
    let (mut flapped, mut withdrawn) = (false, false);
    loop {
        if !flapped && args.control.join("flap").exists() {
            flapped = true;
            let reset = Notification::new(error_code::CEASE, cease::ADMIN_RESET, vec![]);
            stamp("drop")?;
            // The speaker may already be gone; the new session is what counts.
            let _ = send(&stream, &Message::Notification(reset).encode(&codec));
            if let Ok(s) = stream.lock() {
                let _ = s.shutdown(Shutdown::Both);
            }
            stream = session(Duration::from_secs(300))?.0;
            stamp("restart")?;
            send(&stream, &announce)?;
            stamp("resent")?;
        }
        if !withdrawn && args.control.join("withdraw").exists() {
            withdrawn = true;
            stamp("withdraw")?;
            send(&stream, &withdraw)?;
            stamp("withdrawn")?;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn wait_for_file(path: &Path) {
    while !path.exists() {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `bench bgp-monitor`: accepts the speaker's connection (`established`)
/// and counts the prefixes it has: `full` each time it reaches `expect`
/// from below, `empty` each time it falls to 0. Once `flap` exists in the
/// control directory, `back` when every prefix has been announced again
/// since, or the count fell below `expect` since and is whole again.
/// The prefixes the monitor holds: a bit per /24 (IPv4) or per /48 of
/// 2400::/16 (IPv6), the shapes the injectors send, and a hash set for
/// anything else. A hash set of a million prefixes made the monitor as
/// busy as the speaker under test, on the same two cores.
#[derive(Default)]
struct PrefixSet {
    bits: Vec<u64>,
    count: usize,
    other: HashSet<IpNet>,
}

impl PrefixSet {
    fn bit(p: &IpNet) -> Option<usize> {
        match p {
            IpNet::V4(n) if n.prefix_len() == 24 => Some((u32::from(n.addr()) >> 8) as usize),
            IpNet::V6(n) if n.prefix_len() == 48 && n.addr().segments()[0] == 0x2400 => {
                usize::try_from((u128::from(n.addr()) >> 80) as u32).ok()
            }
            _ => None,
        }
    }

    fn insert(&mut self, p: &IpNet) {
        match Self::bit(p) {
            Some(i) => {
                if self.bits.len() <= i / 64 {
                    self.bits.resize(i / 64 + 1, 0);
                }
                let (word, mask) = (&mut self.bits[i / 64], 1u64 << (i % 64));
                if *word & mask == 0 {
                    *word |= mask;
                    self.count += 1;
                }
            }
            None => {
                self.other.insert(*p);
            }
        }
    }

    fn remove(&mut self, p: &IpNet) {
        match Self::bit(p) {
            Some(i) => {
                if let Some(word) = self.bits.get_mut(i / 64) {
                    let mask = 1u64 << (i % 64);
                    if *word & mask != 0 {
                        *word &= !mask;
                        self.count -= 1;
                    }
                }
            }
            None => {
                self.other.remove(p);
            }
        }
    }

    fn len(&self) -> usize {
        self.count + self.other.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub fn monitor(listen: IpAddr, expect: u32, control: &Path) -> Result<()> {
    let listener = TcpListener::bind(SocketAddr::new(listen, 179))?;
    let (stream, _) = listener.accept()?;
    let mut conn = Connection::new(stream);
    let id = match listen {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => Ipv4Addr::new(10, 255, 0, 2),
    };
    let (codec, rest) = conn.handshake(MONITOR_AS, id, family_of(listen))?;
    keep_alive(Arc::new(Mutex::new(conn.stream.try_clone()?)));
    stamp("established")?;
    let expect = expect as usize;
    let mut seen = PrefixSet::default();
    let mut again: Option<PrefixSet> = None;
    let mut flap_seen = false;
    let mut dipped = false;
    let mut full = false;
    let mut had_any = false;
    // What came behind the speaker's KEEPALIVE, then each read's whole
    // messages. Each UPDATE is decoded and counted before the next is
    // decoded: a read's worth decoded at once (`MessageReader::take` with
    // the codec) took the null target's 1M load from 0.07 s to 0.10 s.
    let mut bytes = rest;
    loop {
        if !flap_seen && control.join("flap").exists() {
            flap_seen = true;
            again = Some(PrefixSet::default());
        }
        for (kind, message) in messages(&bytes, &codec)? {
            if kind != MSG_UPDATE {
                continue;
            }
            // An UPDATE the codec refuses counts as nothing, as before.
            let Ok(Decoded::Update(u)) = decode_message(message, &codec) else {
                continue;
            };
            for p in u.withdrawn() {
                seen.remove(p);
                if let Some(again) = again.as_mut() {
                    again.remove(p);
                }
            }
            let announced = u
                .update
                .nlri
                .iter()
                .chain(u.update.mp_reach.iter().flat_map(|m| m.nlri.iter()));
            for p in announced {
                seen.insert(p);
                if let Some(again) = again.as_mut() {
                    again.insert(p);
                }
            }
        }
        if !full && seen.len() >= expect {
            full = true;
            stamp("full")?;
        } else if full && seen.len() < expect {
            full = false;
        }
        if had_any && seen.is_empty() {
            had_any = false;
            stamp("empty")?;
        } else if !seen.is_empty() {
            had_any = true;
        }
        // Back: every prefix announced again since the flap, or (for a
        // speaker that sends only what changed, as FRR does) the count
        // fell and is whole again.
        if flap_seen && !full && again.is_some() {
            dipped = true;
        }
        if full
            && (again.as_ref().is_some_and(|a| a.len() >= expect) || (dipped && again.is_some()))
        {
            again = None;
            stamp("back")?;
        }
        bytes = conn.receive()?.with_context(|| {
            format!(
                "the speaker closed the connection with {} prefixes",
                seen.len()
            )
        })?;
    }
}

/// `bench bgp-relay`: the null target. Connects to the monitor, accepts
/// `injectors` sessions and copies their UPDATEs to the monitor as they
/// are.
pub fn relay(monitor: IpAddr, injectors: u32) -> Result<()> {
    let family = family_of(monitor);
    let mut upstream = Connection::new(connect(monitor, Duration::from_secs(60))?);
    let id: Ipv4Addr = SPEAKER_ID.parse()?;
    let (codec, _) = upstream.handshake(SPEAKER_AS, id, family)?;
    let upstream = Arc::new(Mutex::new(upstream.stream));
    keep_alive(upstream.clone());
    let listener = TcpListener::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 179))?;
    let mut threads = Vec::new();
    for _ in 0..injectors {
        let (stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        let mut conn = Connection::new(stream);
        let (_, rest) = conn.handshake(SPEAKER_AS, id, family)?;
        keep_alive(Arc::new(Mutex::new(conn.stream.try_clone()?)));
        let upstream = upstream.clone();
        threads.push(std::thread::spawn(move || -> Result<()> {
            // Whole messages as they came, not decoded: the UPDATEs go on
            // as they are.
            let mut bytes = rest;
            loop {
                let mut out = Vec::with_capacity(bytes.len());
                for (kind, message) in messages(&bytes, &codec)? {
                    if kind == MSG_UPDATE {
                        out.extend_from_slice(message);
                    }
                }
                if !out.is_empty() {
                    let mut up = upstream
                        .lock()
                        .map_err(|_| anyhow::anyhow!("relay lock poisoned"))?;
                    up.write_all(&out)?;
                }
                match conn.receive()? {
                    Some(next) => bytes = next,
                    None => return Ok(()),
                }
            }
        }));
    }
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a relay thread panicked"))??;
    }
    // Keep the monitor's session up.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// What `bench bgp` can put between the injectors and the monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The relay: the generator and the monitor alone.
    Null,
    Bird,
    Frr,
    Gobgp,
    Bgp4mesh,
}

impl Target {
    pub fn parse(s: &str) -> Result<Target> {
        Ok(match s {
            "null" => Target::Null,
            "bird" => Target::Bird,
            "frr" => Target::Frr,
            "gobgp" => Target::Gobgp,
            "bgp4mesh" => Target::Bgp4mesh,
            other => bail!("unknown target {other:?}: null, bird, frr, gobgp or bgp4mesh"),
        })
    }

    fn label(self) -> &'static str {
        match self {
            Target::Null => "null",
            Target::Bird => "BIRD",
            Target::Frr => "FRR",
            Target::Gobgp => "GoBGP",
            Target::Bgp4mesh => "bgp4mesh",
        }
    }
}

/// The scenarios of `bench bgp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// One injector with the IPv4 table, then a flap, then a full
    /// withdrawal, in one session of the speaker.
    Ipv4,
    Ipv6,
    /// Many injectors, distinct prefixes each.
    Many,
}

impl Scenario {
    pub fn parse(s: &str) -> Result<Scenario> {
        Ok(match s {
            "ipv4" => Scenario::Ipv4,
            "ipv6" => Scenario::Ipv6,
            "many" => Scenario::Many,
            other => bail!("unknown scenario {other:?}: ipv4, ipv6 or many"),
        })
    }
}

/// `bench bgp`'s sizes.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub prefixes: u32,
    pub paths: u32,
    pub v6_prefixes: u32,
    pub injectors: u32,
    pub per_injector: u32,
    pub targets: Vec<Target>,
    pub scenarios: Vec<Scenario>,
    /// Give up on one measurement after this long.
    pub timeout: Duration,
    /// Runs of everything; the table shows each median.
    pub runs: u32,
}

/// One measured row.
struct Row {
    case: String,
    target: Target,
    /// None: not measured (the target cannot, or it timed out: `note`).
    seconds: Option<f64>,
    rss_mb: Option<f64>,
    note: String,
}

fn peak_rss_mb(pid: u32) -> Option<f64> {
    crate::fib::vm_mb(pid, "VmHWM").ok()
}

/// The `n`-th (from 0) stamp `word` in `proc`'s log that is later than
/// `after`.
fn read_stamp(lab: &Lab, proc: &Proc, word: &str, after: u128, timeout: Duration) -> Result<u128> {
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(&proc.log).unwrap_or_default();
        let found = log.lines().find_map(|l| {
            let rest = l.strip_prefix(word)?.strip_prefix(' ')?;
            let t: u128 = rest.trim().parse().ok()?;
            (t > after).then_some(t)
        });
        if let Some(t) = found {
            return Ok(t);
        }
        if start.elapsed() > timeout {
            bail!(
                "no `{word}` from {} within {timeout:?}: {}",
                proc.name,
                lab.log_tail(proc, 10)
            );
        }
        if !lab.is_running(proc) {
            bail!("{} exited: {}", proc.name, lab.log_tail(proc, 10));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn secs(from: u128, to: u128) -> f64 {
    to.saturating_sub(from) as f64 / 1e9
}

/// One side of an eBGP session of the speaker: its address and the peer's.
#[derive(Debug, Clone, Copy)]
struct Peering {
    local: IpAddr,
    peer: IpAddr,
    asn: u32,
}

/// A lab with the target between `injectors` injectors and a monitor,
/// every session up and the injectors waiting for `go`.
struct Bed {
    lab: Lab,
    control: PathBuf,
    speaker: Option<Proc>,
    injectors: Vec<Proc>,
    monitor: Proc,
}

fn build_bed(
    target: Target,
    v6: bool,
    injectors: u32,
    per_injector: u32,
    paths_per_injector: u32,
    timeout: Duration,
) -> Result<Bed> {
    let lab = Lab::new(&format!("bench-bgp-{}", target.label().to_lowercase()))?;
    let dut = lab.add_node("speaker")?;
    let mon = lab.add_node("monitor")?;
    let pick = |i: &bgp4mesh_lab::Iface| -> IpAddr {
        if v6 {
            IpAddr::V6(i.ipv6)
        } else {
            IpAddr::V4(i.ipv4)
        }
    };
    let mut inj_nodes = Vec::new();
    let mut peerings = Vec::new();
    for k in 0..injectors {
        let node = lab.add_node(&format!("injector{k}"))?;
        let (far, near) = lab.link(&node, &dut)?;
        peerings.push(Peering {
            local: pick(&near),
            peer: pick(&far),
            asn: INJECTOR_AS + k,
        });
        inj_nodes.push(node);
    }
    let (near, far) = lab.link(&dut, &mon)?;
    let monitor_peering = Peering {
        local: pick(&near),
        peer: pick(&far),
        asn: MONITOR_AS,
    };
    let control = lab.run_dir(&mon)?.join("control");
    std::fs::create_dir_all(&control)?;
    let binary = std::env::current_exe()?.to_string_lossy().into_owned();
    let control_arg = control.to_string_lossy().into_owned();
    let expect = (injectors * per_injector).to_string();
    let monitor = lab.spawn(
        &mon,
        "monitor",
        &[
            &binary,
            "bench",
            "bgp-monitor",
            "--listen",
            &monitor_peering.peer.to_string(),
            "--expect",
            &expect,
            "--control",
            &control_arg,
        ],
    )?;
    let speaker = start_target(&lab, &dut, target, &binary, &peerings, monitor_peering, v6)?;
    read_stamp(&lab, &monitor, "established", 0, timeout)
        .with_context(|| format!("{} never connected to the monitor", target.label()))?;
    let mut procs = Vec::new();
    for (k, (node, p)) in inj_nodes.iter().zip(&peerings).enumerate() {
        let k = k as u32;
        let args = [
            binary.clone(),
            "bench".into(),
            "bgp-inject".into(),
            "--peer".into(),
            p.local.to_string(),
            "--local".into(),
            p.peer.to_string(),
            "--asn".into(),
            p.asn.to_string(),
            "--router-id".into(),
            Ipv4Addr::new(10, 254, 0, k as u8 + 1).to_string(),
            "--first".into(),
            (k * per_injector).to_string(),
            "--prefixes".into(),
            per_injector.to_string(),
            "--paths".into(),
            paths_per_injector.to_string(),
            "--control".into(),
            control_arg.clone(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        procs.push(lab.spawn(node, &format!("injector{k}"), &args)?);
    }
    for p in &procs {
        read_stamp(&lab, p, "ready", 0, timeout)?;
    }
    Ok(Bed {
        lab,
        control,
        speaker,
        injectors: procs,
        monitor,
    })
}

impl Bed {
    fn touch(&self, name: &str) -> Result<()> {
        std::fs::write(self.control.join(name), b"")?;
        Ok(())
    }

    fn rss(&self) -> Option<f64> {
        self.speaker.as_ref().and_then(|p| peak_rss_mb(p.pid))
    }

    /// Touches `trigger`; the earliest stamp `word` of the injectors after
    /// it.
    fn trigger(&self, trigger: &str, word: &str, timeout: Duration) -> Result<u128> {
        let before = unix_nanos();
        self.touch(trigger)?;
        let mut start = u128::MAX;
        for p in &self.injectors {
            start = start.min(read_stamp(&self.lab, p, word, before, timeout)?);
        }
        Ok(start)
    }

    /// Starts every injector; seconds until the monitor has everything.
    fn load(&self, timeout: Duration) -> Result<f64> {
        let start = self.trigger("go", "start", timeout)?;
        let full = read_stamp(&self.lab, &self.monitor, "full", start, timeout)?;
        Ok(secs(start, full))
    }

    /// Resets the first injector's session: seconds from the reset until
    /// the monitor has had every prefix announced again.
    fn flap(&self, timeout: Duration) -> Result<f64> {
        let before = unix_nanos();
        self.touch("flap")?;
        let drop = read_stamp(&self.lab, &self.injectors[0], "drop", before, timeout)?;
        let back = read_stamp(&self.lab, &self.monitor, "back", drop, timeout)?;
        Ok(secs(drop, back))
    }

    /// Every injector withdraws everything: seconds until the monitor has
    /// nothing left.
    fn withdraw(&self, timeout: Duration) -> Result<f64> {
        let start = self.trigger("withdraw", "withdraw", timeout)?;
        let empty = read_stamp(&self.lab, &self.monitor, "empty", start, timeout)?;
        Ok(secs(start, empty))
    }
}

fn start_target(
    lab: &Lab,
    node: &Node,
    target: Target,
    binary: &str,
    injectors: &[Peering],
    monitor: Peering,
    v6: bool,
) -> Result<Option<Proc>> {
    let fam = if v6 { "ipv6" } else { "ipv4" };
    match target {
        Target::Null => {
            lab.spawn(
                node,
                "relay",
                &[
                    binary,
                    "bench",
                    "bgp-relay",
                    "--monitor",
                    &monitor.peer.to_string(),
                    "--injectors",
                    &injectors.len().to_string(),
                ],
            )?;
            Ok(None)
        }
        Target::Bgp4mesh => {
            let mut config = format!("[bgp]\nasn = {SPEAKER_AS}\nrouter_id = \"{SPEAKER_ID}\"\n\n");
            for (k, p) in injectors.iter().enumerate() {
                config.push_str(&format!(
                    "[[bgp.neighbor]]\nname = \"injector{k}\"\naddress = \"{}\"\nremote_as = {}\n\
                     families = [\"{fam}\"]\nimport = \"all\"\nexport = \"none\"\npassive = true\n\n",
                    p.peer, p.asn
                ));
            }
            config.push_str(&format!(
                "[[bgp.neighbor]]\nname = \"monitor\"\naddress = \"{}\"\nremote_as = {MONITOR_AS}\n\
                 families = [\"{fam}\"]\nimport = \"none\"\nexport = \"all\"\nconnect_retry = 1\n\n\
                 [kernel]\nenabled = false\n",
                monitor.peer
            ));
            let b = bgp4mesh_lab::peers::Bgp4mesh::start(lab, node, Path::new(binary), &config)?;
            Ok(Some(b.proc().clone()))
        }
        Target::Bird => {
            let mut config = format!("router id {SPEAKER_ID};\nprotocol device {{}}\n");
            for (k, p) in injectors.iter().enumerate() {
                config.push_str(&format!(
                    "protocol bgp injector{k} {{ local {} as {SPEAKER_AS}; neighbor {} as {}; passive on; \
                     error wait time 1, 2; {fam} {{ import all; export none; }}; }}\n",
                    p.local, p.peer, p.asn
                ));
            }
            config.push_str(&format!(
                "protocol bgp monitor {{ local {} as {SPEAKER_AS}; neighbor {} as {MONITOR_AS}; \
                 connect delay time 1; connect retry time 1; {fam} {{ import none; export all; }}; }}\n",
                monitor.local, monitor.peer
            ));
            let b = Bird::start(lab, node, &config)?;
            Ok(Some(b.proc().clone()))
        }
        Target::Frr => {
            let mut config = format!(
                "frr defaults traditional\nhostname speaker\nroute-map NONE deny 10\n!\n\
                 router bgp {SPEAKER_AS}\n bgp router-id {SPEAKER_ID}\n no bgp ebgp-requires-policy\n\
                 no bgp default ipv4-unicast\n no bgp network import-check\n"
            );
            for p in injectors {
                config.push_str(&format!(
                    " neighbor {} remote-as {}\n neighbor {} passive\n",
                    p.peer, p.asn, p.peer
                ));
            }
            config.push_str(&format!(
                " neighbor {m} remote-as {MONITOR_AS}\n neighbor {m} timers connect 1\n address-family {fam} unicast\n",
                m = monitor.peer
            ));
            for p in injectors {
                config.push_str(&format!(
                    "  neighbor {p} activate\n  neighbor {p} route-map NONE out\n",
                    p = p.peer
                ));
            }
            config.push_str(&format!(
                "  neighbor {m} activate\n  neighbor {m} route-map NONE in\n exit-address-family\n",
                m = monitor.peer
            ));
            let f = Frr::start(lab, node, &config)?;
            Ok(Some(f.proc().clone()))
        }
        Target::Gobgp => {
            let mut config = format!(
                "[global.config]\n  as = {SPEAKER_AS}\n  router-id = \"{SPEAKER_ID}\"\n  port = 179\n"
            );
            let afi = format!("{fam}-unicast");
            for p in injectors {
                config.push_str(&format!(
                    "[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{}\"\n    peer-as = {}\n\
                     [neighbors.transport.config]\n    passive-mode = true\n    local-address = \"{}\"\n\
                     [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      afi-safi-name = \"{afi}\"\n\
                     [neighbors.apply-policy.config]\n    default-export-policy = \"reject-route\"\n",
                    p.peer, p.asn, p.local
                ));
            }
            config.push_str(&format!(
                "[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{}\"\n    peer-as = {MONITOR_AS}\n\
                 [neighbors.timers.config]\n    connect-retry = 1\n\
                 [neighbors.transport.config]\n    local-address = \"{}\"\n\
                 [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      afi-safi-name = \"{afi}\"\n",
                monitor.peer, monitor.local
            ));
            let g = Gobgp::start(lab, node, &config)?;
            Ok(Some(g.proc().clone()))
        }
    }
}

fn measure(rows: &mut Vec<Row>, case: &str, target: Target, rss: Option<f64>, result: Result<f64>) {
    match result {
        Ok(s) => {
            println!("  {:<24} {:<9} {s:>8.2} s", case, target.label());
            rows.push(Row {
                case: case.into(),
                target,
                seconds: Some(s),
                rss_mb: rss,
                note: String::new(),
            });
        }
        Err(e) => {
            let note = format!("{e:#}").lines().next().unwrap_or("").to_string();
            println!("  {:<24} {:<9} failed: {note}", case, target.label());
            rows.push(Row {
                case: case.into(),
                target,
                seconds: None,
                rss_mb: rss,
                note,
            });
        }
    }
}

fn run_scenario(opts: &BenchOptions, scenario: Scenario, target: Target, rows: &mut Vec<Row>) {
    let t = opts.timeout;
    match scenario {
        Scenario::Ipv4 => {
            let load = format!("{}k IPv4, 1 injector", opts.prefixes / 1000);
            let bed = match build_bed(target, false, 1, opts.prefixes, opts.paths, t) {
                Ok(b) => b,
                Err(e) => return measure(rows, &load, target, None, Err(e)),
            };
            let r = bed.load(t);
            let ok = r.is_ok();
            measure(rows, &load, target, bed.rss(), r);
            if !ok {
                return;
            }
            if target == Target::Null {
                // The relay keeps no table: a flap withdraws nothing.
                rows.push(Row {
                    case: "flap".into(),
                    target,
                    seconds: None,
                    rss_mb: None,
                    note: "the relay keeps no table".into(),
                });
            } else {
                let r = bed.flap(t);
                let ok = r.is_ok();
                measure(rows, "flap", target, bed.rss(), r);
                if !ok {
                    return;
                }
            }
            let r = bed.withdraw(t);
            measure(rows, "full withdrawal", target, bed.rss(), r);
        }
        Scenario::Ipv6 => {
            let case = format!("{}k IPv6, 1 injector", opts.v6_prefixes / 1000);
            let bed = build_bed(
                target,
                true,
                1,
                opts.v6_prefixes,
                (opts.paths / 5).max(1),
                t,
            );
            measure_load(rows, &case, target, bed, t);
        }
        Scenario::Many => {
            let case = format!(
                "{} injectors x {}k",
                opts.injectors,
                opts.per_injector / 1000
            );
            let paths = (opts.paths / opts.injectors.max(1)).max(1);
            let bed = build_bed(target, false, opts.injectors, opts.per_injector, paths, t);
            measure_load(rows, &case, target, bed, t);
        }
    }
}

/// The load of a freshly built bed, as one row.
fn measure_load(rows: &mut Vec<Row>, case: &str, target: Target, bed: Result<Bed>, t: Duration) {
    match bed.and_then(|bed| Ok((bed.load(t)?, bed.rss()))) {
        Ok((s, rss)) => measure(rows, case, target, rss, Ok(s)),
        Err(e) => measure(rows, case, target, None, Err(e)),
    }
}

/// `bench bgp`: every scenario through every target, then one table with
/// ratios to BIRD.
pub fn bgp(opts: &BenchOptions) -> Result<()> {
    println!(
        "bench bgp: {} IPv4 prefixes / {} attribute sets; {} IPv6; {} injectors x {}",
        opts.prefixes, opts.paths, opts.v6_prefixes, opts.injectors, opts.per_injector
    );
    // Each run goes through every target in turn, so a noisy spell of the
    // machine hits them alike; the table takes each one's median.
    let mut all = Vec::new();
    for run in 0..opts.runs.max(1) {
        if opts.runs > 1 {
            println!("run {} of {}", run + 1, opts.runs);
        }
        for &scenario in &opts.scenarios {
            for &target in &opts.targets {
                run_scenario(opts, scenario, target, &mut all);
            }
        }
    }
    let mut rows: Vec<Row> = Vec::new();
    for row in &all {
        if rows
            .iter()
            .any(|r| r.case == row.case && r.target == row.target)
        {
            continue;
        }
        let same: Vec<&Row> = all
            .iter()
            .filter(|r| r.case == row.case && r.target == row.target)
            .collect();
        let mut times: Vec<f64> = same.iter().filter_map(|r| r.seconds).collect();
        times.sort_by(f64::total_cmp);
        let failed = same.len() - times.len();
        let note = match (failed, same.iter().find(|r| !r.note.is_empty())) {
            (n, Some(r)) if n == same.len() && same.iter().all(|x| x.note == r.note) => {
                r.note.clone()
            }
            (0, Some(r)) => r.note.clone(),
            (0, None) if same.len() > 1 => format!(
                "median of {}: {:.2}-{:.2} s",
                times.len(),
                times.first().copied().unwrap_or(0.0),
                times.last().copied().unwrap_or(0.0)
            ),
            (0, None) => String::new(),
            (n, r) => format!(
                "{n} of {} failed: {}",
                same.len(),
                r.map(|r| r.note.as_str()).unwrap_or("")
            ),
        };
        rows.push(Row {
            case: row.case.clone(),
            target: row.target,
            seconds: (!times.is_empty()).then(|| times[times.len() / 2]),
            rss_mb: same.iter().filter_map(|r| r.rss_mb).reduce(f64::max),
            note,
        });
    }
    println!();
    println!(
        "{:<24} {:<9} {:>9} {:>12} {:>10} {:>9}  note",
        "case", "speaker", "seconds", "peak RSS MB", "time/BIRD", "RSS/BIRD"
    );
    for row in &rows {
        let bird = rows
            .iter()
            .find(|r| r.case == row.case && r.target == Target::Bird);
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        let fmt = |v: Option<f64>, d: usize| v.map_or("-".into(), |v| format!("{v:.d$}"));
        println!(
            "{:<24} {:<9} {:>9} {:>12} {:>10} {:>9}  {}",
            row.case,
            row.target.label(),
            fmt(row.seconds, 2),
            fmt(row.rss_mb, 1),
            ratio(row.seconds, bird.and_then(|b| b.seconds)),
            ratio(row.rss_mb, bird.and_then(|b| b.rss_mb)),
            row.note
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monitors_prefix_set_counts_each_prefix_once() {
        let mut set = PrefixSet::default();
        let v4 = prefix(Family::IPV4_UNICAST, 7);
        let v6 = prefix(Family::IPV6_UNICAST, 7);
        let odd: IpNet = "10.1.2.128/25".parse().expect("prefix");
        for p in [&v4, &v4, &v6, &odd, &odd] {
            set.insert(p);
        }
        assert_eq!(set.len(), 3);
        assert!(set.other.contains(&odd), "a shape without a bit is hashed");
        set.remove(&v4);
        set.remove(&v4);
        set.remove(&"1.2.3.0/24".parse().expect("prefix"));
        assert_eq!(set.len(), 2);
        set.remove(&v6);
        set.remove(&odd);
        assert!(set.is_empty());
    }

    /// The speaker's OPEN, KEEPALIVE and first UPDATEs in one write, the
    /// second UPDATE cut in two: the first comes back from the handshake,
    /// the second whole from the next read, both for the negotiated codec.
    #[test]
    fn what_comes_behind_the_keepalive_is_kept_for_the_session() -> Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let table = |first| {
            encode_table(&InjectArgs {
                peer: addr.ip(),
                local: addr.ip(),
                asn: 65001,
                router_id: Ipv4Addr::new(10, 0, 0, 1),
                first,
                prefixes: 3,
                paths: 1,
                control: PathBuf::new(),
            })
            .0
        };
        let (first, second) = (table(0), table(3));
        let speaker = std::thread::spawn(move || -> Result<()> {
            let (mut stream, _) = listener.accept()?;
            let open = Open::new(65000, HOLD_TIME, Ipv4Addr::new(10, 0, 0, 2), vec![]);
            let mut burst = Message::Open(open).encode(&Codec::INITIAL);
            burst.extend(Message::Keepalive.encode(&Codec::INITIAL));
            burst.extend(&first);
            burst.extend(&second[..10]);
            stream.write_all(&burst)?;
            std::thread::sleep(Duration::from_millis(50));
            stream.write_all(&second[10..])?;
            // Our OPEN and KEEPALIVE, then the close.
            let mut sink = Vec::new();
            stream.read_to_end(&mut sink)?;
            Ok(())
        });
        let mut conn = Connection::new(TcpStream::connect(addr)?);
        let (codec, rest) =
            conn.handshake(64999, Ipv4Addr::new(10, 0, 0, 3), Family::IPV4_UNICAST)?;
        assert!(codec.four_octet_as);
        let nlri = |decoded: Result<Decoded, Notification>| match decoded {
            Ok(Decoded::Update(u)) => u.update.nlri.iter().map(|p| p.to_string()).collect(),
            other => panic!("not an UPDATE: {other:?}"),
        };
        let behind: Vec<Vec<String>> = messages(&rest, &codec)?
            .into_iter()
            .map(|(_, m)| nlri(decode_message(m, &codec)))
            .collect();
        assert_eq!(behind, [["1.0.0.0/24", "1.0.1.0/24", "1.0.2.0/24"]]);
        let next = conn.receive()?.context("no second UPDATE")?;
        let next: Vec<Vec<String>> = messages(&next, &codec)?
            .into_iter()
            .map(|(_, m)| nlri(decode_message(m, &codec)))
            .collect();
        assert_eq!(next, [["1.0.3.0/24", "1.0.4.0/24", "1.0.5.0/24"]]);
        conn.stream.shutdown(Shutdown::Both)?;
        speaker
            .join()
            .map_err(|_| anyhow::anyhow!("the speaker panicked"))?
    }
}
