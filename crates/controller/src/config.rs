//! `server.toml`: where the controller listens, its store, its master key
//! and its TLS identity. Unknown keys are refused; errors name the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address and port of the API (HTTPS unless `tls.enabled = false`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The URL nodes use to reach the controller; goes into enrollment
    /// tokens. Default: https://<listen address>.
    #[serde(default)]
    pub public_url: Option<String>,
    /// The admin secret (`Authorization: Bearer ...`). Or `master_key_file`.
    #[serde(default)]
    pub master_key: Option<String>,
    #[serde(default)]
    pub master_key_file: Option<PathBuf>,
    /// `sqlite:///var/lib/bgp4mesh/controller.db` (default, in state_dir)
    /// or `postgres://user:password@host/db`.
    #[serde(default)]
    pub database: Option<String>,
    /// Where the self-generated certificate and the default database live.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub tls: TlsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// false: plain HTTP (only behind a TLS-terminating proxy).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// A certificate chain and key (PEM). Without them the controller makes
    /// a self-signed certificate in state_dir and puts its fingerprint in
    /// every enrollment token.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Extra names (DNS or IP) for the self-signed certificate.
    #[serde(default)]
    pub names: Vec<String>,
}

impl Default for TlsConfig {
    fn default() -> TlsConfig {
        TlsConfig {
            enabled: true,
            cert: None,
            key: None,
            names: Vec::new(),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/bgp4mesh")
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<ServerConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<ServerConfig> {
        let config: ServerConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        if config.master_key.is_some() == config.master_key_file.is_some() {
            bail!("set exactly one of master_key and master_key_file");
        }
        if config.tls.cert.is_some() != config.tls.key.is_some() {
            bail!("tls.cert and tls.key go together");
        }
        Ok(config)
    }

    pub fn master_key(&self) -> Result<String> {
        let key = match (&self.master_key, &self.master_key_file) {
            (Some(k), _) => k.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .with_context(|| format!("master_key_file {}", f.display()))?
                .trim()
                .to_string(),
            (None, None) => bail!("no master key"),
        };
        if key.len() < 16 {
            bail!("master_key: at least 16 characters");
        }
        Ok(key)
    }

    pub fn database_url(&self) -> String {
        self.database.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}",
                self.state_dir.join("controller.db").display()
            )
        })
    }

    pub fn public_url(&self, bound: SocketAddr) -> String {
        if let Some(u) = &self.public_url {
            return u.trim_end_matches('/').to_string();
        }
        let scheme = if self.tls.enabled { "https" } else { "http" };
        format!("{scheme}://{bound}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deploy_example_is_valid() {
        let c = ServerConfig::parse(include_str!("../../../deploy/examples/server.toml"))
            .expect("deploy/examples/server.toml");
        assert_eq!(c.listen.port(), 8443);
        assert!(c.master_key_file.is_some());
    }

    #[test]
    fn minimal_config_and_errors_name_the_key() {
        let c = ServerConfig::parse("master_key = \"0123456789abcdef\"").expect("minimal");
        assert_eq!(c.listen.port(), 8443);
        assert!(c.tls.enabled);
        assert!(c.database_url().ends_with("controller.db"));
        let err = ServerConfig::parse("master_key = \"0123456789abcdef\"\nlisten = \"nowhere\"")
            .expect_err("bad listen");
        assert!(format!("{err:#}").contains("listen"), "{err:#}");
        let err = ServerConfig::parse("master_key = \"k\"\nmaster_keyy = 1").expect_err("typo");
        assert!(format!("{err:#}").contains("master_keyy"), "{err:#}");
        let err = ServerConfig::parse("").expect_err("no key");
        assert!(format!("{err:#}").contains("master_key"), "{err:#}");
    }
}
