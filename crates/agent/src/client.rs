//! HTTPS client of the controller, for the agent and the admin CLI.
//!
//! A controller with a self-signed certificate is recognised by the
//! SHA-256 fingerprint the enrollment token carries (or `--fingerprint`);
//! otherwise the certificate must chain to a public root (webpki roots).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bgp4mesh_api::{ApiError, StreamEvent};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A stream with no event for this long (three heartbeats) is taken as
/// dead: a hung controller, or a cut path to it.
pub const STREAM_SILENCE: Duration = Duration::from_secs(15);

/// The controller answered with an error status.
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the controller refused ({}): {}",
            self.status, self.message
        )
    }
}

impl std::error::Error for Refused {}

/// A controller's HTTP client: one controller, or several on one database
/// (the agent's): requests go to the current one, and [`Client::fail_over`]
/// moves every clone to the next.
#[derive(Clone)]
pub struct Client {
    servers: Arc<Servers>,
    key: Option<String>,
}

struct Servers {
    /// (connection pool, base URL) per controller, the first the one the
    /// node joined through.
    list: Vec<(reqwest::Client, String)>,
    current: std::sync::atomic::AtomicUsize,
}

/// Accepts exactly the certificate with this SHA-256 (still checking the
/// handshake signatures with it).
#[derive(Debug)]
struct Pinned {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        let got: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        if got == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the controller's certificate has fingerprint {got}, the token says {}",
                self.fingerprint
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Checks a controller URL before anything is sent to it: https, or plain
/// http only when no certificate fingerprint is pinned. A fingerprint says
/// the controller has TLS, so with it an `http://` URL means the token (or
/// the URL given) was altered, and following it would send the enrollment
/// secret or the credential in cleartext.
pub fn check_server(server: &str, fingerprint: Option<&str>) -> Result<()> {
    let url = reqwest::Url::parse(server.trim())
        .with_context(|| format!("controller URL {server:?} is not a URL"))?;
    match url.scheme() {
        "https" => Ok(()),
        "http" if fingerprint.is_none() => Ok(()),
        "http" => bail!(
            "controller URL {server}: plain http, but a TLS certificate fingerprint is pinned; \
             refusing to send secrets in cleartext (was the token or the URL altered? \
             the controller's URL is https://)"
        ),
        other => bail!("controller URL {server}: scheme {other:?}; use https://"),
    }
}

fn base_url(server: &str) -> String {
    server.trim().trim_end_matches('/').to_string()
}

/// A connection pool for one controller, checked by [`check_server`].
fn http_client(server: &str, fingerprint: Option<&str>) -> Result<reqwest::Client> {
    check_server(server, fingerprint)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .tcp_keepalive(Duration::from_secs(30))
        // Never from https to plain http: a redirect would carry the
        // request's secrets in cleartext.
        .redirect(reqwest::redirect::Policy::custom(|attempt| {
            let downgrade = attempt.url().scheme() != "https"
                && attempt.previous().iter().any(|u| u.scheme() == "https");
            if downgrade {
                attempt.error("the controller redirected from https to plain http")
            } else if attempt.previous().len() > 5 {
                attempt.stop()
            } else {
                attempt.follow()
            }
        }));
    if let Some(fp) = fingerprint {
        let fingerprint = fp.trim().to_lowercase().replace(':', "");
        let tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow!("TLS versions: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                fingerprint,
                provider,
            }))
            .with_no_client_auth();
        builder = builder.use_preconfigured_tls(tls);
    }
    builder.build().context("building the HTTP client")
}

impl Client {
    /// `server`: https://host:port; `fingerprint`: pin a self-signed
    /// certificate; `key`: the bearer credential (master key, API token or
    /// node credential). Refuses what [`check_server`] refuses.
    pub fn new(server: &str, fingerprint: Option<&str>, key: Option<String>) -> Result<Client> {
        Client::with_others(server, fingerprint, &[], key)
    }

    /// [`Client::new`] with the other controllers on the same database
    /// (as an enrollment token lists them) to move to.
    pub fn with_others(
        server: &str,
        fingerprint: Option<&str>,
        others: &[bgp4mesh_api::ControllerAddress],
        key: Option<String>,
    ) -> Result<Client> {
        let mut list = vec![(http_client(server, fingerprint)?, base_url(server))];
        for other in others {
            if list.iter().any(|(_, b)| *b == base_url(&other.url)) {
                continue;
            }
            // One that cannot be used (plain http with a pinned
            // certificate, not a URL) is left out: the others still are.
            match http_client(&other.url, other.fingerprint.as_deref()) {
                Ok(http) => list.push((http, base_url(&other.url))),
                Err(e) => tracing::warn!("controller {} left out: {e:#}", other.url),
            }
        }
        Ok(Client {
            servers: Arc::new(Servers {
                list,
                current: std::sync::atomic::AtomicUsize::new(0),
            }),
            key,
        })
    }

    /// The same connection pools with another credential.
    pub fn with_key(&self, key: String) -> Client {
        Client {
            servers: Arc::clone(&self.servers),
            key: Some(key),
        }
    }

    fn current(&self) -> (&reqwest::Client, &str) {
        let list = &self.servers.list;
        let i = self
            .servers
            .current
            .load(std::sync::atomic::Ordering::Relaxed)
            % list.len().max(1);
        let (http, base) = &list[i];
        (http, base)
    }

    /// The controller requests go to now.
    pub fn server(&self) -> String {
        self.current().1.to_string()
    }

    /// How many controllers it knows.
    pub fn servers(&self) -> usize {
        self.servers.list.len()
    }

    /// Moves to the next controller (after the last, the first again);
    /// returns the one requests go to from now on.
    pub fn fail_over(&self) -> String {
        self.servers
            .current
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.server()
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<reqwest::Response> {
        let (http, base) = self.current();
        let mut req = http
            .request(method.clone(), format!("{base}{path}"))
            .timeout(Duration::from_secs(30));
        if let Some(key) = &self.key {
            req = req.bearer_auth(key);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {base}{path}"))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ApiError>(&text)
            .map(|e| e.message)
            .unwrap_or(text);
        Err(Refused { status, message }.into())
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self.send(Method::GET, path, None::<&()>).await?;
        Ok(resp.json().await?)
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let resp = self.send(Method::POST, path, Some(body)).await?;
        Ok(resp.json().await?)
    }

    /// A POST whose answer has no body.
    pub async fn post_empty<B: Serialize>(&self, path: &str, body: &B) -> Result<()> {
        self.send(Method::POST, path, Some(body)).await?;
        Ok(())
    }

    pub async fn delete(&self, path: &str) -> Result<()> {
        self.send(Method::DELETE, path, None::<&()>).await?;
        Ok(())
    }

    /// The agent's stream: events as they come; ends when the connection
    /// does. No event for [`STREAM_SILENCE`] (three heartbeats) counts as a
    /// dead stream: a hung controller is left as a dead one.
    pub async fn stream(
        &self,
        since: Option<u64>,
    ) -> Result<impl futures::Stream<Item = Result<StreamEvent>> + use<>> {
        let path = match since {
            Some(r) => format!("/api/agent/stream?since={r}"),
            None => "/api/agent/stream".to_string(),
        };
        let (http, base) = self.current();
        let mut req = http.get(format!("{base}{path}"));
        if let Some(key) = &self.key {
            req = req.bearer_auth(key);
        }
        // A hung controller accepts the connection and says nothing: the
        // stream's head must come within the silence allowed.
        let resp = tokio::time::timeout(STREAM_SILENCE, req.send())
            .await
            .map_err(|_| {
                anyhow!(
                    "the controller did not answer in {} s",
                    STREAM_SILENCE.as_secs()
                )
            })?
            .context("opening the stream")?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            let message = serde_json::from_str::<ApiError>(&text)
                .map(|e| e.message)
                .unwrap_or(text);
            return Err(Refused { status, message }.into());
        }
        let bytes = resp.bytes_stream();
        Ok(futures::stream::unfold(
            (bytes, String::new()),
            |(mut bytes, mut buffer)| async move {
                loop {
                    if let Some(end) = buffer.find("\n\n") {
                        let frame: String = buffer.drain(..end + 2).collect();
                        let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: "))
                        else {
                            continue;
                        };
                        let event = serde_json::from_str::<StreamEvent>(data)
                            .map_err(|e| anyhow!("a stream event that does not parse: {e}"));
                        return Some((event, (bytes, buffer)));
                    }
                    match tokio::time::timeout(STREAM_SILENCE, bytes.next()).await {
                        Ok(Some(Ok(chunk))) => buffer.push_str(&String::from_utf8_lossy(&chunk)),
                        Ok(Some(Err(e))) => return Some((Err(e.into()), (bytes, buffer))),
                        Ok(None) => return None,
                        Err(_) => {
                            return Some((
                                Err(anyhow!(
                                    "no heartbeat from the controller in {} s",
                                    STREAM_SILENCE.as_secs()
                                )),
                                (bytes, buffer),
                            ));
                        }
                    }
                }
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_other_controllers_are_moved_to_in_turn() {
        let other = |url: &str, fingerprint: Option<&str>| bgp4mesh_api::ControllerAddress {
            url: url.into(),
            fingerprint: fingerprint.map(str::to_string),
        };
        let client = Client::with_others(
            "https://10.0.0.1:8443/",
            Some("ab"),
            &[
                other("https://10.0.0.2:8443", Some("cd")),
                other("https://10.0.0.1:8443", Some("ab")),
                other("http://10.0.0.3:8443", Some("ef")),
            ],
            Some("credential".into()),
        )
        .expect("client");
        // The duplicate and the plain-http one with a pin are left out.
        assert_eq!(client.servers(), 2);
        assert_eq!(client.server(), "https://10.0.0.1:8443");
        let clone = client.with_key("other".into());
        assert_eq!(client.fail_over(), "https://10.0.0.2:8443");
        assert_eq!(clone.server(), "https://10.0.0.2:8443", "clones move too");
        assert_eq!(client.fail_over(), "https://10.0.0.1:8443");
    }

    #[test]
    fn plain_http_is_refused_when_a_fingerprint_is_pinned() {
        let fp = Some("ab:cd");
        for server in ["http://10.0.0.1:8443", " HTTP://controller.example:8443/ "] {
            let error = format!("{:#}", check_server(server, fp).expect_err(server));
            assert!(
                error.contains("plain http, but a TLS certificate fingerprint is pinned"),
                "{error}"
            );
            assert!(Client::new(server, fp, Some("key".into())).is_err());
        }
        check_server("https://10.0.0.1:8443", fp).expect("https with a pin");
        check_server("https://controller.example", None).expect("https");
        check_server("http://10.0.0.1:8080", None)
            .expect("http without a pin is the operator's choice");
        let error = format!(
            "{:#}",
            check_server("ftp://10.0.0.1", None).expect_err("ftp")
        );
        assert!(error.contains("scheme \"ftp\"; use https://"), "{error}");
        let error = format!(
            "{:#}",
            check_server("10.0.0.1:8443", fp).expect_err("no scheme")
        );
        assert!(error.contains("controller URL"), "{error}");
    }
}
