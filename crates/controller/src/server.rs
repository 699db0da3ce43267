//! Runs the controller: store, TLS identity, the API on its socket.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::api::{Controller, router};
use crate::config::ServerConfig;
use crate::store::Store;

/// A running controller (for tests and the `server` command).
pub struct Running {
    pub addr: SocketAddr,
    pub controller: Arc<Controller>,
    pub fingerprint: Option<String>,
    handle: axum_server::Handle<SocketAddr>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    pulses: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting and ends open connections (streams included).
    pub async fn shutdown(self) {
        self.handle.shutdown();
        self.pulses.abort();
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

pub async fn start(config: &ServerConfig) -> Result<Running> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    raise_open_files_limit();
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("state_dir {}", config.state_dir.display()))?;
    let store = Store::open(&config.database_url())
        .await
        .with_context(|| format!("opening the store {}", config.database_url()))?;
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
    let app = router(Arc::clone(&controller)).into_make_service();
    let pulses = tokio::spawn(Arc::clone(&controller).watch_pulses());
    let handle = axum_server::Handle::new();
    let task = match identity {
        Some(id) => {
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem(id.cert_pem, id.key_pem)
                .await
                .context("loading the TLS identity")?;
            let server = axum_server::from_tcp_rustls(listener, tls)?.handle(handle.clone());
            tokio::spawn(server.serve(app))
        }
        None => {
            let server = axum_server::from_tcp(listener)?.handle(handle.clone());
            tokio::spawn(server.serve(app))
        }
    };
    tracing::info!(%addr, url = %controller.public_url, fingerprint = ?fingerprint, "controller listening");
    Ok(Running {
        addr,
        controller,
        fingerprint,
        handle,
        task,
        pulses,
    })
}
