//! `bgp4mesh bench controller`: N simulated agents (streams only, no
//! devices) against one controller process on this machine. Measures the
//! join rate, the time for one node's change to reach every stream
//! (p50/p99/max), the size and time of a full snapshot, and the
//! controller's peak RSS.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::fib::vm_mb;
use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use bgp4mesh_agent::Client;
use bgp4mesh_api::{JoinRequest, JoinResponse, NetworkCreate, StreamEvent, Token, TokenCreate};
use futures::StreamExt;
use tokio::sync::mpsc;

const MASTER: &str = "bench-master-key-0123456789";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn controller(nodes: u32, changes: u32) -> Result<()> {
    bgp4mesh_controller::server::raise_open_files_limit();
    let dir =
        std::env::temp_dir().join(format!("bgp4mesh-bench-controller-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nmaster_key = \"{MASTER}\"\nstate_dir = \"{}\"\n",
            dir.display()
        ),
    )?;
    let mut server = Command::new(std::env::current_exe()?)
        .args([
            "server",
            "-c",
            &config.to_string_lossy(),
            "--log-level",
            "warn",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the controller")?;
    let pid = server.id();
    let stdout = server.stdout.take().context("controller stdout")?;
    let mut fingerprint = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(fp) = line.strip_prefix("fingerprint ") {
            fingerprint = Some(fp.to_string());
        }
        if line.starts_with("listening on") {
            break;
        }
    }
    let fingerprint = fingerprint.context("the controller printed no fingerprint")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(port, &fingerprint, nodes, changes, pid));
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run(port: u16, fingerprint: &str, nodes: u32, changes: u32, pid: u32) -> Result<()> {
    let url = format!("https://127.0.0.1:{port}");
    let admin = Client::new(&url, Some(fingerprint), Some(MASTER.to_string()))?;
    let _: serde_json::Value = admin
        .post(
            "/api/networks",
            &NetworkCreate {
                netid: "bench".into(),
                addressrange: Some("10.0.0.0/16".into()),
                addressrange6: None,
                mtu: None,
                listen_port: None,
                persistent_keepalive: None,
            },
        )
        .await?;
    let token: Token = admin
        .post(
            "/api/tokens",
            &TokenCreate {
                network: "bench".into(),
                expires_in: None,
                uses: None,
                tags: Vec::new(),
            },
        )
        .await?;
    let secret = bgp4mesh_agent::agent::decode_token(&token.token.unwrap_or_default())?.secret;
    println!(
        "{nodes} simulated agents in one network, controller pid {pid} on 127.0.0.1:{port} (TLS)"
    );

    // Joins, 32 at a time.
    let anonymous = Client::new(&url, Some(fingerprint), None)?;
    let started = Instant::now();
    let joined: Vec<JoinResponse> = futures::stream::iter(0..nodes)
        .map(|i| {
            let client = anonymous.clone();
            let secret = secret.clone();
            async move {
                let mut key = [0u8; 32];
                key[..4].copy_from_slice(&i.to_be_bytes());
                key[31] = 0x42;
                client
                    .post::<_, JoinResponse>(
                        "/api/join",
                        &JoinRequest {
                            secret,
                            name: format!("n{i}"),
                            public_key: base64::engine::general_purpose::STANDARD.encode(key),
                            endpoint: Some(format!("192.0.2.1:{}", 10_000 + i % 50_000)),
                            endpoint6: None,
                            listen_port: None,
                            address: None,
                            address6: None,
                        },
                    )
                    .await
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    let join_time = started.elapsed();
    let join_rate = f64::from(nodes) / join_time.as_secs_f64();
    println!(
        "joins: {nodes} in {:.1} s ({join_rate:.0}/s); controller RSS {:.0} MB",
        join_time.as_secs_f64(),
        vm_mb(pid, "VmRSS")?
    );

    // One full snapshot: what a new or far-behind agent gets.
    let first = admin.with_key(joined[0].credential.clone());
    let started = Instant::now();
    let state: serde_json::Value = first.get("/api/agent/state").await?;
    let snapshot_time = started.elapsed();
    let snapshot_bytes = serde_json::to_vec(&state)?.len();
    println!(
        "one snapshot: {} peers, {:.1} MB, {:.0} ms",
        state["peers"].as_array().map_or(0, Vec::len),
        snapshot_bytes as f64 / 1e6,
        snapshot_time.as_secs_f64() * 1e3
    );

    // Streams of agents already in sync (they resume at the current
    // revision, as after a reconnect): no snapshot each.
    let health: serde_json::Value = admin.get("/api/health").await?;
    let revision = health["revision"].as_u64().context("revision")?;
    let (arrivals, mut arrived) = mpsc::unbounded_channel::<(u64, Instant)>();
    let opened = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let opening = futures::stream::iter(joined.iter().map(|j| j.credential.clone()))
        .map(|credential| {
            let client = admin.with_key(credential);
            let arrivals = arrivals.clone();
            let opened = Arc::clone(&opened);
            async move {
                let events = client.stream(Some(revision)).await?;
                opened.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut events = Box::pin(events);
                    while let Some(Ok(event)) = events.next().await {
                        if !matches!(event, StreamEvent::Heartbeat { .. }) {
                            let _ = arrivals.send((event.revision(), Instant::now()));
                        }
                    }
                });
                anyhow::Ok(())
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let failures = opening.iter().filter(|r| r.is_err()).count();
    if let Some(Err(e)) = opening.into_iter().find(|r| r.is_err()) {
        bail!("{failures} streams failed to open; first: {e:#}");
    }
    let open_time = started.elapsed();
    println!(
        "streams: {} open in {:.1} s; controller RSS {:.0} MB",
        opened.load(Ordering::Relaxed),
        open_time.as_secs_f64(),
        vm_mb(pid, "VmRSS")?
    );
    ensure!(
        opened.load(Ordering::Relaxed) == nodes as usize,
        "not every stream opened"
    );

    // Changes: one node becomes an egress gateway; every stream must see it.
    let mut all = Vec::new();
    let mut per_change = Vec::new();
    for k in 0..changes {
        let node = &joined[(k as usize * 7919) % joined.len()].node;
        let before: serde_json::Value = admin.get("/api/health").await?;
        let before = before["revision"].as_u64().context("revision")?;
        while arrived.try_recv().is_ok() {}
        let t0 = Instant::now();
        let _: serde_json::Value = admin
            .post(
                &format!("/api/nodes/bench/{}/creategateway", node.id),
                &serde_json::json!({"ranges": [format!("172.{}.{}.0/24", 16 + k / 256, k % 256)], "natEnabled": "no"}),
            )
            .await?;
        let mut latencies = Vec::with_capacity(nodes as usize);
        let deadline = t0 + Duration::from_secs(30);
        while latencies.len() < nodes as usize {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, arrived.recv()).await {
                Ok(Some((rev, at))) if rev > before => latencies.push(at - t0),
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        ensure!(
            latencies.len() == nodes as usize,
            "change {k}: {} of {nodes} streams saw it within 30 s",
            latencies.len()
        );
        latencies.sort();
        println!(
            "change {k}: all {nodes} streams in {:.0} ms (p50 {:.0} ms, p99 {:.0} ms)",
            latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
            percentile(&latencies, 0.5).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3
        );
        per_change.push(*latencies.last().unwrap_or(&Duration::ZERO));
        all.extend(latencies);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    all.sort();
    let rss = vm_mb(pid, "VmHWM")?;
    println!();
    println!(
        "| agents | join rate | streams open in | change → all streams p50 | p99 | max | snapshot ({} peers) | controller peak RSS |",
        nodes - 1
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {nodes} | {join_rate:.0}/s | {:.1} s | {:.0} ms | {:.0} ms | {:.0} ms | {:.1} MB in {:.0} ms | {rss:.0} MB |",
        open_time.as_secs_f64(),
        percentile(&all, 0.5).as_secs_f64() * 1e3,
        percentile(&all, 0.99).as_secs_f64() * 1e3,
        all.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
        snapshot_bytes as f64 / 1e6,
        snapshot_time.as_secs_f64() * 1e3,
    );
    Ok(())
}
