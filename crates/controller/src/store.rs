//! The controller's store: SQLite (a file, zero set-up) or PostgreSQL (by
//! URL, for a highly-available controller), through one code path (sqlx's
//! `Any` driver, portable SQL with `$n` parameters). Each dialect has its
//! own migrations; the version applied is kept in `schema_version`.
//!
//! Every write runs in a transaction and records a change with a new
//! revision in `changes`, so a killed controller loses no committed change
//! and restarts at the right revision. SQLite runs in WAL mode with
//! `synchronous=FULL`.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Row};

/// Which database the URL named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

#[derive(Debug)]
pub enum StoreError {
    /// A unique key already exists (name, public key, address…).
    Conflict(String),
    NotFound(String),
    Database(sqlx::Error),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Conflict(m) | StoreError::NotFound(m) => f.write_str(m),
            StoreError::Database(e) => write!(f, "database: {e}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> StoreError {
        if let sqlx::Error::Database(db) = &e
            && db.is_unique_violation()
        {
            return StoreError::Conflict(db.message().to_string());
        }
        StoreError::Database(e)
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The key of the PostgreSQL advisory lock writes take ("bgp4mesh" in
/// ASCII).
const WRITE_LOCK: i64 = 0x6267_7034_6d65_7368;

/// Schema changes, in order; each applied once, in a transaction. The SQL
/// is written to mean the same on SQLite and PostgreSQL (TEXT, BIGINT,
/// plain constraints); a change that cannot be should get a per-dialect
/// entry here.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE networks (
    netid TEXT PRIMARY KEY,
    addressrange TEXT,
    addressrange6 TEXT,
    mtu BIGINT NOT NULL,
    listen_port BIGINT NOT NULL,
    persistent_keepalive BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE enrollment_tokens (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL UNIQUE,
    network TEXT NOT NULL REFERENCES networks(netid) ON DELETE CASCADE,
    expires_at BIGINT,
    uses_left BIGINT,
    tags TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    network TEXT NOT NULL REFERENCES networks(netid) ON DELETE CASCADE,
    name TEXT NOT NULL,
    public_key TEXT NOT NULL,
    credential_hash TEXT NOT NULL UNIQUE,
    address TEXT,
    address6 TEXT,
    endpoint TEXT,
    listen_port BIGINT NOT NULL,
    tags TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (network, name),
    UNIQUE (network, public_key),
    UNIQUE (network, address),
    UNIQUE (network, address6)
);
CREATE TABLE gateways (
    node_id TEXT PRIMARY KEY REFERENCES nodes(id) ON DELETE CASCADE,
    ranges TEXT NOT NULL,
    nat BIGINT NOT NULL,
    metric BIGINT NOT NULL
);
CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL UNIQUE,
    scope TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE changes (
    revision BIGINT PRIMARY KEY,
    network TEXT NOT NULL,
    node_id TEXT,
    kind TEXT NOT NULL,
    at BIGINT NOT NULL
);
"#,
    r#"
ALTER TABLE gateways ADD COLUMN bgp BIGINT NOT NULL DEFAULT 0
"#,
    r#"
ALTER TABLE nodes ADD COLUMN endpoint6 TEXT
"#,
    r#"
CREATE TABLE controllers (
    url TEXT PRIMARY KEY,
    fingerprint TEXT,
    seen_at BIGINT NOT NULL
)
"#,
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRow {
    pub netid: String,
    pub addressrange: Option<String>,
    pub addressrange6: Option<String>,
    pub mtu: u16,
    pub listen_port: u16,
    pub persistent_keepalive: u16,
    pub created_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub id: String,
    pub secret_hash: String,
    pub network: String,
    pub expires_at: Option<u64>,
    pub uses_left: Option<u32>,
    pub tags: Vec<String>,
    pub created_at: u64,
}

/// One recorded change: its revision, network, node (none for a
/// network's own changes) and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRow {
    pub revision: u64,
    pub network: String,
    pub node_id: Option<String>,
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub id: String,
    pub network: String,
    pub name: String,
    pub public_key: String,
    pub credential_hash: String,
    pub address: Option<Ipv4Addr>,
    pub address6: Option<Ipv6Addr>,
    pub endpoint: Option<String>,
    /// A published IPv6 endpoint next to an IPv4 `endpoint`.
    pub endpoint6: Option<String>,
    pub listen_port: u16,
    pub tags: Vec<String>,
    /// Unix milliseconds (nodes list in join order), unlike the other rows' seconds.
    pub created_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayRow {
    pub node_id: String,
    pub ranges: Vec<String>,
    pub nat: bool,
    pub metric: u32,
    /// Whether it also carries the ranges it reports learning by BGP.
    pub bgp: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTokenRow {
    pub id: String,
    pub secret_hash: String,
    pub scope: String,
    pub created_at: u64,
}

/// Why an enrollment token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    Unknown,
    Expired,
    UsedUp,
}

pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
}

fn list(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

fn list_text(items: &[String]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".into())
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn parse_opt<T: FromStr>(text: Option<String>) -> Option<T> {
    text.and_then(|t| t.parse().ok())
}

/// The file of a `sqlite://` URL (not `:memory:`).
pub fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split('?').next().unwrap_or(rest);
    if path.is_empty() || path.contains(":memory:") {
        return None;
    }
    Some(std::path::PathBuf::from(path))
}

impl Store {
    /// Opens (creating if needed) the database at `url` and brings its
    /// schema up to date. `sqlite:///path/file.db`, `sqlite::memory:` or
    /// `postgres://user:password@host/db`.
    pub async fn open(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let dialect = if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Dialect::Postgres
        } else {
            return Err(StoreError::NotFound(format!(
                "database {url:?}: only sqlite:// and postgres:// URLs are supported"
            )));
        };
        let url = match dialect {
            // Create the file if missing; the pragmas are per connection.
            Dialect::Sqlite if !url.contains('?') && !url.contains(":memory:") => {
                format!("{url}?mode=rwc")
            }
            _ => url.to_string(),
        };
        let options = AnyConnectOptions::from_str(&url)?;
        let mut pool = AnyPoolOptions::new();
        if dialect == Dialect::Sqlite {
            // One writer at a time anyway; one connection keeps
            // `:memory:` databases whole.
            pool = pool.max_connections(1).after_connect(|conn, _| {
                Box::pin(async move {
                    for pragma in [
                        "PRAGMA foreign_keys = ON",
                        "PRAGMA journal_mode = WAL",
                        "PRAGMA synchronous = FULL",
                        "PRAGMA busy_timeout = 5000",
                    ] {
                        sqlx::query(pragma).execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            });
        } else {
            pool = pool.max_connections(8);
        }
        let pool = pool.connect_with(options).await?;
        let store = Store { pool, dialect };
        store.migrate().await?;
        Ok(store)
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    async fn migrate(&self) -> Result<()> {
        // Controllers that start together on one PostgreSQL migrate one
        // after the other: each step under the write lock, the version
        // read again under it.
        let mut tx = self.begin_write().await?;
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        for (i, migration) in MIGRATIONS.iter().enumerate() {
            let version = i as i64 + 1;
            let mut tx = self.begin_write().await?;
            let current: i64 =
                sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_version")
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get("v")?;
            if version <= current {
                continue;
            }
            for statement in migration.split(';').filter(|s| !s.trim().is_empty()) {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
                .bind(version)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::info!(version, "store schema migrated");
        }
        Ok(())
    }

    /// A transaction that writes: on PostgreSQL it first takes the store's
    /// write lock (a transaction-level advisory lock), so the writes of
    /// every controller on the database run one at a time. Revisions are
    /// then handed out and committed in order, and what must stay single
    /// (token uses, addresses) is decided against what is committed.
    /// SQLite has one writer anyway.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'_, sqlx::Any>> {
        let mut tx = self.pool.begin().await?;
        if self.dialect == Dialect::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(WRITE_LOCK)
                .execute(&mut *tx)
                .await?;
        }
        Ok(tx)
    }

    /// The revision of the last committed change (0 for a new store).
    pub async fn revision(&self) -> Result<u64> {
        let v: i64 = sqlx::query("SELECT COALESCE(MAX(revision), 0) AS r FROM changes")
            .fetch_one(&self.pool)
            .await?
            .try_get("r")?;
        Ok(u64_of(v))
    }

    // -- networks --------------------------------------------------------

    pub async fn create_network(&self, n: &NetworkRow, now: u64) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO networks (netid, addressrange, addressrange6, mtu, listen_port, \
             persistent_keepalive, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&n.netid)
        .bind(n.addressrange.clone())
        .bind(n.addressrange6.clone())
        .bind(i64::from(n.mtu))
        .bind(i64::from(n.listen_port))
        .bind(i64::from(n.persistent_keepalive))
        .bind(n.created_at as i64)
        .execute(&mut *tx)
        .await?;
        let revision = record_change(&mut tx, &n.netid, None, "network_created", now).await?;
        tx.commit().await?;
        Ok(revision)
    }

    pub async fn networks(&self) -> Result<Vec<NetworkRow>> {
        let rows = sqlx::query(
            "SELECT netid, addressrange, addressrange6, mtu, listen_port, persistent_keepalive, \
             created_at FROM networks ORDER BY netid",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(network_row).collect()
    }

    pub async fn network(&self, netid: &str) -> Result<Option<NetworkRow>> {
        let row = sqlx::query(
            "SELECT netid, addressrange, addressrange6, mtu, listen_port, persistent_keepalive, \
             created_at FROM networks WHERE netid = $1",
        )
        .bind(netid)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(network_row).transpose()
    }

    /// Deletes a network with its nodes, tokens and gateways.
    pub async fn delete_network(&self, netid: &str, now: u64) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query("DELETE FROM networks WHERE netid = $1")
            .bind(netid)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("no network {netid:?}")));
        }
        // Its scoped API keys go with it: a network made again under the
        // same name must not find the old keys working.
        sqlx::query("DELETE FROM api_tokens WHERE scope = $1")
            .bind(format!("network:{netid}"))
            .execute(&mut *tx)
            .await?;
        let revision = record_change(&mut tx, netid, None, "network_deleted", now).await?;
        tx.commit().await?;
        Ok(revision)
    }

    // -- enrollment tokens ----------------------------------------------

    pub async fn create_token(&self, t: &TokenRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO enrollment_tokens (id, secret_hash, network, expires_at, uses_left, tags, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&t.id)
        .bind(&t.secret_hash)
        .bind(&t.network)
        .bind(t.expires_at.map(|v| v as i64))
        .bind(t.uses_left.map(i64::from))
        .bind(list_text(&t.tags))
        .bind(t.created_at as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn tokens(&self, network: Option<&str>) -> Result<Vec<TokenRow>> {
        let rows = sqlx::query(
            "SELECT id, secret_hash, network, expires_at, uses_left, tags, created_at \
             FROM enrollment_tokens WHERE ($1 = '' OR network = $2) ORDER BY created_at, id",
        )
        .bind(network.unwrap_or(""))
        .bind(network.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(token_row).collect()
    }

    pub async fn token(&self, id: &str) -> Result<Option<TokenRow>> {
        let row = sqlx::query(
            "SELECT id, secret_hash, network, expires_at, uses_left, tags, created_at \
             FROM enrollment_tokens WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(token_row).transpose()
    }

    pub async fn delete_token(&self, id: &str) -> Result<()> {
        let done = sqlx::query("DELETE FROM enrollment_tokens WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("no enrollment token {id:?}")));
        }
        Ok(())
    }

    // -- nodes ----------------------------------------------------------

    /// A node joins: in one transaction the token is checked and one use
    /// taken, the addresses are chosen by `allocate` (given the addresses
    /// in use, from `used(network)`: the caller's in-memory view, and on
    /// PostgreSQL those stored, which other controllers gave; the unique
    /// constraints back it up) unless the node pinned them, and the node
    /// is stored.
    pub async fn join(
        &self,
        secret_hash: &str,
        now: u64,
        mut node: NodeRow,
        used: impl FnOnce(&str) -> (HashSet<Ipv4Addr>, HashSet<Ipv6Addr>),
        allocate: impl FnOnce(
            &NetworkRow,
            &HashSet<Ipv4Addr>,
            &HashSet<Ipv6Addr>,
            &mut NodeRow,
        ) -> std::result::Result<(), String>,
    ) -> Result<std::result::Result<(NodeRow, u64), JoinRefusal>> {
        let mut tx = self.begin_write().await?;
        let token = sqlx::query(
            "SELECT id, secret_hash, network, expires_at, uses_left, tags, created_at \
             FROM enrollment_tokens WHERE secret_hash = $1",
        )
        .bind(secret_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(token) = token.as_ref().map(token_row).transpose()? else {
            return Ok(Err(JoinRefusal::Token(TokenRefusal::Unknown)));
        };
        if token.expires_at.is_some_and(|at| at <= now) {
            return Ok(Err(JoinRefusal::Token(TokenRefusal::Expired)));
        }
        if token.uses_left == Some(0) {
            return Ok(Err(JoinRefusal::Token(TokenRefusal::UsedUp)));
        }
        if token.uses_left.is_some() {
            // Taken only while one is left, whoever else takes them.
            let taken = sqlx::query(
                "UPDATE enrollment_tokens SET uses_left = uses_left - 1 \
                 WHERE id = $1 AND uses_left > 0",
            )
            .bind(&token.id)
            .execute(&mut *tx)
            .await?;
            if taken.rows_affected() != 1 {
                return Ok(Err(JoinRefusal::Token(TokenRefusal::UsedUp)));
            }
        }
        let network = sqlx::query(
            "SELECT netid, addressrange, addressrange6, mtu, listen_port, persistent_keepalive, \
             created_at FROM networks WHERE netid = $1",
        )
        .bind(&token.network)
        .fetch_one(&mut *tx)
        .await?;
        let network = network_row(&network)?;
        let (mut used4, mut used6) = used(&network.netid);
        if self.dialect == Dialect::Postgres {
            // Other controllers on this database give addresses too: what
            // is committed counts (under the write lock, nothing is being
            // given meanwhile). One read of the network's addresses per
            // join, until each controller follows the others' changes.
            let stored = sqlx::query("SELECT address, address6 FROM nodes WHERE network = $1")
                .bind(&network.netid)
                .fetch_all(&mut *tx)
                .await?;
            for row in &stored {
                let address: Option<String> = row.try_get("address")?;
                let address6: Option<String> = row.try_get("address6")?;
                used4.extend(address.and_then(|a| a.parse::<Ipv4Addr>().ok()));
                used6.extend(address6.and_then(|a| a.parse::<Ipv6Addr>().ok()));
            }
        }
        node.network = network.netid.clone();
        for tag in &token.tags {
            if !node.tags.contains(tag) {
                node.tags.push(tag.clone());
            }
        }
        if let Err(why) = allocate(&network, &used4, &used6, &mut node) {
            return Ok(Err(JoinRefusal::Address(why)));
        }
        insert_node(&mut tx, &node).await?;
        let revision =
            record_change(&mut tx, &node.network, Some(&node.id), "node_joined", now).await?;
        tx.commit().await?;
        Ok(Ok((node, revision)))
    }

    pub async fn nodes(&self, network: Option<&str>) -> Result<Vec<NodeRow>> {
        let rows = sqlx::query(
            "SELECT id, network, name, public_key, credential_hash, address, address6, endpoint, \
             endpoint6, listen_port, tags, created_at FROM nodes WHERE ($1 = '' OR network = $2) \
             ORDER BY network, created_at, id",
        )
        .bind(network.unwrap_or(""))
        .bind(network.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(node_row).collect()
    }

    pub async fn node(&self, id: &str) -> Result<Option<NodeRow>> {
        let row = sqlx::query(
            "SELECT id, network, name, public_key, credential_hash, address, address6, endpoint, \
             endpoint6, listen_port, tags, created_at FROM nodes WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(node_row).transpose()
    }

    /// The changes committed after revision `after` up to `upto`, in
    /// order (what other controllers on the database wrote).
    pub async fn changes(&self, after: u64, upto: u64) -> Result<Vec<ChangeRow>> {
        let rows = sqlx::query(
            "SELECT revision, network, node_id, kind FROM changes \
             WHERE revision > $1 AND revision <= $2 ORDER BY revision",
        )
        .bind(after as i64)
        .bind(upto as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ChangeRow {
                    revision: u64_of(r.try_get("revision")?),
                    network: r.try_get("network")?,
                    node_id: r.try_get("node_id")?,
                    kind: r.try_get("kind")?,
                })
            })
            .collect()
    }

    pub async fn node_by_credential(&self, credential_hash: &str) -> Result<Option<NodeRow>> {
        let row = sqlx::query(
            "SELECT id, network, name, public_key, credential_hash, address, address6, endpoint, \
             endpoint6, listen_port, tags, created_at FROM nodes WHERE credential_hash = $1",
        )
        .bind(credential_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(node_row).transpose()
    }

    pub async fn delete_node(&self, id: &str, now: u64) -> Result<(NodeRow, u64)> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "SELECT id, network, name, public_key, credential_hash, address, address6, endpoint, \
             endpoint6, listen_port, tags, created_at FROM nodes WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(node) = row.as_ref().map(node_row).transpose()? else {
            return Err(StoreError::NotFound(format!("no node {id:?}")));
        };
        sqlx::query("DELETE FROM nodes WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let revision = record_change(&mut tx, &node.network, Some(id), "node_deleted", now).await?;
        tx.commit().await?;
        Ok((node, revision))
    }

    /// A node published a new endpoint or listen port.
    pub async fn update_node_endpoint(
        &self,
        id: &str,
        network: &str,
        endpoint: Option<&str>,
        listen_port: u16,
        now: u64,
    ) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE nodes SET endpoint = $1, listen_port = $2 WHERE id = $3")
            .bind(endpoint.map(str::to_string))
            .bind(i64::from(listen_port))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let revision = record_change(&mut tx, network, Some(id), "node_endpoint", now).await?;
        tx.commit().await?;
        Ok(revision)
    }

    /// Records a change that lives only in memory (an observed endpoint),
    /// so that it gets a revision streams can resume from.
    pub async fn note_change(
        &self,
        network: &str,
        node_id: &str,
        kind: &str,
        now: u64,
    ) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let revision = record_change(&mut tx, network, Some(node_id), kind, now).await?;
        tx.commit().await?;
        Ok(revision)
    }

    // -- gateways -------------------------------------------------------

    pub async fn set_gateway(&self, g: &GatewayRow, network: &str, now: u64) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM gateways WHERE node_id = $1")
            .bind(&g.node_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO gateways (node_id, ranges, nat, metric, bgp) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&g.node_id)
        .bind(list_text(&g.ranges))
        .bind(i64::from(g.nat))
        .bind(i64::from(g.metric))
        .bind(i64::from(g.bgp))
        .execute(&mut *tx)
        .await?;
        let revision =
            record_change(&mut tx, network, Some(&g.node_id), "gateway_set", now).await?;
        tx.commit().await?;
        Ok(revision)
    }

    pub async fn delete_gateway(&self, node_id: &str, network: &str, now: u64) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query("DELETE FROM gateways WHERE node_id = $1")
            .bind(node_id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!(
                "node {node_id:?} is not an egress gateway"
            )));
        }
        let revision =
            record_change(&mut tx, network, Some(node_id), "gateway_deleted", now).await?;
        tx.commit().await?;
        Ok(revision)
    }

    pub async fn gateways(&self) -> Result<Vec<GatewayRow>> {
        let rows =
            sqlx::query("SELECT node_id, ranges, nat, metric, bgp FROM gateways ORDER BY node_id")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(gateway_row).collect()
    }

    pub async fn gateway(&self, node_id: &str) -> Result<Option<GatewayRow>> {
        let row = sqlx::query(
            "SELECT node_id, ranges, nat, metric, bgp FROM gateways WHERE node_id = $1",
        )
        .bind(node_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(gateway_row).transpose()
    }

    // -- controllers ----------------------------------------------------

    /// Says that a controller serves at `url` (with this certificate
    /// fingerprint): enrollment tokens list every controller so recorded.
    pub async fn register_controller(
        &self,
        url: &str,
        fingerprint: Option<&str>,
        now: u64,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM controllers WHERE url = $1")
            .bind(url)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO controllers (url, fingerprint, seen_at) VALUES ($1, $2, $3)")
            .bind(url)
            .bind(fingerprint.map(str::to_string))
            .bind(now as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every controller recorded, by URL: (url, fingerprint).
    pub async fn controllers(&self) -> Result<Vec<(String, Option<String>)>> {
        let rows = sqlx::query("SELECT url, fingerprint FROM controllers ORDER BY url")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("url")?, r.try_get("fingerprint")?)))
            .collect()
    }

    // -- admin API tokens -----------------------------------------------

    pub async fn create_api_token(&self, t: &ApiTokenRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_tokens (id, secret_hash, scope, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&t.id)
        .bind(&t.secret_hash)
        .bind(&t.scope)
        .bind(t.created_at as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn api_tokens(&self) -> Result<Vec<ApiTokenRow>> {
        let rows =
            sqlx::query("SELECT id, secret_hash, scope, created_at FROM api_tokens ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(api_token_row).collect()
    }

    pub async fn api_token_by_hash(&self, hash: &str) -> Result<Option<ApiTokenRow>> {
        let row = sqlx::query(
            "SELECT id, secret_hash, scope, created_at FROM api_tokens WHERE secret_hash = $1",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(api_token_row).transpose()
    }

    pub async fn delete_api_token(&self, id: &str) -> Result<()> {
        let done = sqlx::query("DELETE FROM api_tokens WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("no API token {id:?}")));
        }
        Ok(())
    }
}

/// Why a join was refused (besides database errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinRefusal {
    Token(TokenRefusal),
    Address(String),
}

async fn insert_node(tx: &mut sqlx::Transaction<'_, sqlx::Any>, n: &NodeRow) -> Result<()> {
    sqlx::query(
        "INSERT INTO nodes (id, network, name, public_key, credential_hash, address, address6, \
         endpoint, endpoint6, listen_port, tags, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(&n.id)
    .bind(&n.network)
    .bind(&n.name)
    .bind(&n.public_key)
    .bind(&n.credential_hash)
    .bind(n.address.map(|a| a.to_string()))
    .bind(n.address6.map(|a| a.to_string()))
    .bind(n.endpoint.clone())
    .bind(n.endpoint6.clone())
    .bind(i64::from(n.listen_port))
    .bind(list_text(&n.tags))
    .bind(n.created_at as i64)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn record_change(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    network: &str,
    node_id: Option<&str>,
    kind: &str,
    now: u64,
) -> Result<u64> {
    let next: i64 = sqlx::query("SELECT COALESCE(MAX(revision), 0) + 1 AS r FROM changes")
        .fetch_one(&mut **tx)
        .await?
        .try_get("r")?;
    sqlx::query(
        "INSERT INTO changes (revision, network, node_id, kind, at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(next)
    .bind(network)
    .bind(node_id.map(str::to_string))
    .bind(kind)
    .bind(now as i64)
    .execute(&mut **tx)
    .await?;
    Ok(u64_of(next))
}

fn gateway_row(r: &sqlx::any::AnyRow) -> Result<GatewayRow> {
    Ok(GatewayRow {
        node_id: r.try_get("node_id")?,
        ranges: list(&r.try_get::<String, _>("ranges")?),
        nat: r.try_get::<i64, _>("nat")? != 0,
        metric: u32::try_from(r.try_get::<i64, _>("metric")?).unwrap_or(0),
        bgp: r.try_get::<i64, _>("bgp")? != 0,
    })
}

fn network_row(r: &sqlx::any::AnyRow) -> Result<NetworkRow> {
    Ok(NetworkRow {
        netid: r.try_get("netid")?,
        addressrange: r.try_get("addressrange")?,
        addressrange6: r.try_get("addressrange6")?,
        mtu: u16::try_from(r.try_get::<i64, _>("mtu")?).unwrap_or(1420),
        listen_port: u16::try_from(r.try_get::<i64, _>("listen_port")?).unwrap_or(51820),
        persistent_keepalive: u16::try_from(r.try_get::<i64, _>("persistent_keepalive")?)
            .unwrap_or(0),
        created_at: u64_of(r.try_get("created_at")?),
    })
}

fn token_row(r: &sqlx::any::AnyRow) -> Result<TokenRow> {
    Ok(TokenRow {
        id: r.try_get("id")?,
        secret_hash: r.try_get("secret_hash")?,
        network: r.try_get("network")?,
        expires_at: r.try_get::<Option<i64>, _>("expires_at")?.map(u64_of),
        uses_left: r
            .try_get::<Option<i64>, _>("uses_left")?
            .map(|v| u32::try_from(v).unwrap_or(0)),
        tags: list(&r.try_get::<String, _>("tags")?),
        created_at: u64_of(r.try_get("created_at")?),
    })
}

fn node_row(r: &sqlx::any::AnyRow) -> Result<NodeRow> {
    Ok(NodeRow {
        id: r.try_get("id")?,
        network: r.try_get("network")?,
        name: r.try_get("name")?,
        public_key: r.try_get("public_key")?,
        credential_hash: r.try_get("credential_hash")?,
        address: parse_opt(r.try_get("address")?),
        address6: parse_opt(r.try_get("address6")?),
        endpoint: r.try_get("endpoint")?,
        endpoint6: r.try_get("endpoint6")?,
        listen_port: u16::try_from(r.try_get::<i64, _>("listen_port")?).unwrap_or(51820),
        tags: list(&r.try_get::<String, _>("tags")?),
        created_at: u64_of(r.try_get("created_at")?),
    })
}

fn api_token_row(r: &sqlx::any::AnyRow) -> Result<ApiTokenRow> {
    Ok(ApiTokenRow {
        id: r.try_get("id")?,
        secret_hash: r.try_get("secret_hash")?,
        scope: r.try_get("scope")?,
        created_at: u64_of(r.try_get("created_at")?),
    })
}
