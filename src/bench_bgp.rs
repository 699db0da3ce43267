//! `bgp4mesh bench bgp`: one eBGP injector → speaker under test → one eBGP
//! monitor, in network namespaces; time from the first UPDATE sent to the
//! last prefix seen by the monitor, and the speaker's peak RSS.
//!
//! The injector and the monitor are this binary (`bench bgp-inject`,
//! `bench bgp-monitor`): the UPDATEs are encoded before the clock starts,
//! and the monitor only counts prefixes, so neither is the bottleneck.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use bgp4mesh_bgp::wire::{
    AsPath, Capability, Codec, Community, Decoded, Family, Message, NextHop, Open, Origin,
    PathAttributes, UpdateBuilder, decode_message, next_frame,
};
use bgp4mesh_lab::peers::Bird;
use bgp4mesh_lab::{Lab, Node, Proc};
use ipnet::IpNet;

const INJECTOR_AS: u32 = 65001;
const SPEAKER_AS: u32 = 65000;
const MONITOR_AS: u32 = 65002;

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// OPEN, then KEEPALIVE both ways, with hold time 0 (no keepalives needed
/// afterwards); returns the negotiated codec and the bytes that came after
/// the KEEPALIVE in the same read.
fn handshake(stream: &mut TcpStream, asn: u32, id: Ipv4Addr) -> Result<(Codec, Vec<u8>)> {
    let open = Open::new(
        asn,
        0,
        id,
        vec![
            Capability::Multiprotocol(Family::IPV4_UNICAST),
            Capability::RouteRefresh,
        ],
    );
    stream.write_all(&Message::Open(open).encode(&Codec::INITIAL))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut four_octet = false;
    loop {
        let n = stream.read(&mut chunk)?;
        ensure!(
            n > 0,
            "the speaker closed the connection during the handshake"
        );
        buf.extend_from_slice(&chunk[..n]);
        while let Some((_, len)) =
            next_frame(&buf, &Codec::INITIAL).map_err(|e| anyhow::anyhow!("{e}"))?
        {
            let message =
                decode_message(&buf[..len], &Codec::INITIAL).map_err(|e| anyhow::anyhow!("{e}"))?;
            buf.drain(..len);
            match message {
                Decoded::Message(Message::Open(o)) => {
                    four_octet = o.four_octet_as().is_some();
                    stream.write_all(&Message::Keepalive.encode(&Codec::INITIAL))?;
                }
                Decoded::Message(Message::Keepalive) => {
                    let codec = Codec {
                        four_octet_as: four_octet,
                        extended_message: false,
                        ebgp: true,
                    };
                    return Ok((codec, buf));
                }
                Decoded::Message(Message::Notification(n)) => bail!("the speaker refused: {n}"),
                _ => {}
            }
        }
    }
}

/// The n-th /24 (1.0.0.0/24 up, skipping 10/8 and 127/8).
fn prefix(n: u32) -> IpNet {
    crate::bench::prefix_v4(n)
}

/// `bench bgp-inject`: connects to the speaker, sends `prefixes` routes
/// with `paths` distinct attribute sets, prints the time it started
/// sending, then holds the session open.
pub fn inject(peer: IpAddr, local: Ipv4Addr, prefixes: u32, paths: u32) -> Result<()> {
    let paths = paths.max(1);
    // Encode everything first.
    let mut groups: Vec<Vec<IpNet>> = vec![Vec::new(); paths as usize];
    for n in 0..prefixes {
        groups[(n % paths) as usize].push(prefix(n));
    }
    let codec = Codec {
        four_octet_as: true,
        extended_message: false,
        ebgp: true,
    };
    let builder = UpdateBuilder::new(codec);
    let mut bytes = Vec::with_capacity(prefixes as usize * 8);
    for (i, group) in groups.iter().enumerate() {
        let i = i as u32;
        let attrs = PathAttributes {
            origin: Origin::Igp,
            as_path: AsPath::sequence([INJECTOR_AS, 64512 + (i % 400), 4_200_000_000 + i / 400]),
            next_hop: Some(NextHop::V4(local)),
            communities: vec![Community::new(65001, (i % 65535) as u16)],
            ..PathAttributes::default()
        };
        builder.announce(&mut bytes, &attrs, group);
    }
    let mut stream = loop {
        match TcpStream::connect(SocketAddr::new(peer, 179)) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    stream.set_nodelay(true)?;
    let (codec, _) = handshake(&mut stream, INJECTOR_AS, local)?;
    ensure!(codec.four_octet_as, "the speaker does not speak 4-octet AS");
    println!("start {}", unix_nanos());
    std::io::stdout().flush()?;
    stream.write_all(&bytes)?;
    println!("sent {} bytes at {}", bytes.len(), unix_nanos());
    std::io::stdout().flush()?;
    // Hold the session (hold time 0) until killed; drain what comes.
    let mut sink = [0u8; 65536];
    while stream.read(&mut sink)? > 0 {}
    Ok(())
}

/// `bench bgp-monitor`: accepts the speaker's connection and prints the
/// time the `expect`-th distinct prefix arrived.
pub fn monitor(listen: Ipv4Addr, expect: u32) -> Result<()> {
    let listener = TcpListener::bind(SocketAddr::new(IpAddr::V4(listen), 179))?;
    let (mut stream, _) = listener.accept()?;
    let (codec, mut buf) = handshake(&mut stream, MONITOR_AS, listen)?;
    let mut seen: HashSet<IpNet> = HashSet::with_capacity(expect as usize);
    let mut chunk = vec![0u8; 1 << 16];
    let mut done = false;
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!(
                "the speaker closed the connection after {} prefixes",
                seen.len()
            );
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut consumed = 0;
        while let Some((_, len)) =
            next_frame(&buf[consumed..], &codec).map_err(|e| anyhow::anyhow!("{e}"))?
        {
            if let Ok(Decoded::Update(u)) = decode_message(&buf[consumed..consumed + len], &codec) {
                for p in u.withdrawn() {
                    seen.remove(p);
                }
                seen.extend(u.update.nlri.iter().copied());
            }
            consumed += len;
        }
        buf.drain(..consumed);
        if !done && seen.len() >= expect as usize {
            done = true;
            println!("done {}", unix_nanos());
            std::io::stdout().flush()?;
        }
    }
}

/// The speakers `bench bgp` can measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    Bgp4mesh,
    Bird,
}

struct Run {
    seconds: f64,
    peak_rss_mb: f64,
}

fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_string)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn read_stamp(lab: &Lab, proc: &Proc, word: &str, timeout: Duration) -> Result<u128> {
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(&proc.log).unwrap_or_default();
        if let Some(stamp) = log.lines().find_map(|l| {
            l.strip_prefix(word)
                .and_then(|r| r.trim().split(' ').next()?.parse().ok())
        }) {
            return Ok(stamp);
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
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_one(speaker: Speaker, prefixes: u32, paths: u32) -> Result<Run> {
    let lab = Lab::new(&format!("bench-bgp-{speaker:?}").to_lowercase())?;
    let (inj, dut, mon) = (
        lab.add_node("injector")?,
        lab.add_node("speaker")?,
        lab.add_node("monitor")?,
    );
    let (i, d1) = lab.link(&inj, &dut)?;
    let (d2, m) = lab.link(&dut, &mon)?;
    let binary = std::env::current_exe()?.to_string_lossy().into_owned();
    let proc = start_speaker(
        &lab,
        &dut,
        speaker,
        &binary,
        (d1.ipv4, i.ipv4),
        (d2.ipv4, m.ipv4),
    )?;
    let expect = prefixes.to_string();
    let monitor = lab.spawn(
        &mon,
        "monitor",
        &[
            &binary,
            "bench",
            "bgp-monitor",
            "--listen",
            &m.ipv4.to_string(),
            "--expect",
            &expect,
        ],
    )?;
    let paths_arg = paths.to_string();
    let injector = lab.spawn(
        &inj,
        "injector",
        &[
            &binary,
            "bench",
            "bgp-inject",
            "--peer",
            &d1.ipv4.to_string(),
            "--local",
            &i.ipv4.to_string(),
            "--prefixes",
            &expect,
            "--paths",
            &paths_arg,
        ],
    )?;
    let start = read_stamp(&lab, &injector, "start", Duration::from_secs(120))?;
    let done = read_stamp(&lab, &monitor, "done", Duration::from_secs(900))?;
    let seconds = (done.saturating_sub(start)) as f64 / 1e9;
    let peak = peak_rss_mb(proc.pid);
    Ok(Run {
        seconds,
        peak_rss_mb: peak,
    })
}

fn start_speaker(
    lab: &Lab,
    node: &Node,
    speaker: Speaker,
    binary: &str,
    inj: (Ipv4Addr, Ipv4Addr),
    mon: (Ipv4Addr, Ipv4Addr),
) -> Result<Proc> {
    match speaker {
        Speaker::Bgp4mesh => {
            let config = format!(
                "[bgp]\nasn = {SPEAKER_AS}\nrouter_id = \"10.255.0.1\"\n\n\
                 [[bgp.neighbor]]\nname = \"injector\"\naddress = \"{}\"\nremote_as = {INJECTOR_AS}\nfamilies = [\"ipv4\"]\nimport = \"all\"\nexport = \"none\"\npassive = true\n\n\
                 [[bgp.neighbor]]\nname = \"monitor\"\naddress = \"{}\"\nremote_as = {MONITOR_AS}\nfamilies = [\"ipv4\"]\nimport = \"none\"\nexport = \"all\"\nconnect_retry = 1\n\n\
                 [kernel]\nenabled = false\n",
                inj.1, mon.1
            );
            let b = bgp4mesh_lab::peers::Bgp4mesh::start(lab, node, Path::new(binary), &config)?;
            Ok(b.proc().clone())
        }
        Speaker::Bird => {
            let config = format!(
                "router id 10.255.0.1;\nprotocol device {{}}\n\
                 protocol bgp injector {{ local {} as {SPEAKER_AS}; neighbor {} as {INJECTOR_AS}; passive on; ipv4 {{ import all; export none; }}; }}\n\
                 protocol bgp monitor {{ local {} as {SPEAKER_AS}; neighbor {} as {MONITOR_AS}; connect delay time 1; connect retry time 1; ipv4 {{ import none; export all; }}; }}\n",
                inj.0, inj.1, mon.0, mon.1
            );
            let b = Bird::start(lab, node, &config)?;
            Ok(b.proc().clone())
        }
    }
}

/// `bench bgp`: the 1M-style scenario for each speaker, a table of time and
/// peak RSS with ratios to BIRD.
pub fn bgp(prefixes: u32, paths: u32) -> Result<()> {
    println!("{prefixes} IPv4 prefixes, {paths} attribute sets: injector -> speaker -> monitor");
    let mut rows = Vec::new();
    for speaker in [Speaker::Bird, Speaker::Bgp4mesh] {
        let run = run_one(speaker, prefixes, paths).with_context(|| format!("{speaker:?}"))?;
        rows.push((speaker, run));
    }
    let bird = rows
        .iter()
        .find(|(s, _)| *s == Speaker::Bird)
        .map(|(_, r)| (r.seconds, r.peak_rss_mb));
    println!(
        "{:<12} {:>10} {:>12} {:>10} {:>10}",
        "speaker", "seconds", "peak RSS MB", "time/BIRD", "RSS/BIRD"
    );
    for (speaker, run) in &rows {
        let (bt, bm) = bird.unwrap_or((run.seconds, run.peak_rss_mb));
        println!(
            "{:<12} {:>10.2} {:>12.1} {:>10.2} {:>10.2}",
            format!("{speaker:?}"),
            run.seconds,
            run.peak_rss_mb,
            run.seconds / bt.max(1e-9),
            run.peak_rss_mb / bm.max(1e-9)
        );
    }
    Ok(())
}
