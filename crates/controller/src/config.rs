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
    /// Timeouts and connection caps (docs/controller.md, "Security").
    #[serde(default)]
    pub limits: crate::connections::ConnectionLimits,
    /// Endpoint discovery on UDP (docs/controller.md, "NAT traversal").
    #[serde(default)]
    pub discovery: crate::discovery::DiscoveryConfig,
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
        let config: ServerConfig = toml::from_str(text)?;
        if config.master_key.is_some() == config.master_key_file.is_some() {
            bail!("set exactly one of master_key and master_key_file");
        }
        if config.tls.cert.is_some() != config.tls.key.is_some() {
            bail!("tls.cert and tls.key go together");
        }
        if config.listen.port() == 0 && !config.listen.ip().is_loopback() {
            bail!("listen: port 0 picks a random port; give the port nodes will use");
        }
        config.limits.check().map_err(anyhow::Error::msg)?;
        config
            .discovery
            .check(config.listen)
            .map_err(anyhow::Error::msg)?;
        Ok(config)
    }

    /// The admin secret, trimmed; at least 16 characters. Warns when
    /// `master_key_file` can be read by other users.
    pub fn master_key(&self) -> Result<String> {
        let (key, field) = match (&self.master_key, &self.master_key_file) {
            (Some(k), _) => (k.trim().to_string(), "master_key"),
            (None, Some(f)) => {
                let key = std::fs::read_to_string(f)
                    .with_context(|| format!("master_key_file {}", f.display()))?;
                warn_if_others_can_read(f);
                (key.trim().to_string(), "master_key_file")
            }
            (None, None) => bail!("no master key"),
        };
        if key.is_empty() {
            bail!("{field}: the key is blank");
        }
        if key.chars().count() < 16 {
            bail!("{field}: at least 16 characters");
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

    /// The database URL with its password replaced by `***`: for messages
    /// and logs.
    pub fn database_url_redacted(&self) -> String {
        redact_url(&self.database_url())
    }

    pub fn public_url(&self, bound: SocketAddr) -> String {
        if let Some(u) = &self.public_url {
            return u.trim_end_matches('/').to_string();
        }
        let scheme = if self.tls.enabled { "https" } else { "http" };
        format!("{scheme}://{bound}")
    }
}

/// Whether a file's mode lets users other than its owner read it.
pub fn others_can_read(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o044 != 0)
}

fn warn_if_others_can_read(path: &Path) {
    if others_can_read(path) {
        tracing::warn!(
            file = %path.display(),
            "the master key file can be read by other users; chmod 600 it"
        );
    }
}

/// A URL with the password of its user-info part (`scheme://user:password@host`)
/// replaced by `***`, and a `password=` query parameter likewise.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        // The user-info ends at the last '@' before the query: a password
        // may (wrongly, unencoded) hold '/' or '@'.
        let query = out[rest..].find(['?', '#']).map_or(out.len(), |i| rest + i);
        if let Some(at) = out[rest..query].rfind('@') {
            let at = rest + at;
            if let Some(colon) = out[rest..at].find(':') {
                out.replace_range(rest + colon + 1..at, "***");
            }
        }
    }
    let lower = out.to_ascii_lowercase();
    let mut cut = Vec::new();
    for key in ["password=", "passwd=", "sslpassword="] {
        let mut from = 0;
        while let Some(i) = lower[from..].find(key) {
            let start = from + i;
            let boundary =
                start == 0 || matches!(lower.as_bytes()[start - 1], b'?' | b'&' | b';' | b' ');
            let value = start + key.len();
            let end = lower[value..]
                .find(['&', '#', ' ', ';'])
                .map_or(lower.len(), |e| value + e);
            if boundary {
                cut.push((value, end));
            }
            from = end.max(value);
        }
    }
    cut.sort();
    for (value, end) in cut.into_iter().rev() {
        out.replace_range(value..end, "***");
    }
    out
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
        let err = ServerConfig::parse(
            "master_key = \"0123456789abcdef\"\n[limits]\nidle_timeout_secs = 0",
        )
        .expect_err("no idle timeout");
        assert!(
            format!("{err:#}").contains("limits.idle_timeout_secs"),
            "{err:#}"
        );
        let err = ServerConfig::parse("master_key = \"0123456789abcdef\"\nlisten = \"0.0.0.0:0\"")
            .expect_err("port 0");
        assert!(format!("{err:#}").contains("listen"), "{err:#}");
    }

    #[test]
    fn discovery_is_on_by_default_at_the_api_port_and_its_keys_are_checked() {
        let key = "master_key = \"0123456789abcdef\"\n";
        let c = ServerConfig::parse(key).expect("default");
        assert!(c.discovery.enabled);
        assert_eq!(c.discovery.address(c.listen), c.listen);
        let c = ServerConfig::parse(&format!(
            "{key}listen = \"[::]:8443\"\n[discovery]\nlisten = \"[::]:3478\"\nrate = 5"
        ))
        .expect("own port");
        assert_eq!(c.discovery.address(c.listen).port(), 3478);
        assert_eq!(c.discovery.rate, 5);
        let c = ServerConfig::parse(&format!(
            "{key}listen = \"0.0.0.0:65535\"\n[discovery]\nenabled = false"
        ))
        .expect("off");
        assert!(!c.discovery.enabled);
        for (text, field) in [
            ("[discovery]\nport = 1", "port"),
            ("[discovery]\nlisten = \"x\"", "listen"),
            ("[discovery]\nburst = 0", "discovery.burst"),
            ("listen = \"0.0.0.0:65535\"", "listen"),
            ("[discovery]\nlisten = \"0.0.0.0:0\"", "discovery.listen"),
        ] {
            let err = ServerConfig::parse(&format!("{key}{text}")).expect_err(text);
            assert!(format!("{err:#}").contains(field), "{text}: {err:#}");
        }
    }

    #[test]
    fn blank_or_short_master_keys_are_refused() {
        let blank = ServerConfig::parse("master_key = \"                    \"").expect("parses");
        let err = blank.master_key().expect_err("blank");
        assert!(format!("{err:#}").contains("blank"), "{err:#}");
        let dir = std::env::temp_dir().join(format!("bgp4mesh-mk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("master.key");
        std::fs::write(&file, "\n   \n").expect("write");
        let c = ServerConfig::parse(&format!("master_key_file = \"{}\"", file.display()))
            .expect("parses");
        let err = c.master_key().expect_err("blank file");
        assert!(
            format!("{err:#}").contains("master_key_file: the key is blank"),
            "{err:#}"
        );
        std::fs::write(&file, "  0123456789abcdefgh \n").expect("write");
        assert_eq!(c.master_key().expect("key"), "0123456789abcdefgh");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            redact_url("postgres://u:secretpw@db.example:5432/ctl"),
            "postgres://u:***@db.example:5432/ctl"
        );
        assert_eq!(
            redact_url("postgres://u:p@ss@w@rd@db/ctl?sslmode=require"),
            "postgres://u:***@db/ctl?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://db/ctl?user=u&password=secretpw&sslmode=require"),
            "postgres://db/ctl?user=u&password=***&sslmode=require"
        );
        assert_eq!(redact_url("postgres://u@db/ctl"), "postgres://u@db/ctl");
        assert_eq!(
            redact_url("sqlite:///var/lib/bgp4mesh/controller.db"),
            "sqlite:///var/lib/bgp4mesh/controller.db"
        );
        assert!(!redact_url("postgresql://a:b/c@h/d").contains("b/c"));
    }
}
