//! Runs the controller: store, TLS identity, the API on its socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum_server::tls_rustls::RustlsAcceptor;

use anyhow::{Context, Result};

use crate::api::{Controller, router};
use crate::config::ServerConfig;
use crate::connections::Admission;
use crate::store::Store;

/// A running controller (for tests and the `server` command).
pub struct Running {
    pub addr: SocketAddr,
    pub controller: Arc<Controller>,
    pub fingerprint: Option<String>,
    /// Endpoint discovery (UDP, this port and the next), unless it is off.
    pub discovery: Option<SocketAddr>,
    discovery_service: Option<crate::discovery::Discovery>,
    handle: axum_server::Handle<SocketAddr>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    pulses: tokio::task::JoinHandle<()>,
    /// Applies the other controllers' changes (PostgreSQL).
    follower: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting and ends open connections (streams included).
    pub async fn shutdown(self) {
        self.handle.shutdown();
        self.pulses.abort();
        self.follower.abort();
        if let Some(d) = &self.discovery_service {
            d.stop();
        }
        let _ = self.task.await;
    }

    /// Waits until the server stops by itself (it does not, unless the
    /// socket fails).
    pub async fn wait(self) -> Result<()> {
        self.task.await??;
        Ok(())
    }
}

/// Lifts the open-files limit to its hard maximum: every agent holds a
/// connection.
pub fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit get a pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// The SQLite database and its `-wal` and `-shm` files hold credential
/// hashes: readable by the controller's user only. SQLite gives the side
/// files the database's mode, so the database is created 0600 here.
fn protect_sqlite_files(db: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(db)
        .with_context(|| format!("database {}", db.display()))?;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let file = PathBuf::from(name);
        if file.exists() {
            set_mode(&file, 0o600)?;
        }
    }
    Ok(())
}

pub async fn start(config: &ServerConfig) -> Result<Running> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    raise_open_files_limit();
    let created = !config.state_dir.exists();
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("state_dir {}", config.state_dir.display()))?;
    if created {
        set_mode(&config.state_dir, 0o700)?;
    }
    if let Some(db) = crate::store::sqlite_path(&config.database_url()) {
        protect_sqlite_files(&db)?;
    }
    let store = Store::open(&config.database_url())
        .await
        .map_err(|e| anyhow::anyhow!("{}", crate::config::redact_url(&e.to_string())))
        .with_context(|| format!("opening the store {}", config.database_url_redacted()))?;
    let listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("listen {}", config.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let identity = if config.tls.enabled {
        Some(crate::tls::load_or_create(&config.tls, &config.state_dir)?)
    } else {
        None
    };
    let fingerprint = identity.as_ref().map(|i| i.fingerprint.clone());
    let controller = Arc::new(
        Controller::new(
            store,
            config.master_key()?,
            config.public_url(addr),
            fingerprint.clone(),
        )
        .await?,
    );
    // After the store and the TCP socket, so a failure names the first
    // thing wrong; before the API serves, so every node hears of it.
    let discovery_service = if config.discovery.enabled {
        let at = config.discovery.address(config.listen);
        Some(crate::discovery::start(
            at,
            &config.discovery,
            Arc::clone(&controller.metrics.discovery),
        )?)
    } else {
        tracing::info!("endpoint discovery is off (discovery.enabled = false)");
        None
    };
    // Enrollment tokens name every controller on the database.
    controller
        .store
        .register_controller(
            &controller.public_url,
            controller.fingerprint.as_deref(),
            crate::api::now(),
        )
        .await?;
    let discovery = discovery_service.as_ref().map(|d| d.addr);
    controller
        .hub
        .set_discovery_port(discovery.map(|a| a.port()));
    let app = router(Arc::clone(&controller)).into_make_service();
    let pulses = tokio::spawn(Arc::clone(&controller).watch_pulses());
    let follower = tokio::spawn(Arc::clone(&controller).follow_others());
    let handle = axum_server::Handle::new();
    let admission = Admission::new(&config.limits, Arc::clone(&controller.metrics.connections));
    let task = match identity {
        Some(id) => {
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem(id.cert_pem, id.key_pem)
                .await
                .context("loading the TLS identity")?;
            let acceptor = RustlsAcceptor::new(tls)
                .handshake_timeout(Duration::from_secs(config.limits.header_timeout_secs))
                .acceptor(admission);
            let server = axum_server::from_tcp(listener)?
                .acceptor(acceptor)
                .handle(handle.clone());
            tokio::spawn(server.serve(app))
        }
        None => {
            let server = axum_server::from_tcp(listener)?
                .acceptor(admission)
                .handle(handle.clone());
            tokio::spawn(server.serve(app))
        }
    };
    tracing::info!(%addr, url = %controller.public_url, fingerprint = ?fingerprint, "controller listening");
    Ok(Running {
        addr,
        controller,
        fingerprint,
        discovery,
        discovery_service,
        handle,
        task,
        pulses,
        follower,
    })
}
