//! The controller's TLS identity: a given certificate, or one it makes for
//! itself (kept in state_dir, reused across restarts). Nodes recognise a
//! self-signed controller by the SHA-256 fingerprint in their enrollment
//! token, so no public CA is needed.

use std::path::Path;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;
use crate::secrets::hex;

pub struct Identity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// SHA-256 of the leaf certificate (DER), lowercase hex.
    pub fingerprint: String,
}

pub fn fingerprint(der: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

pub fn load_or_create(config: &TlsConfig, state_dir: &Path) -> Result<Identity> {
    let (cert_pem, key_pem) = match (&config.cert, &config.key) {
        (Some(c), Some(k)) => (
            std::fs::read(c).with_context(|| format!("tls.cert {}", c.display()))?,
            std::fs::read(k).with_context(|| format!("tls.key {}", k.display()))?,
        ),
        _ => {
            let cert_path = state_dir.join("controller.crt");
            let key_path = state_dir.join("controller.key");
            if !cert_path.exists() || !key_path.exists() {
                create_self_signed(config, &cert_path, &key_path)?;
            }
            (std::fs::read(&cert_path)?, std::fs::read(&key_path)?)
        }
    };
    let leaf = CertificateDer::pem_slice_iter(&cert_pem)
        .next()
        .context("no certificate in the PEM file")?
        .context("reading the certificate PEM")?;
    PrivateKeyDer::from_pem_slice(&key_pem).context("reading the private key PEM")?;
    Ok(Identity {
        fingerprint: fingerprint(&leaf),
        cert_pem,
        key_pem,
    })
}

fn create_self_signed(config: &TlsConfig, cert_path: &Path, key_path: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        names.push(host.trim().to_string());
    }
    names.extend(config.names.iter().cloned());
    let certified = rcgen::generate_simple_self_signed(names).context("making a certificate")?;
    if let Some(dir) = cert_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(cert_path, certified.cert.pem())?;
    let mut key = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(key_path)?;
    key.write_all(certified.key_pair.serialize_pem().as_bytes())?;
    tracing::info!(cert = %cert_path.display(), "made a self-signed certificate");
    Ok(())
}
