//! The controller's REST API, each scenario on SQLite and on PostgreSQL
//! (`on_sqlite::NAME`, `on_postgresql::NAME`), each with its own
//! controller: the seed's calls, enrollment, IPAM, scoped keys, refusals
//! with the right status and message, the push stream, and a restart on
//! the same store. Plain HTTPS on loopback against the controller's own
//! self-signed certificate.
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine;
use bgp4mesh_api::{EnrollmentToken, JoinResponse, MeshState, Node, StreamEvent, Token};
use bgp4mesh_controller::config::ServerConfig;
use bgp4mesh_controller::server::{Running, start};
use bgp4mesh_lab::can_run;
use bgp4mesh_lab::postgres::{Postgres, find_postgres};
use reqwest::StatusCode;
use serde_json::{Value, json};

const MASTER: &str = "test-master-key-0123456789";

fn state_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bgp4mesh-ctl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

async fn start_controller(database: &str, dir: &Path) -> Result<Running> {
    let config = ServerConfig::parse(&format!(
        "listen = \"127.0.0.1:0\"\nmaster_key = \"{MASTER}\"\ndatabase = \"{database}\"\nstate_dir = \"{}\"\n",
        dir.display()
    ))?;
    start(&config).await
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    fn new(running: &Running, dir: &Path) -> Result<Client> {
        let pem = std::fs::read(dir.join("controller.crt"))?;
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Client {
            http,
            base: format!("https://localhost:{}", running.addr.port()),
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value)> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).with_context(|| format!("{status}: {text}"))?
        };
        Ok((status, value))
    }

    async fn post(
        &self,
        path: &str,
        key: Option<&str>,
        body: Value,
    ) -> Result<(StatusCode, Value)> {
        self.call(reqwest::Method::POST, path, key, Some(body))
            .await
    }

    async fn get(&self, path: &str, key: Option<&str>) -> Result<(StatusCode, Value)> {
        self.call(reqwest::Method::GET, path, key, None).await
    }

    async fn delete(&self, path: &str, key: Option<&str>) -> Result<(StatusCode, Value)> {
        self.call(reqwest::Method::DELETE, path, key, None).await
    }
}

/// Asserts a refusal: the status, and a JSON message containing `needle`.
fn refused(got: (StatusCode, Value), status: StatusCode, needle: &str) {
    assert_eq!(got.0, status, "{:?}", got.1);
    let message = got.1["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "{status}: {message:?} does not say {needle:?}"
    );
}

fn public_key(n: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([n; 32])
}

async fn token(c: &Client, network: &str, extra: Value) -> Result<(Token, EnrollmentToken)> {
    let mut body = json!({"network": network});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let (status, value) = c.post("/api/tokens", Some(MASTER), body).await?;
    ensure!(status == StatusCode::OK, "token: {status} {value}");
    let token: Token = serde_json::from_value(value)?;
    let text = token.token.clone().context("the token text")?;
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text)?;
    Ok((token, serde_json::from_slice(&decoded)?))
}

async fn join(
    c: &Client,
    secret: &str,
    name: &str,
    key: u8,
    extra: Value,
) -> Result<(StatusCode, Value)> {
    let mut body = json!({"secret": secret, "name": name, "public_key": public_key(key)});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    c.post("/api/join", None, body).await
}

/// Reads server-sent events from the stream until `want` events arrived.
async fn stream_events(
    c: &Client,
    credential: &str,
    since: Option<u64>,
    want: usize,
    during: impl std::future::Future<Output = Result<()>>,
) -> Result<Vec<StreamEvent>> {
    let path = match since {
        Some(r) => format!("{}/api/agent/stream?since={r}", c.base),
        None => format!("{}/api/agent/stream", c.base),
    };
    let mut resp = c
        .http
        .get(path)
        .bearer_auth(credential)
        .timeout(Duration::from_secs(30))
        .send()
        .await?;
    ensure!(resp.status() == StatusCode::OK, "stream: {}", resp.status());
    let mut events = Vec::new();
    let mut buffer = String::new();
    let mut during = Box::pin(during);
    let mut during_done = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while events.len() < want {
        tokio::select! {
            chunk = resp.chunk() => {
                let Some(chunk) = chunk? else { break };
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buffer.find("\n\n") {
                    let frame: String = buffer.drain(..end + 2).collect();
                    if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) {
                        let event: StreamEvent = serde_json::from_str(data)?;
                        if !matches!(event, StreamEvent::Heartbeat { .. }) {
                            events.push(event);
                        }
                    }
                }
            }
            r = &mut during, if !during_done => { r?; during_done = true; }
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    Ok(events)
}

/// Where a scenario's controller keeps its state: a database and a state
/// directory, both its own (for PostgreSQL, a server of its own too).
/// The directory goes when the scenario is over.
struct Db {
    url: String,
    dir: PathBuf,
    _postgres: Option<Postgres>,
}

impl Db {
    /// A database file in the scenario's own directory.
    fn sqlite(scenario: &str) -> Result<Db> {
        let dir = state_dir(&format!("{scenario}-sqlite"));
        std::fs::create_dir_all(&dir)?;
        let url = format!("sqlite://{}", dir.join("controller.db").display());
        Ok(Db {
            url,
            dir,
            _postgres: None,
        })
    }

    /// A PostgreSQL server of the scenario's own (about a second to start),
    /// or `None` where there is none to run (a skip, said loudly; never
    /// under CI).
    fn postgresql(scenario: &str) -> Result<Option<Db>> {
        // Named here, not by `can_run!`: this helper is not the test.
        let test = format!("on_postgresql::{scenario}");
        if !can_run(&test, &["runuser"]) {
            return Ok(None);
        }
        if find_postgres().is_none() {
            let message = format!("{test}: no PostgreSQL server (apt install postgresql)");
            assert!(std::env::var_os("CI").is_none(), "{message}");
            eprintln!("SKIPPED {message}");
            return Ok(None);
        }
        let pg = Postgres::start()?;
        let url = pg.create_database("bgp4mesh")?;
        let dir = state_dir(&format!("{scenario}-postgres"));
        std::fs::create_dir_all(&dir)?;
        Ok(Some(Db {
            url,
            dir,
            _postgres: Some(pg),
        }))
    }

    /// A controller on this store; started again on the same store, it
    /// has the same state and certificate.
    async fn start(&self) -> Result<Api> {
        self.start_in("state").await
    }

    /// Another controller on this store, with state directory `name` of
    /// its own (its own certificate).
    async fn start_in(&self, name: &str) -> Result<Api> {
        let state = self.dir.join(name);
        let running = start_controller(&self.url, &state).await?;
        let c = Client::new(&running, &state)?;
        Ok(Api { running, c })
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running controller and a client that trusts its certificate.
struct Api {
    running: Running,
    c: Client,
}

impl Api {
    async fn stop(self) {
        self.running.shutdown().await;
    }
}

/// Each scenario, an `async fn(&Db) -> Result<()>`, as two tests:
/// `on_sqlite::NAME` and `on_postgresql::NAME`.
macro_rules! on_both_stores {
    ($($scenario:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() -> anyhow::Result<()> {
                    let db = super::Db::sqlite(stringify!($scenario))?;
                    super::$scenario(&db).await
                }
            )*
        }

        mod on_postgresql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() -> anyhow::Result<()> {
                    let Some(db) = super::Db::postgresql(stringify!($scenario))? else {
                        return Ok(());
                    };
                    super::$scenario(&db).await
                }
            )*
        }
    };
}

on_both_stores!(
    authentication,
    networks,
    enrollment_tokens,
    joining_and_ipam,
    pinned_ipv6_addresses,
    the_seeds_gateway,
    the_agents_view,
    bgp_learned_egress_ranges_and_pulses,
    scoped_keys,
    the_push_stream,
    documents,
    a_restart_keeps_everything,
    nonsense_is_refused_naming_the_field,
    a_networks_key_goes_with_its_network,
    who_may_say_where_a_node_is,
    gateway_ranges,
    candidates_and_discovery,
    relays,
    ipv6_endpoints_next_to_ipv4_ones,
);

/// Two controllers on one PostgreSQL (issue 19): what must stay single is
/// decided in the database. They start together on a new database (each
/// migration once). Joins through both at once: a 3-use token
/// admits exactly 3 of 30, and 40 joins on an open token get 40 different
/// addresses, every one stored. Each applies the other's changes: both
/// list every node, and an agent streaming from one hears of a node that
/// joins through the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_on_one_postgresql_share_token_uses_and_addresses() -> Result<()> {
    let Some(db) = Db::postgresql("two_controllers")? else {
        return Ok(());
    };
    // Started together on a new database: they migrate it one at a time.
    let (a, b) = tokio::join!(db.start(), db.start_in("state-b"));
    let (a, b) = (a?, b?);
    network(&a.c, "mynet", "10.70.0.0/16").await?;
    let (_, three) = token(&b.c, "mynet", json!({"uses": 3})).await?;
    let joins = (0..30u8).map(|i| {
        let c = if i % 2 == 0 { &a.c } else { &b.c };
        let secret = three.secret.clone();
        async move { join(c, &secret, &format!("n{i}"), i + 1, json!({})).await }
    });
    let results = futures::future::join_all(joins).await;
    let mut admitted = 0;
    for r in results {
        let (status, body) = r?;
        match status {
            StatusCode::OK => admitted += 1,
            StatusCode::FORBIDDEN => {
                let message = body["message"].as_str().unwrap_or_default();
                ensure!(message.contains("used up"), "{message}");
            }
            other => anyhow::bail!("a join got {other}: {body}"),
        }
    }
    ensure!(admitted == 3, "{admitted} joins on a 3-use token");

    let (_, open) = token(&a.c, "mynet", json!({})).await?;
    let joins = (0..40u8).map(|i| {
        let c = if i % 2 == 0 { &a.c } else { &b.c };
        let secret = open.secret.clone();
        async move { join(c, &secret, &format!("m{i}"), 100 + i, json!({})).await }
    });
    let mut addresses = std::collections::HashSet::new();
    let mut joined = Vec::new();
    for r in futures::future::join_all(joins).await {
        let (status, body) = r?;
        ensure!(status == StatusCode::OK, "{status}: {body}");
        let response: JoinResponse = serde_json::from_value(body)?;
        let address = response.node.address.context("no address")?;
        ensure!(addresses.insert(address), "{address} given twice");
        joined.push(response);
    }

    // Each follows the other: both list all 43 nodes, whichever took
    // the join.
    for api in [&a, &b] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let (_, nodes) = api.c.get("/api/nodes", Some(MASTER)).await?;
            let n = nodes.as_array().map_or(0, Vec::len);
            if n == 43 {
                break;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "{n} nodes listed, not 43"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // An agent streaming from a hears of a node that joins through b, and
    // of its removal through a, in order.
    let listener = joined.first().context("a joined node")?;
    let b2 = &b.c;
    let a2 = &a.c;
    let secret = open.secret.clone();
    let events = stream_events(&a.c, &listener.credential, None, 3, async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (status, body) = join(b2, &secret, "late", 200, json!({})).await?;
        ensure!(status == StatusCode::OK, "{body}");
        let late: JoinResponse = serde_json::from_value(body)?;
        let (status, v) = a2
            .delete(&format!("/api/nodes/mynet/{}", late.node.id), Some(MASTER))
            .await?;
        ensure!(status == StatusCode::NO_CONTENT, "{v}");
        Ok(())
    })
    .await?;
    ensure!(
        matches!(events.first(), Some(StreamEvent::Snapshot(s)) if s.peers.len() == 42),
        "{events:?}"
    );
    ensure!(
        matches!(events.get(1), Some(StreamEvent::PeerUpsert { peer, .. }) if peer.name == "late"),
        "{events:?}"
    );
    ensure!(
        matches!(events.get(2), Some(StreamEvent::PeerRemove { .. })),
        "{events:?}"
    );
    a.stop().await;
    b.stop().await;
    // A controller started afterwards reads them all back.
    let c = db.start_in("state-c").await?;
    let (status, nodes) = c.c.get("/api/nodes", Some(MASTER)).await?;
    ensure!(status == StatusCode::OK, "{status}: {nodes}");
    let stored: std::collections::HashSet<String> = nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["address"].as_str().map(str::to_string))
        .collect();
    ensure!(
        stored.len() == 43,
        "{} stored addresses, not 43: {nodes}",
        stored.len()
    );
    c.stop().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// What scenarios start from

async fn network(c: &Client, netid: &str, range: &str) -> Result<()> {
    let (status, v) = c
        .post(
            "/api/networks",
            Some(MASTER),
            json!({"netid": netid, "addressrange": range}),
        )
        .await?;
    ensure!(status == StatusCode::OK, "network {netid}: {status} {v}");
    Ok(())
}

/// The seed's mesh: network "mynet" (44.30.127.0/24), then "border"
/// (44.30.127.1, endpoint 192.0.2.10) and "laptop" (44.30.127.2) joined
/// with one token of two uses.
struct Seed {
    /// The border.
    first: JoinResponse,
    /// The laptop.
    second: JoinResponse,
}

async fn seed(c: &Client) -> Result<Seed> {
    network(c, "mynet", "44.30.127.0/24").await?;
    let (_, enrollment) = token(c, "mynet", json!({"uses": 2, "expires_in": 3600})).await?;
    let mut joined = Vec::new();
    for (name, key, extra) in [
        ("border", 1, json!({"endpoint": "192.0.2.10"})),
        ("laptop", 2, json!({})),
    ] {
        let (status, v) = join(c, &enrollment.secret, name, key, extra).await?;
        ensure!(status == StatusCode::OK, "join {name}: {status} {v}");
        joined.push(serde_json::from_value::<JoinResponse>(v)?);
    }
    let second = joined.pop().context("laptop")?;
    let first = joined.pop().context("border")?;
    Ok(Seed { first, second })
}

/// The seed's gateway call: the border is the exit for everything.
async fn seed_gateway(c: &Client, border: &JoinResponse) -> Result<()> {
    let (status, v) = c
        .post(
            &format!("/api/nodes/mynet/{}/creategateway", border.node.id),
            Some(MASTER),
            json!({"ranges": ["0.0.0.0/0"], "natEnabled": "no"}),
        )
        .await?;
    ensure!(status == StatusCode::OK, "gateway: {status} {v}");
    Ok(())
}

/// Network "other" (10.2.0.0/29), full: its six nodes n0 to n5.
async fn full_network(c: &Client) -> Result<()> {
    network(c, "other", "10.2.0.0/29").await?;
    let (_, small) = token(c, "other", json!({})).await?;
    for i in 0..6u8 {
        let (status, v) = join(c, &small.secret, &format!("n{i}"), 100 + i, json!({})).await?;
        ensure!(status == StatusCode::OK, "{v}");
    }
    Ok(())
}

/// Network "hard" (10.7.0.0/24 and fd07::/64), its token, and three
/// nodes: "natted" (no endpoint), "hub" and "other".
async fn hard_network(c: &Client) -> Result<(EnrollmentToken, Vec<JoinResponse>)> {
    let (status, _) = c
        .post(
            "/api/networks",
            Some(MASTER),
            json!({"netid": "hard", "addressrange": "10.7.0.0/24", "addressrange6": "fd07::/64"}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    let (_, enrollment) = token(c, "hard", json!({})).await?;
    let mut nodes = Vec::new();
    for (name, key, extra) in [
        ("natted", 101, json!({})),
        ("hub", 102, json!({"endpoint": "198.51.100.2:51820"})),
        ("other", 103, json!({"endpoint": "198.51.100.3:51820"})),
    ] {
        let (status, joined) = join(c, &enrollment.secret, name, key, extra).await?;
        assert_eq!(status, StatusCode::OK, "{joined}");
        nodes.push(serde_json::from_value::<JoinResponse>(joined)?);
    }
    Ok((enrollment, nodes))
}

// ---------------------------------------------------------------------------
// The scenarios

/// Without a key, or with a wrong one: 401 before any lookup or parsing.
async fn authentication(db: &Db) -> Result<()> {
    let api = db.start().await?;
    let (c, running) = (&api.c, &api.running);
    let revision = |running: &Running| running.controller.hub.revision();
    network(c, "mynet", "44.30.127.0/24").await?;
    refused(
        c.get("/api/networks", None).await?,
        StatusCode::UNAUTHORIZED,
        "Authorization",
    );
    refused(
        c.get("/api/networks", Some("wrong-key")).await?,
        StatusCode::UNAUTHORIZED,
        "unknown key",
    );
    let (tok, _) = token(c, "mynet", json!({})).await?;
    for path in [
        format!("/api/tokens/{}", tok.id),
        "/api/tokens/no-such-token".to_string(),
    ] {
        refused(
            c.delete(&path, None).await?,
            StatusCode::UNAUTHORIZED,
            "Authorization",
        );
    }
    for path in [
        "/metrics",
        "/api/openapi.json",
        "/api/nothing",
        "/api/nodes/nope",
    ] {
        refused(
            c.get(path, None).await?,
            StatusCode::UNAUTHORIZED,
            "Authorization",
        );
        refused(
            c.get(path, Some("not-a-key")).await?,
            StatusCode::UNAUTHORIZED,
            "unknown key",
        );
    }
    refused(
        c.get("/api/networks", Some(&"k".repeat(8000))).await?,
        StatusCode::UNAUTHORIZED,
        "Bearer",
    );
    let before = revision(running);
    refused(
        c.post(
            "/api/networks",
            None,
            json!({"netid": "x", "addressrange": "10.9.0.0/24"}),
        )
        .await?,
        StatusCode::UNAUTHORIZED,
        "Authorization",
    );
    assert_eq!(revision(running), before);
    refused(
        c.get("/api/nothing", Some(MASTER)).await?,
        StatusCode::NOT_FOUND,
        "no such",
    );
    api.stop().await;
    Ok(())
}

/// The seed's call, then every way to get it wrong.
async fn networks(db: &Db) -> Result<()> {
    let api = db.start().await?;
    let c = &api.c;
    let (status, net) = c
        .post(
            "/api/networks",
            Some(MASTER),
            json!({"netid": "mynet", "addressrange": "44.30.127.0/24"}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{net}");
    assert_eq!(net["netid"], "mynet");
    assert_eq!(net["addressrange"], "44.30.127.0/24");
    assert_eq!(net["listen_port"], 51820);
    refused(
        c.post(
            "/api/networks",
            Some(MASTER),
            json!({"netid": "mynet", "addressrange": "10.1.0.0/24"}),
        )
        .await?,
        StatusCode::CONFLICT,
        "exists",
    );
    refused(
        c.post(
            "/api/networks",
            Some(MASTER),
            json!({"netid": "other", "addressrange": "44.30.127.128/25"}),
        )
        .await?,
        StatusCode::CONFLICT,
        "overlaps network \"mynet\"",
    );
    refused(
        c.post(
            "/api/networks",
            Some(MASTER),
            json!({"netid": "other", "addressrange": "44.30.127.0/33"}),
        )
        .await?,
        StatusCode::BAD_REQUEST,
        "not an IPv4 prefix",
    );
    refused(
        c.post(
            "/api/networks",
            Some(MASTER),
            json!({"netid": "other", "addressrange": "10.2.0.5/24"}),
        )
        .await?,
        StatusCode::BAD_REQUEST,
        "host bits",
    );
    refused(
        c.post(
            "/api/networks",
            Some(MASTER),
            json!({"netid": "Bad Name!", "addressrange": "10.2.0.0/24"}),
        )
        .await?,
        StatusCode::BAD_REQUEST,
        "netid",
    );
    refused(
        c.post(
            "/api/networks",
            Some(MASTER),
            json!({"netid": "other", "adressrange": "10.2.0.0/24"}),
        )
        .await?,
        StatusCode::BAD_REQUEST,
        "adressrange",
    );
    let raw = c
        .http
        .post(format!("{}/api/networks", c.base))
        .bearer_auth(MASTER)
        .header("content-type", "application/json")
        .body("{\"netid\": ")
        .send()
        .await?;
    assert_eq!(raw.status(), StatusCode::BAD_REQUEST);
    let message: Value = raw.json().await?;
    assert!(
        message["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{message}"
    );
    let (status, _) = c
        .post(
            "/api/networks",
            Some(MASTER),
            json!({"netid": "other", "addressrange": "10.2.0.0/29"}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    api.stop().await;
    Ok(())
}

async fn enrollment_tokens(db: &Db) -> Result<()> {
    let api = db.start().await?;
    let (c, running) = (&api.c, &api.running);
    let fingerprint = running.fingerprint.clone();
    network(c, "mynet", "44.30.127.0/24").await?;
    let (tok, enrollment) = token(c, "mynet", json!({"uses": 2, "expires_in": 3600})).await?;
    assert_eq!(enrollment.network, "mynet");
    assert_eq!(
        enrollment.fingerprint, fingerprint,
        "the token carries the fingerprint"
    );
    assert_eq!(enrollment.server, running.controller.public_url);
    assert_eq!(tok.uses_left, Some(2));
    refused(
        c.post("/api/tokens", Some(MASTER), json!({"network": "nope"}))
            .await?,
        StatusCode::NOT_FOUND,
        "no network",
    );
    api.stop().await;
    Ok(())
}

async fn joining_and_ipam(db: &Db) -> Result<()> {
    let api = db.start().await?;
    let c = &api.c;
    network(c, "mynet", "44.30.127.0/24").await?;
    network(c, "other", "10.2.0.0/29").await?;
    let (_, enrollment) = token(c, "mynet", json!({"uses": 2, "expires_in": 3600})).await?;
    let (status, first) = join(
        c,
        &enrollment.secret,
        "border",
        1,
        json!({"endpoint": "192.0.2.10"}),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{first}");
    let first: JoinResponse = serde_json::from_value(first)?;
    assert_eq!(first.node.address, Some("44.30.127.1".parse()?));
    assert_eq!(first.node.endpoint.as_deref(), Some("192.0.2.10:51820"));
    refused(
        join(c, &enrollment.secret, "border", 2, json!({})).await?,
        StatusCode::CONFLICT,
        "named \"border\"",
    );
    refused(
        join(c, &enrollment.secret, "dup-key", 1, json!({})).await?,
        StatusCode::CONFLICT,
        "public key",
    );
    refused(
        join(
            c,
            &enrollment.secret,
            "x",
            3,
            json!({"address": "44.30.127.1"}),
        )
        .await?,
        StatusCode::CONFLICT,
        "in use",
    );
    refused(
        join(
            c,
            &enrollment.secret,
            "x",
            3,
            json!({"address": "10.0.0.1"}),
        )
        .await?,
        StatusCode::BAD_REQUEST,
        "outside",
    );
    refused(
        c.post(
            "/api/join",
            None,
            json!({"secret": enrollment.secret, "name": "x", "public_key": "short"}),
        )
        .await?,
        StatusCode::BAD_REQUEST,
        "public_key",
    );
    let (status, second) = join(c, &enrollment.secret, "laptop", 2, json!({})).await?;
    assert_eq!(status, StatusCode::OK, "{second}");
    let second: JoinResponse = serde_json::from_value(second)?;
    assert_eq!(second.node.address, Some("44.30.127.2".parse()?));
    // Two uses, both taken (refused attempts took none).
    refused(
        join(c, &enrollment.secret, "third", 3, json!({})).await?,
        StatusCode::FORBIDDEN,
        "used up",
    );
    let (_, expired) = token(c, "mynet", json!({"expires_in": 1})).await?;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    refused(
        join(c, &expired.secret, "late", 4, json!({})).await?,
        StatusCode::UNAUTHORIZED,
        "expired",
    );
    refused(
        join(c, "not-a-secret", "who", 5, json!({})).await?,
        StatusCode::UNAUTHORIZED,
        "unknown enrollment token",
    );
    // A /29 has six host addresses; the seventh join is told so.
    let (_, small) = token(c, "other", json!({})).await?;
    for i in 0..6u8 {
        let (status, v) = join(c, &small.secret, &format!("n{i}"), 100 + i, json!({})).await?;
        assert_eq!(status, StatusCode::OK, "{v}");
    }
    refused(
        join(c, &small.secret, "n6", 106, json!({})).await?,
        StatusCode::CONFLICT,
        "exhausted",
    );
    api.stop().await;
    Ok(())
}

/// A border pins its IPv6 mesh address (`address6`) as it pins its IPv4
/// one: inside the network's IPv6 range, not the subnet-router anycast
/// address, not taken; refusals say which, and take no use of the token.
async fn pinned_ipv6_addresses(db: &Db) -> Result<()> {
    let api = db.start().await?;
    let c = &api.c;
    let (status, v) = c
        .post(
            "/api/networks",
            Some(MASTER),
            json!({"netid": "dual", "addressrange": "44.30.127.0/24", "addressrange6": "2001:db8:44::/64"}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = c
        .post(
            "/api/networks",
            Some(MASTER),
            json!({"netid": "six", "addressrange6": "fd06::/64"}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    network(c, "four", "10.4.0.0/24").await?;
    let (_, dual) = token(c, "dual", json!({"uses": 2})).await?;
    let (status, border) = join(
        c,
        &dual.secret,
        "border",
        1,
        json!({"address": "44.30.127.254", "address6": "2001:db8:44::1"}),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{border}");
    let border: JoinResponse = serde_json::from_value(border)?;
    assert_eq!(border.node.address, Some("44.30.127.254".parse()?));
    assert_eq!(border.node.address6, Some("2001:db8:44::1".parse()?));
    // The controller keeps it: the node's record and its peers' view.
    let (status, shown) = c.get("/api/nodes/dual/border", Some(MASTER)).await?;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["address6"], "2001:db8:44::1");
    for (address6, status, says) in [
        (
            "2001:db8:44::1",
            StatusCode::CONFLICT,
            "address6 2001:db8:44::1 is already in use",
        ),
        (
            "2001:db8:45::1",
            StatusCode::BAD_REQUEST,
            "outside the network's IPv6 range 2001:db8:44::/64",
        ),
        (
            "2001:db8:44::",
            StatusCode::BAD_REQUEST,
            "subnet-router anycast address",
        ),
        ("44.30.127.9", StatusCode::BAD_REQUEST, "address6"),
    ] {
        refused(
            join(c, &dual.secret, "x", 3, json!({"address6": address6})).await?,
            status,
            says,
        );
    }
    // Refusals took no use: the second one is still there, and the next
    // address is allocated around the pinned one.
    let (status, laptop) = join(c, &dual.secret, "laptop", 2, json!({})).await?;
    assert_eq!(status, StatusCode::OK, "{laptop}");
    let laptop: JoinResponse = serde_json::from_value(laptop)?;
    assert_eq!(laptop.node.address, Some("44.30.127.1".parse()?));
    assert_eq!(laptop.node.address6, Some("2001:db8:44::2".parse()?));
    // An IPv6-only network: address6 pinned, no IPv4 address, and an
    // IPv4 pin refused.
    let (_, six) = token(c, "six", json!({})).await?;
    let (status, only6) = join(c, &six.secret, "v6", 4, json!({"address6": "fd06::44"})).await?;
    assert_eq!(status, StatusCode::OK, "{only6}");
    let only6: JoinResponse = serde_json::from_value(only6)?;
    assert_eq!(only6.node.address, None);
    assert_eq!(only6.node.address6, Some("fd06::44".parse()?));
    refused(
        join(c, &six.secret, "v4", 5, json!({"address": "10.0.0.1"})).await?,
        StatusCode::BAD_REQUEST,
        "address 10.0.0.1: the network has no IPv4 range",
    );
    // An IPv4-only network has nowhere to put an IPv6 pin.
    let (_, four) = token(c, "four", json!({})).await?;
    refused(
        join(c, &four.secret, "v6", 6, json!({"address6": "fd06::45"})).await?,
        StatusCode::BAD_REQUEST,
        "address6 fd06::45: the network has no IPv6 range",
    );
    api.stop().await;
    Ok(())
}

async fn the_seeds_gateway(db: &Db) -> Result<()> {
    let api = db.start().await?;
    let c = &api.c;
    let Seed { first, .. } = seed(c).await?;
    let (status, node) = c
        .post(
            &format!("/api/nodes/mynet/{}/creategateway", first.node.id),
            Some(MASTER),
            json!({"ranges": ["0.0.0.0/0"], "natEnabled": "no"}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{node}");
    let node: Node = serde_json::from_value(node)?;
    let egress = node.egress.context("egress set")?;
    assert_eq!(egress.ranges, vec!["0.0.0.0/0".parse()?]);
    assert!(!egress.nat);
    refused(
        c.post(
            "/api/nodes/mynet/nobody/creategateway",
            Some(MASTER),
            json!({"ranges": ["0.0.0.0/0"]}),
        )
        .await?,
        StatusCode::NOT_FOUND,
        "no node",
    );
    refused(
        c.post(
            "/api/nodes/mynet/border/creategateway",
            Some(MASTER),
            json!({"ranges": ["0.0.0.0/0"], "natEnabled": "maybe"}),
        )
        .await?,
        StatusCode::BAD_REQUEST,
        "natEnabled",
    );
    api.stop().await;
    Ok(())
}

/// A node's state: its peers, the gateway's exit among their allowed IPs.
async fn the_agents_view(db: &Db) -> Result<()> {
    let api = db.start().await?;
    let c = &api.c;
    let Seed { first, second } = seed(c).await?;
    seed_gateway(c, &first).await?;
    let (status, state) = c.get("/api/agent/state", Some(&second.credential)).await?;
    assert_eq!(status, StatusCode::OK, "{state}");
    let state: MeshState = serde_json::from_value(state)?;
    assert_eq!(state.node.name, "laptop");
    assert_eq!(state.peers.len(), 1);
    let border = &state.peers[0];
    assert_eq!(border.public_key, public_key(1));
    assert_eq!(
        border.allowed_ips,
        vec!["44.30.127.1/32".parse()?, "0.0.0.0/0".parse()?]
    );
    assert_eq!(border.endpoint.as_deref(), Some("192.0.2.10:51820"));
    api.stop().await;
    Ok(())
}

async fn bgp_learned_egress_ranges_and_pulses(db: &Db) -> Result<()> {
    let api = db.start().await?;
    let c = &api.c;
    let Seed { first, second } = seed(c).await?;
    seed_gateway(c, &first).await?;
    let report = |ranges: Value| {
        let c = &c;
        let credential = first.credential.clone();
        async move {
            c.post(
                "/api/agent/report",
                Some(&credential),
                json!({"bgp_ranges": ranges}),
            )
            .await
        }
    };
    let border_seen_by_laptop = || {
        let c = &c;
        let credential = second.credential.clone();
        async move {
            let (status, state) = c.get("/api/agent/state", Some(&credential)).await?;
            ensure!(status == StatusCode::OK, "{state}");
            let state: MeshState = serde_json::from_value(state)?;
            state.peers.into_iter().next().context("the border")
        }
    };
    // A gateway without `bgp` ignores what the node says it learns.
    let (status, v) = report(json!(["203.0.113.0/24"])).await?;
    assert!(status.is_success(), "{status} {v}");
    let seen = border_seen_by_laptop().await?;
    assert_eq!(
        seen.allowed_ips,
        vec!["44.30.127.1/32".parse()?, "0.0.0.0/0".parse()?]
    );
    refused(
        c.post(
            &format!("/api/nodes/mynet/{}/creategateway", first.node.id),
            Some(MASTER),
            json!({"ranges": []}),
        )
        .await?,
        StatusCode::BAD_REQUEST,
        "bgp: true",
    );
    let (status, v) = c
        .post(
            &format!("/api/nodes/mynet/{}/creategateway", first.node.id),
            Some(MASTER),
            json!({"ranges": [], "bgp": true}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    let seen = border_seen_by_laptop().await?;
    assert_eq!(
        seen.allowed_ips,
        vec!["44.30.127.1/32".parse()?, "203.0.113.0/24".parse()?],
        "what it reported before counts now"
    );
    let (status, v) = report(json!([
        "198.51.100.0/24",
        "203.0.113.0/24",
        "198.51.100.0/24"
    ]))
    .await?;
    assert!(status.is_success(), "{status} {v}");
    let seen = border_seen_by_laptop().await?;
    let egress = seen.egress.context("egress")?;
    assert!(egress.bgp && egress.ranges.is_empty());
    assert_eq!(
        egress.bgp_ranges,
        vec!["198.51.100.0/24".parse()?, "203.0.113.0/24".parse()?],
        "sorted, once each"
    );
    refused(
        report(json!(["198.51.100.7/24"])).await?,
        StatusCode::BAD_REQUEST,
        "host bits",
    );
    let too_many: Vec<String> = (0..=bgp4mesh_api::MAX_BGP_RANGES)
        .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
        .collect();
    refused(
        report(json!(too_many)).await?,
        StatusCode::BAD_REQUEST,
        "at most",
    );
    let seen = border_seen_by_laptop().await?;
    assert_eq!(
        seen.egress.map(|g| g.bgp_ranges.len()),
        Some(2),
        "a refused report changes nothing"
    );
    // A gateway's pulse: a node credential and a short body, nothing else.
    let (status, v) = c
        .post(
            "/api/agent/pulse",
            Some(&first.credential),
            json!({"upstream": true}),
        )
        .await?;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    refused(
        c.post(
            "/api/agent/pulse",
            Some(&first.credential),
            json!({"upstream": "yes"}),
        )
        .await?,
        StatusCode::BAD_REQUEST,
        "upstream",
    );
    refused(
        c.post("/api/agent/pulse", Some(MASTER), json!({})).await?,
        StatusCode::FORBIDDEN,
        "node credential",
    );
    // Back to the seed's gateway for the rest.
    let (status, v) = c
        .post(
            &format!("/api/nodes/mynet/{}/creategateway", first.node.id),
            Some(MASTER),
            json!({"ranges": ["0.0.0.0/0"], "natEnabled": "no"}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    api.stop().await;
    Ok(())
}

async fn scoped_keys(db: &Db) -> Result<()> {
    let api = db.start().await?;
    let c = &api.c;
    let Seed { second, .. } = seed(c).await?;
    full_network(c).await?;
    let scoped = |scope: &'static str| {
        let c = &c;
        async move {
            let (status, v) = c
                .post("/api/apitokens", Some(MASTER), json!({"scope": scope}))
                .await?;
            ensure!(status == StatusCode::OK, "{v}");
            v["token"].as_str().map(str::to_string).context("secret")
        }
    };
    let other_only = scoped("network:other").await?;
    let reader = scoped("read").await?;
    refused(
        c.get("/api/nodes/mynet", Some(&other_only)).await?,
        StatusCode::FORBIDDEN,
        "may not",
    );
    let (status, nodes) = c.get("/api/nodes/other", Some(&other_only)).await?;
    assert_eq!(status, StatusCode::OK, "{nodes}");
    assert_eq!(nodes.as_array().map(Vec::len), Some(6));
    let (status, _) = c.get("/api/nodes/mynet", Some(&reader)).await?;
    assert_eq!(status, StatusCode::OK);
    refused(
        c.post(
            "/api/networks",
            Some(&reader),
            json!({"netid": "x", "addressrange": "10.9.0.0/24"}),
        )
        .await?,
        StatusCode::FORBIDDEN,
        "may not",
    );
    refused(
        c.get("/api/nodes", Some(&second.credential)).await?,
        StatusCode::FORBIDDEN,
        "agent API",
    );
    refused(
        c.post(
            "/api/apitokens",
            Some(MASTER),
            json!({"scope": "everything"}),
        )
        .await?,
        StatusCode::BAD_REQUEST,
        "scope",
    );
    api.stop().await;
    Ok(())
}

/// A snapshot, then the deletion of a peer; resumed at a revision, only
/// what came after.
async fn the_push_stream(db: &Db) -> Result<()> {
    let api = db.start().await?;
    let c = &api.c;
    let Seed { first, second } = seed(c).await?;
    seed_gateway(c, &first).await?;
    let c2 = &c;
    let border_id = first.node.id.clone();
    let events = stream_events(c, &second.credential, None, 2, async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (status, v) = c2
            .delete(&format!("/api/nodes/mynet/{border_id}"), Some(MASTER))
            .await?;
        ensure!(status == StatusCode::NO_CONTENT, "{v}");
        Ok(())
    })
    .await?;
    assert!(
        matches!(events.first(), Some(StreamEvent::Snapshot(s)) if s.peers.len() == 1),
        "{events:?}"
    );
    let removed_at = match events.get(1) {
        Some(StreamEvent::PeerRemove { node_id, revision }) if *node_id == first.node.id => {
            *revision
        }
        other => anyhow::bail!("expected the border's removal, got {other:?}"),
    };
    // The released address goes to the next node; a stream resumed at the
    // removal's revision gets only the join.
    let (_, more) = token(c, "mynet", json!({})).await?;
    let (status, third) = join(c, &more.secret, "desktop", 7, json!({})).await?;
    assert_eq!(status, StatusCode::OK, "{third}");
    let third: JoinResponse = serde_json::from_value(third)?;
    assert_eq!(
        third.node.address,
        Some("44.30.127.1".parse()?),
        "released address reused"
    );
    let resumed =
        stream_events(c, &second.credential, Some(removed_at), 1, async { Ok(()) }).await?;
    assert!(
        matches!(resumed.as_slice(), [StreamEvent::PeerUpsert { peer, .. }] if peer.name == "desktop"),
        "{resumed:?}"
    );
    api.stop().await;
    Ok(())
}

/// The API description and the metrics (eight nodes: the seed's two and
/// a full network's six).
async fn documents(db: &Db) -> Result<()> {
    let api = db.start().await?;
    let c = &api.c;
    seed(c).await?;
    full_network(c).await?;
    let (status, doc) = c.get("/api/openapi.json", Some(MASTER)).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["paths"]["/api/nodes/{netid}/{node}/creategateway"]["post"].is_object());
    let metrics = c
        .http
        .get(format!("{}/metrics", c.base))
        .bearer_auth(MASTER)
        .send()
        .await?
        .text()
        .await?;
    assert!(metrics.contains("bgp4mesh_nodes 8"), "{metrics}");
    assert!(metrics.contains("bgp4mesh_connections_open "), "{metrics}");
    api.stop().await;
    Ok(())
}

/// A node publishes an IPv6 endpoint next to its IPv4 one: it is kept
/// (across a restart), shown, and handed to its peers with the listen port;
/// what cannot work is refused naming `endpoint6`.
async fn ipv6_endpoints_next_to_ipv4_ones(db: &Db) -> Result<()> {
    let api = db.start().await?;
    let c = &api.c;
    network(c, "mynet", "44.30.127.0/24").await?;
    let (_, enrollment) = token(c, "mynet", json!({"uses": 10})).await?;
    for extra in [
        json!({"endpoint": "192.0.2.10", "endpoint6": "192.0.2.11"}),
        json!({"endpoint": "192.0.2.10", "endpoint6": "[::ffff:192.0.2.11]:5"}),
        json!({"endpoint": "192.0.2.10", "endpoint6": "[2001:db8::1]:0"}),
        json!({"endpoint": "192.0.2.10", "endpoint6": "ff02::1"}),
        json!({"endpoint6": "2001:db8::1"}),
        json!({"endpoint": "[2001:db8::2]:51820", "endpoint6": "2001:db8::1"}),
        json!({"endpoint": "192.0.2.10", "endpoint6": "somewhere"}),
    ] {
        refused(
            join(c, &enrollment.secret, "bad", 100, extra).await?,
            StatusCode::BAD_REQUEST,
            "endpoint6",
        );
    }
    let (status, v) = join(
        c,
        &enrollment.secret,
        "dual",
        1,
        json!({"endpoint": "192.0.2.10", "endpoint6": "2001:db8::10", "listen_port": 51000}),
    )
    .await?;
    ensure!(status == StatusCode::OK, "{v}");
    let dual: JoinResponse = serde_json::from_value(v)?;
    assert_eq!(dual.node.endpoint6.as_deref(), Some("[2001:db8::10]:51000"));
    let (status, v) = join(
        c,
        &enrollment.secret,
        "other",
        2,
        json!({"endpoint": "192.0.2.20:51820", "endpoint6": "[2001:db8::20]:4500"}),
    )
    .await?;
    ensure!(status == StatusCode::OK, "{v}");
    let other: JoinResponse = serde_json::from_value(v)?;
    let (_, state) = c.get("/api/agent/state", Some(&other.credential)).await?;
    let state: MeshState = serde_json::from_value(state)?;
    let peer = state
        .peers
        .iter()
        .find(|p| p.node_id == dual.node.id)
        .context("peer")?;
    assert_eq!(peer.endpoint.as_deref(), Some("192.0.2.10:51000"));
    assert_eq!(peer.endpoint6.as_deref(), Some("[2001:db8::10]:51000"));
    api.stop().await;
    let api = db.start().await?;
    let c = &api.c;
    let (status, v) = c
        .get(&format!("/api/nodes/mynet/{}", other.node.id), Some(MASTER))
        .await?;
    ensure!(status == StatusCode::OK, "{v}");
    assert_eq!(
        v["endpoint6"], "[2001:db8::20]:4500",
        "kept across a restart"
    );
    api.stop().await;
    Ok(())
}

/// A restart on the same store keeps everything.
async fn a_restart_keeps_everything(db: &Db) -> Result<()> {
    let api = db.start().await?;
    let (c, running) = (&api.c, &api.running);
    let fingerprint = running.fingerprint.clone();
    let Seed { first, .. } = seed(c).await?;
    seed_gateway(c, &first).await?;
    let (status, v) = c
        .delete(&format!("/api/nodes/mynet/{}", first.node.id), Some(MASTER))
        .await?;
    ensure!(status == StatusCode::NO_CONTENT, "{v}");
    let (_, more) = token(c, "mynet", json!({})).await?;
    let (status, v) = join(c, &more.secret, "desktop", 7, json!({})).await?;
    ensure!(status == StatusCode::OK, "{v}");
    let revision = running.controller.hub.revision();
    api.stop().await;
    let api = db.start().await?;
    let (c, running) = (&api.c, &api.running);
    assert_eq!(running.controller.hub.revision(), revision);
    let (status, nodes) = c.get("/api/nodes/mynet", Some(MASTER)).await?;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = nodes
        .as_array()
        .context("list")?
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(names, vec!["laptop", "desktop"]);
    assert_eq!(running.fingerprint, fingerprint, "the certificate is kept");
    api.stop().await;
    Ok(())
}

// What the security review of issue 15 found, refused: requests without a
// key learn nothing (`authentication`), nonsense is refused with the field
// named, a node cannot move another node's endpoint, a gateway cannot
// claim another node's address.

async fn nonsense_is_refused_naming_the_field(db: &Db) -> Result<()> {
    let api = db.start().await?;
    let c = &api.c;
    network(c, "mynet", "44.30.127.0/24").await?;
    for expires in [json!(0), json!(u64::MAX), json!(400_000_000u64)] {
        refused(
            c.post(
                "/api/tokens",
                Some(MASTER),
                json!({"network": "mynet", "expires_in": expires}),
            )
            .await?,
            StatusCode::BAD_REQUEST,
            "expires_in",
        );
    }
    let many: Vec<String> = (0..10_000).map(|i| format!("t{i}")).collect();
    for (tags, status, says) in [
        (json!(many), StatusCode::BAD_REQUEST, "tags"),
        (
            json!(["x".repeat(1 << 20)]),
            StatusCode::BAD_REQUEST,
            "tags",
        ),
    ] {
        let body = json!({"network": "mynet", "tags": tags});
        refused(
            c.post("/api/tokens", Some(MASTER), body).await?,
            status,
            says,
        );
    }
    // A body too large to read leaves the connection unusable: the 413
    // says so, and the next request on the pool gets a fresh connection.
    let oversized = c
        .http
        .post(format!("{}/api/tokens", c.base))
        .bearer_auth(MASTER)
        .json(&json!({"network": "mynet", "tags": ["x".repeat(3 << 20)]}))
        .send()
        .await?;
    assert_eq!(oversized.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        oversized.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    let said: Value = oversized.json().await?;
    let said = said["message"].as_str().unwrap_or_default();
    assert!(said.contains("length limit"), "{said}");
    refused(
        c.post(
            "/api/networks",
            Some(MASTER),
            json!({"netid": "x", "addressrange": "10.9.0.0/24", "listen_port": 0}),
        )
        .await?,
        StatusCode::BAD_REQUEST,
        "listen_port",
    );
    api.stop().await;
    Ok(())
}

async fn a_networks_key_goes_with_its_network(db: &Db) -> Result<()> {
    let api = db.start().await?;
    let c = &api.c;
    network(c, "mynet", "44.30.127.0/24").await?;
    let (tok, _) = token(c, "mynet", json!({})).await?;
    let (status, _) = c
        .post(
            "/api/networks",
            Some(MASTER),
            json!({"netid": "gone", "addressrange": "10.8.0.0/24"}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    let (status, scoped) = c
        .post(
            "/api/apitokens",
            Some(MASTER),
            json!({"scope": "network:gone"}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    let scoped = scoped["token"].as_str().context("token")?.to_string();
    let (status, _) = c.get("/api/networks/gone", Some(&scoped)).await?;
    assert_eq!(status, StatusCode::OK);
    // It cannot tell another network's token from a missing one.
    refused(
        c.delete(&format!("/api/tokens/{}", tok.id), Some(&scoped))
            .await?,
        StatusCode::NOT_FOUND,
        "no enrollment token",
    );
    let (status, _) = c.delete("/api/networks/gone", Some(MASTER)).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    refused(
        c.get("/api/networks", Some(&scoped)).await?,
        StatusCode::UNAUTHORIZED,
        "unknown key",
    );
    api.stop().await;
    Ok(())
}

/// Nodes' endpoints, and who may say where a node is.
async fn who_may_say_where_a_node_is(db: &Db) -> Result<()> {
    let api = db.start().await?;
    let (c, running) = (&api.c, &api.running);
    let revision = |running: &Running| running.controller.hub.revision();
    let (enrollment, nodes) = hard_network(c).await?;
    for endpoint in [
        "0.0.0.0:0",
        "203.0.113.1:0",
        "255.255.255.255:51820",
        "224.0.0.1:5",
        "::",
    ] {
        refused(
            join(
                c,
                &enrollment.secret,
                "bad",
                100,
                json!({"endpoint": endpoint}),
            )
            .await?,
            StatusCode::BAD_REQUEST,
            "endpoint",
        );
    }
    refused(
        join(c, &enrollment.secret, "bad", 100, json!({"listen_port": 0})).await?,
        StatusCode::BAD_REQUEST,
        "listen_port",
    );
    let (natted, hub, other) = (&nodes[0], &nodes[1], &nodes[2]);
    let endpoint_seen_by = |viewer: &JoinResponse| {
        let viewer = viewer.credential.clone();
        let id = natted.node.id.clone();
        async move {
            let (_, state) = c.get("/api/agent/state", Some(&viewer)).await?;
            let state: MeshState = serde_json::from_value(state)?;
            let peer = state
                .peers
                .iter()
                .find(|p| p.node_id == id)
                .context("peer")?;
            anyhow::Ok(peer.endpoint.clone())
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    // `from` reports seeing `about` at `endpoint`, with a handshake then.
    let report = |from: &JoinResponse, about: &JoinResponse, endpoint: String, handshake| {
        let body = json!({"peers": [{
            "public_key": about.node.public_key,
            "endpoint": endpoint,
            "last_handshake": handshake,
            "rx_bytes": 0, "tx_bytes": 0,
        }]});
        let credential = from.credential.clone();
        async move {
            let (status, reply) = c.post("/api/agent/report", Some(&credential), body).await?;
            ensure!(status == StatusCode::NO_CONTENT, "report: {status} {reply}");
            anyhow::Ok(())
        }
    };
    let forged = || "6.6.6.6:666".to_string();
    // A forged report: no session with the peer. 100 of them change nothing.
    let before = revision(running);
    for _ in 0..100 {
        report(hub, natted, forged(), None).await?;
    }
    // Claiming a session the peer does not confirm changes nothing either.
    report(hub, natted, forged(), Some(now)).await?;
    assert_eq!(revision(running), before, "a forged report made a revision");
    assert_eq!(endpoint_seen_by(other).await?, None);
    // The peer confirms the session: the observation is used, once.
    report(natted, hub, "198.51.100.2:51820".into(), Some(now)).await?;
    report(hub, natted, "192.0.2.50:40000".into(), Some(now)).await?;
    let seen = Some("192.0.2.50:40000".to_string());
    assert_eq!(endpoint_seen_by(other).await?, seen);
    let once = revision(running);
    assert_eq!(once, before + 1);
    // At most one move per interval, however many reports.
    for port in 40001..40021 {
        report(hub, natted, format!("192.0.2.50:{port}"), Some(now)).await?;
    }
    assert_eq!(revision(running), once);
    assert_eq!(endpoint_seen_by(other).await?, seen);
    api.stop().await;
    Ok(())
}

/// What a gateway may carry.
async fn gateway_ranges(db: &Db) -> Result<()> {
    let api = db.start().await?;
    let (c, running) = (&api.c, &api.running);
    let revision = |running: &Running| running.controller.hub.revision();
    let (_, nodes) = hard_network(c).await?;
    let (natted, hub) = (&nodes[0], &nodes[1]);
    let gateway = |ranges: Value| {
        let path = format!("/api/nodes/hard/{}/creategateway", hub.node.id);
        async move { c.post(&path, Some(MASTER), json!({"ranges": ranges})).await }
    };
    let before = revision(running);
    let address = natted.node.address.context("address")?;
    for (range, says) in [
        (format!("{address}/32"), "network's own range"),
        ("10.7.0.128/25".to_string(), "network's own range"),
        ("fd07::5/128".to_string(), "network's own range"),
        ("127.0.0.0/8".to_string(), "loopback"),
        ("169.254.1.0/24".to_string(), "link-local"),
        ("239.1.0.0/16".to_string(), "multicast"),
        ("255.255.255.255/32".to_string(), "broadcast"),
        ("0.0.0.0/8".to_string(), "this network"),
        ("fe80::/64".to_string(), "link-local"),
    ] {
        refused(
            gateway(json!(["203.0.113.0/24", range])).await?,
            StatusCode::BAD_REQUEST,
            &format!("ranges: {}", range.parse::<ipnet::IpNet>()?),
        );
        refused(
            gateway(json!([range])).await?,
            StatusCode::BAD_REQUEST,
            says,
        );
    }
    let too_many: Vec<String> = (0..1001)
        .map(|i| format!("100.{}.{}.0/24", 64 + i / 256, i % 256))
        .collect();
    refused(
        gateway(json!(too_many)).await?,
        StatusCode::BAD_REQUEST,
        "at most 1000",
    );
    assert_eq!(
        revision(running),
        before,
        "a refused gateway made a revision"
    );
    let (status, node) = gateway(json!(["0.0.0.0/0", "::/0", "10.0.0.0/8"])).await?;
    assert_eq!(status, StatusCode::OK, "{node}");
    assert_eq!(revision(running), before + 1);
    api.stop().await;
    Ok(())
}

/// Endpoint discovery (on by default, at the API's port and the next) is
/// told to nodes with their network and answers on UDP; a node's
/// candidates, checked, reach it and its peers in one change.
async fn candidates_and_discovery(db: &Db) -> Result<()> {
    use bgp4mesh_api::NatMapping;
    use bgp4mesh_api::discovery::{parse_answer, request};
    let api = db.start().await?;
    let (c, running) = (&api.c, &api.running);
    let Seed { first, second } = seed(c).await?;
    let discovery = running.discovery.context("discovery is on by default")?;
    assert_eq!(first.network.discovery_port, Some(discovery.port()));
    let (_, net) = c.get("/api/networks/mynet", Some(MASTER)).await?;
    assert_eq!(net["discovery_port"], json!(discovery.port()));
    // Both ports answer a request with where it came from.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    for port in [discovery.port(), discovery.port() + 1] {
        let id = [port as u8; 16];
        udp.send_to(&request(&id), ("127.0.0.1", port)).await?;
        let mut buf = [0u8; 64];
        let (len, _) =
            tokio::time::timeout(Duration::from_secs(5), udp.recv_from(&mut buf)).await??;
        assert_eq!(parse_answer(&buf[..len]), Some((id, udp.local_addr()?)));
    }
    udp.send_to(b"hello", ("127.0.0.1", discovery.port()))
        .await?;
    let metrics = loop {
        let resp = c
            .http
            .get(format!("{}/metrics", c.base))
            .bearer_auth(MASTER)
            .send()
            .await?
            .text()
            .await?;
        if resp.contains("bgp4mesh_discovery_malformed_total 1") {
            break resp;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        metrics.contains("bgp4mesh_discovery_answered_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("bgp4mesh_discovery_rate_limited_total 0"),
        "{metrics}"
    );

    // The laptop says where it may be reached: the border hears it in the
    // same change that tells the laptop its own.
    let report = |credential: &str, body: Value| {
        let credential = credential.to_string();
        async move { c.post("/api/agent/report", Some(&credential), body).await }
    };
    let candidates = json!([
        "[2001:db8::2]:51820",
        "198.51.100.2:40000",
        "192.168.1.2:51820"
    ]);
    let before = running.controller.hub.revision();
    let laptop_report = async {
        let (status, v) = report(
            &second.credential,
            json!({"candidates": candidates, "nat": "endpoint_independent"}),
        )
        .await?;
        ensure!(status == StatusCode::NO_CONTENT, "report: {status} {v}");
        Ok(())
    };
    let events = stream_events(c, &first.credential, Some(before), 1, laptop_report).await?;
    let [StreamEvent::PeerUpsert { revision, peer }] = events.as_slice() else {
        anyhow::bail!("the border got {events:?}");
    };
    assert_eq!(peer.node_id, second.node.id);
    assert_eq!(serde_json::to_value(&peer.candidates)?, candidates);
    assert_eq!(peer.nat, Some(NatMapping::EndpointIndependent));
    assert_eq!(*revision, before + 1, "one change");
    let events = stream_events(c, &second.credential, Some(before), 1, async { Ok(()) }).await?;
    let [
        StreamEvent::SelfUpdate {
            revision: own,
            node,
            ..
        },
    ] = events.as_slice()
    else {
        anyhow::bail!("the laptop got {events:?}");
    };
    assert_eq!(own, revision, "the same change");
    assert_eq!(serde_json::to_value(&node.candidates)?, candidates);
    // The same again is no change; None leaves them.
    report(&second.credential, json!({"candidates": candidates})).await?;
    report(&second.credential, json!({})).await?;
    assert_eq!(running.controller.hub.revision(), *revision);
    let (_, shown) = c
        .get(
            &format!("/api/nodes/mynet/{}", second.node.id),
            Some(MASTER),
        )
        .await?;
    let shown: Node = serde_json::from_value(shown)?;
    assert_eq!(serde_json::to_value(&shown.candidates)?, candidates);
    assert_eq!(shown.nat, Some(NatMapping::EndpointIndependent));
    // Bad ones are refused, named, and change nothing.
    for (bad, why) in [
        (json!(["127.0.0.1:51820"]), "127.0.0.1:51820"),
        (json!(["198.51.100.2:0"]), "198.51.100.2:0"),
        (json!(["[fe80::2]:51820"]), "link-local"),
        (json!(["224.0.0.1:51820"]), "multicast"),
        (json!(["nowhere"]), "nowhere"),
        (json!(vec!["198.51.100.2:1"; 9]), "at most 8"),
    ] {
        refused(
            report(&second.credential, json!({"candidates": bad})).await?,
            StatusCode::BAD_REQUEST,
            why,
        );
    }
    refused(
        report(&second.credential, json!({"nat": "symmetric"})).await?,
        StatusCode::BAD_REQUEST,
        "nat",
    );
    assert_eq!(running.controller.hub.revision(), *revision);
    // A node that publishes its endpoint is reached there.
    report(
        &first.credential,
        json!({"candidates": ["198.51.100.1:51820"]}),
    )
    .await?;
    let (_, state) = c.get("/api/agent/state", Some(&second.credential)).await?;
    let state: MeshState = serde_json::from_value(state)?;
    assert_eq!(serde_json::to_value(&state.node.candidates)?, candidates);
    assert!(state.peers.iter().all(|p| p.candidates.is_empty()));
    api.stop().await;
    Ok(())
}

/// An agent's stream held open (the node counts as connected) until it
/// is dropped.
async fn hold_stream(c: &Client, credential: &str) -> Result<reqwest::Response> {
    let resp = c
        .http
        .get(format!("{}/api/agent/stream", c.base))
        .bearer_auth(credential)
        .timeout(Duration::from_secs(60))
        .send()
        .await?;
    ensure!(resp.status() == StatusCode::OK, "stream: {}", resp.status());
    Ok(resp)
}

fn unhex<const N: usize>(text: &str) -> Result<[u8; N]> {
    ensure!(text.len() == 2 * N, "{text:?}: not {N} bytes of hex");
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(text.get(2 * i..2 * i + 2).context("hex")?, 16)?;
    }
    Ok(out)
}

/// Two public relays, two nodes behind NAT and a public node: the relays
/// register (not from behind NAT), their keys reach them alone, the pair
/// behind NAT gets one relay with matching credentials, and a relay whose
/// pulses stop hands its pair to the other, whose stream closing leaves
/// the pair none.
async fn relays(db: &Db) -> Result<()> {
    use bgp4mesh_api::relay::{Bind, verify};
    let api = db.start().await?;
    let c = &api.c;
    network(c, "mynet", "44.30.127.0/24").await?;
    let (_, enrollment) = token(c, "mynet", json!({"uses": 5})).await?;
    let mut nodes = std::collections::BTreeMap::new();
    for (name, key, extra) in [
        ("relay1", 1, json!({"endpoint": "192.0.2.10"})),
        ("relay2", 2, json!({"endpoint": "[2001:db8::11]:51820"})),
        ("a", 3, json!({})),
        ("b", 4, json!({})),
        ("pub", 5, json!({"endpoint": "192.0.2.20"})),
    ] {
        let (status, v) = join(c, &enrollment.secret, name, key, extra).await?;
        ensure!(status == StatusCode::OK, "join {name}: {status} {v}");
        nodes.insert(name, serde_json::from_value::<JoinResponse>(v)?);
    }
    let node = |name: &str| nodes.get(name).context("a node");
    let report = |name: &str, body: Value| {
        let credential = nodes.get(name).map(|n| n.credential.clone());
        async move {
            let credential = credential.context("a node")?;
            c.post("/api/agent/report", Some(&credential), body).await
        }
    };
    let state = |name: &str| {
        let credential = nodes.get(name).map(|n| n.credential.clone());
        async move {
            let (status, v) = c
                .get("/api/agent/state", Some(&credential.context("a node")?))
                .await?;
            ensure!(status == StatusCode::OK, "{v}");
            Ok(serde_json::from_value::<MeshState>(v)?)
        }
    };
    let path = |name: &'static str, peer: &'static str| async move {
        let id = node(peer)?.node.id.clone();
        let s = state(name).await?;
        let p = s.peers.into_iter().find(|p| p.node_id == id);
        Ok::<_, anyhow::Error>(p.context("the peer")?.relay)
    };
    // Behind NAT, no relay; port 0 is no port.
    refused(
        report("a", json!({"relay_port": 51821})).await?,
        StatusCode::BAD_REQUEST,
        "relay_port",
    );
    refused(
        report("relay1", json!({"relay_port": 0})).await?,
        StatusCode::BAD_REQUEST,
        "relay_port",
    );
    let mut streams = std::collections::BTreeMap::new();
    for name in ["relay1", "relay2", "a", "b", "pub"] {
        streams.insert(name, hold_stream(c, &node(name)?.credential).await?);
    }
    for (name, body) in [
        ("a", json!({"candidates": ["203.0.113.3:40000"]})),
        ("b", json!({"candidates": ["203.0.113.4:40000"]})),
        ("relay1", json!({"relay_port": 51821})),
        ("relay2", json!({"relay_port": 51821})),
    ] {
        let (status, v) = report(name, body).await?;
        ensure!(status == StatusCode::NO_CONTENT, "{name}: {status} {v}");
    }
    // The keys: each relay its own, nobody else any.
    let mut keys = std::collections::BTreeMap::new();
    for name in ["relay1", "relay2"] {
        let s = state(name).await?;
        assert_eq!(s.node.relay_port, Some(51821), "{name}");
        keys.insert(name, unhex::<32>(&s.relay_key.context("its key")?)?);
    }
    assert_ne!(keys.get("relay1"), keys.get("relay2"));
    let hexes: Vec<String> = keys
        .values()
        .map(|k| k.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    let (_, list) = c.get("/api/nodes/mynet", Some(MASTER)).await?;
    let (_, shown) = c
        .get(
            &format!("/api/nodes/mynet/{}", node("relay1")?.node.id),
            Some(MASTER),
        )
        .await?;
    assert_eq!(shown["relay_port"], json!(51821));
    for name in ["a", "b", "pub"] {
        let s = state(name).await?;
        assert_eq!(s.relay_key, None, "{name}");
    }
    for text in [list.to_string(), shown.to_string()] {
        assert!(hexes.iter().all(|h| !text.contains(h.as_str())), "{text}");
    }
    // The pair behind NAT: one relay, one channel, a side each, and
    // credentials the relay's key checks.
    let ab = path("a", "b").await?.context("a's relay path")?;
    let ba = path("b", "a").await?.context("b's relay path")?;
    assert_eq!((&ab.node_id, &ab.channel), (&ba.node_id, &ba.channel));
    assert_eq!(ab.side + ba.side, 1, "opposite sides");
    let chosen = if ab.node_id == node("relay1")?.node.id {
        "relay1"
    } else {
        "relay2"
    };
    let other = if chosen == "relay1" {
        "relay2"
    } else {
        "relay1"
    };
    assert_eq!(
        ab.address,
        if chosen == "relay1" {
            "192.0.2.10:51821"
        } else {
            "[2001:db8::11]:51821"
        }
    );
    let key = keys.get(chosen).context("the key")?;
    for p in [&ab, &ba] {
        let bind = Bind {
            channel: unhex::<8>(&p.channel)?,
            side: p.side,
            expires: p.expires,
            mac: unhex::<32>(&p.mac)?,
        };
        assert!(verify(key, &bind, p.expires - 86400), "{p:?}");
    }
    assert_eq!(
        path("a", "pub").await?,
        None,
        "a public peer is reached directly"
    );
    assert_eq!(path("pub", "a").await?, None);
    assert_eq!(path("relay1", "b").await?, None);
    // Peers see the live relays' ports (to measure their round trips).
    let relay_ids = [
        node("relay1")?.node.id.clone(),
        node("relay2")?.node.id.clone(),
    ];
    let seen = state("a").await?.peers;
    for p in &seen {
        let relays = relay_ids.contains(&p.node_id);
        assert_eq!(p.relay_port, relays.then_some(51821), "{}", p.name);
    }
    // Round trips to relays: checked; ids that are not relays left out.
    let rtt = |id: &str, us: u64| json!({"node_id": id, "rtt_us": us});
    let many: Vec<Value> = (0..65).map(|_| rtt(&relay_ids[0], 1000)).collect();
    refused(
        report("a", json!({"relay_rtts": many})).await?,
        StatusCode::BAD_REQUEST,
        "relay_rtts",
    );
    refused(
        report("a", json!({"relay_rtts": [rtt(&relay_ids[0], 10_000_001)]})).await?,
        StatusCode::BAD_REQUEST,
        "relay_rtts",
    );
    let pub_id = node("pub")?.node.id.clone();
    let (status, v) = report(
        "a",
        json!({"relay_rtts": [rtt("no-such-node", 1), rtt(&pub_id, 1)]}),
    )
    .await?;
    ensure!(status == StatusCode::NO_CONTENT, "{v}");
    assert_eq!(path("a", "b").await?, Some(ab.clone()), "nothing moved");
    // The chosen relay is far for both, the other near: the pair moves to
    // the other, both ends; and back when that turns around.
    let (chosen_id, other_id) = (node(chosen)?.node.id.clone(), node(other)?.node.id.clone());
    for (near, far) in [(&other_id, &chosen_id), (&chosen_id, &other_id)] {
        for name in ["a", "b"] {
            let body = json!({"relay_rtts": [rtt(near, 8_000), rtt(far, 150_000)]});
            let (status, v) = report(name, body).await?;
            ensure!(status == StatusCode::NO_CONTENT, "{v}");
        }
        let ab = path("a", "b").await?.context("a's relay path")?;
        let ba = path("b", "a").await?.context("b's relay path")?;
        assert_eq!(&ab.node_id, near);
        assert_eq!((&ba.node_id, &ba.channel), (near, &ab.channel));
    }
    // Both relays pulse; the chosen one stops: within about a second the
    // pair is on the other, in a change a's stream gets.
    for name in [chosen, other] {
        let (status, v) = c
            .post("/api/agent/pulse", Some(&node(name)?.credential), json!({}))
            .await?;
        ensure!(status == StatusCode::NO_CONTENT, "{v}");
    }
    let before = api.running.controller.hub.revision();
    let other_credential = node(other)?.credential.clone();
    let keep_pulsing = async {
        for _ in 0..12 {
            c.post("/api/agent/pulse", Some(&other_credential), json!({}))
                .await?;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        Ok(())
    };
    let b_id = node("b")?.node.id.clone();
    let started = std::time::Instant::now();
    let events = stream_events(c, &node("a")?.credential, Some(before), 2, keep_pulsing).await?;
    let moved = events.iter().find_map(|e| match e {
        StreamEvent::PeerUpsert { peer, .. } if peer.node_id == b_id => peer.relay.clone(),
        _ => None,
    });
    let moved = moved.with_context(|| format!("a got {events:?}"))?;
    assert_eq!(moved.node_id, node(other)?.node.id);
    assert!(started.elapsed() < Duration::from_secs(5));
    let (_, shown) = c
        .get(
            &format!("/api/nodes/mynet/{}", node(chosen)?.node.id),
            Some(MASTER),
        )
        .await?;
    assert_eq!(shown.get("relay_port"), None, "not live");
    // The other's stream closes: no relay is left.
    streams.remove(other);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while path("a", "b").await?.is_some() {
        ensure!(tokio::time::Instant::now() < deadline, "the path stays");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(streams);
    api.stop().await;
    Ok(())
}

/// With `[discovery] enabled = false` nothing listens on UDP and nodes are
/// told of no discovery port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_can_be_turned_off() -> Result<()> {
    let dir = state_dir("nodiscovery");
    let config = ServerConfig::parse(&format!(
        "listen = \"127.0.0.1:0\"\nmaster_key = \"{MASTER}\"\nstate_dir = \"{}\"\n[discovery]\nenabled = false\n",
        dir.display()
    ))?;
    let running = start(&config).await?;
    assert!(running.discovery.is_none());
    let c = Client::new(&running, &dir)?;
    network(&c, "m", "10.1.0.0/24").await?;
    let (_, net) = c.get("/api/networks/m", Some(MASTER)).await?;
    assert!(net.get("discovery_port").is_none(), "{net}");
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The state directory the controller makes is 0700; the database, its
/// WAL and shared-memory files and the TLS key are 0600.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_files_are_private() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = state_dir("modes");
    let state = dir.join("state");
    std::fs::create_dir_all(&dir)?;
    let config = ServerConfig::parse(&format!(
        "listen = \"127.0.0.1:0\"\nmaster_key = \"{MASTER}\"\nstate_dir = \"{}\"\n",
        state.display()
    ))?;
    let running = start(&config).await?;
    let c = Client::new(&running, &state)?;
    let (status, _) = c
        .post(
            "/api/networks",
            Some(MASTER),
            json!({"netid": "m", "addressrange": "10.1.0.0/24"}),
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    let mode = |name: &str| -> Result<u32> {
        Ok(std::fs::metadata(state.join(name))?.permissions().mode() & 0o777)
    };
    assert_eq!(mode("")?, 0o700, "the state directory");
    for file in [
        "controller.db",
        "controller.db-wal",
        "controller.db-shm",
        "controller.key",
    ] {
        assert_eq!(mode(file)?, 0o600, "{file}");
    }
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The seed's two curl calls, byte for byte (only the host differs, and
/// curl is told to trust the controller's own certificate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_curl_calls_work_verbatim() -> Result<()> {
    if !can_run!(&["curl"]) {
        return Ok(());
    }
    let dir = state_dir("curl");
    std::fs::create_dir_all(&dir)?;
    let running = start_controller("sqlite::memory:", &dir).await?;
    let host = format!("localhost:{}", running.addr.port());
    let cacert = dir.join("controller.crt");
    let curl = |args: Vec<String>| {
        let cacert = cacert.clone();
        async move {
            let out = tokio::process::Command::new("curl")
                .arg("-sS")
                .arg("--cacert")
                .arg(&cacert)
                .arg("-w")
                .arg("\n%{http_code}")
                .args(args)
                .env("MASTER_KEY", MASTER)
                .output()
                .await?;
            ensure!(
                out.status.success(),
                "curl: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8(out.stdout)?;
            let (body, code) = text.rsplit_once('\n').context("status line")?;
            Ok::<_, anyhow::Error>((code.to_string(), body.to_string()))
        }
    };
    // Step 2 of the seed.
    let (code, body) = curl(vec![
        "-X".into(),
        "POST".into(),
        format!("https://{host}/api/networks"),
        "-H".into(),
        format!("Authorization: Bearer {MASTER}"),
        "-H".into(),
        "Content-Type: application/json".into(),
        "-d".into(),
        r#"{"netid": "mynet", "addressrange": "44.30.127.0/24"}"#.into(),
    ])
    .await?;
    assert_eq!(code, "200", "{body}");
    let net: Value = serde_json::from_str(&body)?;
    assert_eq!(net["netid"], "mynet");
    // A node to make the gateway of.
    let c = Client::new(&running, &dir)?;
    let (_, enrollment) = token(&c, "mynet", json!({})).await?;
    let (status, border) = join(&c, &enrollment.secret, "bird-border", 9, json!({})).await?;
    assert_eq!(status, StatusCode::OK);
    let node_id = border["node"]["id"].as_str().context("id")?.to_string();
    // Step 4 of the seed.
    let (code, body) = curl(vec![
        "-X".into(),
        "POST".into(),
        format!("https://{host}/api/nodes/mynet/{node_id}/creategateway"),
        "-H".into(),
        format!("Authorization: Bearer {MASTER}"),
        "-H".into(),
        "Content-Type: application/json".into(),
        "-d".into(),
        r#"{"ranges":["0.0.0.0/0"],"natEnabled":"no"}"#.into(),
    ])
    .await?;
    assert_eq!(code, "200", "{body}");
    let node: Value = serde_json::from_str(&body)?;
    assert_eq!(node["egress"]["ranges"], json!(["0.0.0.0/0"]));
    assert_eq!(node["egress"]["nat"], json!(false));
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
