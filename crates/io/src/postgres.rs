//! Connecting to PostgreSQL by URL, with `sslmode` honoured as libpq does, and the schema
//! migrations.
//!
//! tokio-postgres knows `disable`, `prefer` and `require` only, and `require` there never
//! checks the certificate. So the URL's TLS parameters are taken out here and the TLS client is
//! built to match libpq:
//!
//! | sslmode | TLS | certificate checked |
//! |---|---|---|
//! | `disable` | never | - |
//! | `allow`, `prefer` (default) | when the server offers it | no |
//! | `require` | always | only if `sslrootcert` is given (libpq: then as `verify-ca`) |
//! | `verify-ca` | always | chain against `sslrootcert` |
//! | `verify-full` | always | chain and host name |
//!
//! `sslrootcert` is a PEM file, or `system` for the operating system's roots; for the verify
//! modes it defaults to `~/.postgresql/root.crt`, as in libpq.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, NoTls};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Why a connection could not be made. Never holds the URL's password.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL is not usable.
    #[error("postgres url: {0}")]
    Url(String),
    /// TLS could not be set up (root certificates).
    #[error("postgres tls: {0}")]
    Tls(String),
    /// The server could not be reached or refused us.
    #[error("postgres: {}", chain(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// Migrating the schema failed.
    #[error("postgres migration: {0}")]
    Migration(String),
}

/// An error and its causes on one line (tokio-postgres' own text stops at "error performing TLS
/// handshake"; the cause says which check failed). Causes are I/O and TLS errors, never the URL.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `disable`.
    Disable,
    /// `allow` and `prefer`: TLS when offered, certificate unchecked.
    Prefer,
    /// `require`: TLS, certificate unchecked unless a root is given.
    Require,
    /// `verify-ca`: TLS, chain checked.
    VerifyCa,
    /// `verify-full`: TLS, chain and host name checked.
    VerifyFull,
}

impl FromStr for TlsMode {
    type Err = ConnectError;
    fn from_str(s: &str) -> Result<Self, ConnectError> {
        Ok(match s {
            "disable" => TlsMode::Disable,
            "allow" | "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            other => return Err(ConnectError::Url(format!("unknown sslmode {other:?}"))),
        })
    }
}

/// Where the trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSource {
    /// A PEM file.
    File(PathBuf),
    /// The operating system's store (`sslrootcert=system`).
    System,
}

/// A parsed connection URL: the tokio-postgres part and the TLS part.
#[derive(Clone)]
pub struct PgTarget {
    config: tokio_postgres::Config,
    tls: TlsMode,
    root: Option<RootSource>,
    shown: String,
}

impl fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTarget").field("url", &self.shown).field("tls", &self.tls).finish()
    }
}

impl fmt::Display for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl PgTarget {
    /// Parses a `postgres://` or `postgresql://` URL. `sslmode`, `sslrootcert` are taken here;
    /// `application_name`, `connect_timeout` and the rest go to tokio-postgres.
    pub fn parse(url: &str) -> Result<Self, ConnectError> {
        let url = url.trim();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConnectError::Url("expected postgres://user@host:port/database".into()));
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut tls = TlsMode::Prefer;
        let mut root = None;
        let mut rest = form_urlencoded::Serializer::new(String::new());
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "sslmode" => tls = v.parse()?,
                "sslrootcert" => {
                    root = Some(if v == "system" { RootSource::System } else { RootSource::File(v.as_ref().into()) })
                }
                "sslcert" | "sslkey" | "sslpassword" => {
                    return Err(ConnectError::Url(format!("{k} (client certificates) is not supported")))
                }
                _ => {
                    rest.append_pair(&k, &v);
                }
            }
        }
        let rest = rest.finish();
        let remaining = if rest.is_empty() { base.to_owned() } else { format!("{base}?{rest}") };
        let mut config = tokio_postgres::Config::from_str(&remaining)
            // tokio-postgres' messages name the option, never its value.
            .map_err(|e| ConnectError::Url(e.to_string()))?;
        config.ssl_mode(match tls {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        if config.get_application_name().is_none() {
            config.application_name("metronome");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(std::time::Duration::from_secs(10));
        }
        Ok(Self { shown: redact(base), config, tls, root })
    }

    /// The TLS mode.
    pub fn tls(&self) -> TlsMode {
        self.tls
    }

    /// Connects; the connection is driven by a task on the current tokio runtime and ends when
    /// the client is dropped.
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        let client = if self.tls == TlsMode::Disable {
            let (client, connection) = self.config.connect(NoTls).await?;
            tokio::spawn(drive(connection));
            client
        } else {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(self.rustls_config()?);
            let (client, connection) = self.config.connect(tls).await?;
            tokio::spawn(drive(connection));
            client
        };
        Ok(client)
    }

    fn rustls_config(&self) -> Result<rustls::ClientConfig, ConnectError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| ConnectError::Tls(e.to_string()))?;
        let root = match (self.tls, &self.root) {
            (_, Some(root)) => Some(root.clone()),
            (TlsMode::VerifyCa | TlsMode::VerifyFull, None) => Some(RootSource::File(default_root_file())),
            _ => None,
        };
        let verifier: Arc<dyn ServerCertVerifier> = match root {
            // libpq's `prefer` never checks; `require` checks only with a root given.
            Some(_) if self.tls == TlsMode::Prefer => Arc::new(Unchecked(provider)),
            None => Arc::new(Unchecked(provider)),
            Some(source) => {
                let roots = Arc::new(load_roots(&source)?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                    .build()
                    .map_err(|e| ConnectError::Tls(e.to_string()))?;
                if self.tls == TlsMode::VerifyFull {
                    webpki
                } else {
                    Arc::new(ChainOnly(webpki))
                }
            }
        };
        Ok(builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth())
    }
}

async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "postgres connection ended");
    }
}

/// `scheme://user:secret@host/db` shown as `scheme://user:***@host/db`.
fn redact(base: &str) -> String {
    let Some((scheme, rest)) = base.split_once("://") else { return base.to_owned() };
    let (authority, path) = rest.split_once('/').map_or((rest, None), |(a, p)| (a, Some(p)));
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{name}:***@{host}"),
            None => format!("{user}@{host}"),
        },
        None => authority.to_owned(),
    };
    match path {
        Some(p) => format!("{scheme}://{authority}/{p}"),
        None => format!("{scheme}://{authority}"),
    }
}

fn default_root_file() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(".postgresql/root.crt")
}

fn load_roots(source: &RootSource) -> Result<RootCertStore, ConnectError> {
    let mut roots = RootCertStore::empty();
    match source {
        RootSource::System => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
        }
        RootSource::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| ConnectError::Tls(format!("sslrootcert {}: {e}", path.display())))?;
            for cert in certs {
                let cert = cert.map_err(|e| ConnectError::Tls(format!("sslrootcert {}: {e}", path.display())))?;
                roots.add(cert).map_err(|e| ConnectError::Tls(format!("sslrootcert {}: {e}", path.display())))?;
            }
        }
    }
    if roots.is_empty() {
        return Err(ConnectError::Tls("no root certificates to check the server against".into()));
    }
    Ok(roots)
}

/// Encrypts without checking who is on the other end (libpq's `prefer` and bare `require`).
/// The handshake signature is still verified, so the session key belongs to the certificate.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the name in the certificate is not
/// compared with the host.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Key of the advisory lock that keeps two instances from migrating at once.
const MIGRATION_LOCK: i64 = 0x6d65_7472_6f6e_6f6d;

/// Brings the schema up to date (`crates/io/migrations`, applied in version order, each once).
/// Instances starting together take turns on an advisory lock.
pub async fn migrate(client: &mut Client) -> Result<usize, ConnectError> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
    let applied = embedded::migrations::runner().run_async(client).await;
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    let report = applied.map_err(|e| ConnectError::Migration(e.to_string()))?;
    unlocked?;
    Ok(report.applied_migrations().len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_is_taken_out_and_the_rest_passed_on() {
        let t = PgTarget::parse("postgresql://app:s3cret@db.example:5433/alerts?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=x").unwrap();
        assert_eq!(t.tls(), TlsMode::VerifyFull);
        assert_eq!(t.root, Some(RootSource::File("/etc/ca.pem".into())));
        assert_eq!(t.config.get_ssl_mode(), SslMode::Require);
        assert_eq!(t.config.get_dbname(), Some("alerts"));
        assert_eq!(t.config.get_application_name(), Some("x"));
        assert_eq!(t.to_string(), "postgresql://app:***@db.example:5433/alerts");
        assert!(!format!("{t:?}").contains("s3cret"));
    }

    #[test]
    fn modes_map_as_libpq_does() {
        for (mode, tls, pg) in [
            ("disable", TlsMode::Disable, SslMode::Disable),
            ("allow", TlsMode::Prefer, SslMode::Prefer),
            ("prefer", TlsMode::Prefer, SslMode::Prefer),
            ("require", TlsMode::Require, SslMode::Require),
            ("verify-ca", TlsMode::VerifyCa, SslMode::Require),
        ] {
            let t = PgTarget::parse(&format!("postgres://localhost/db?sslmode={mode}")).unwrap();
            assert_eq!((t.tls(), t.config.get_ssl_mode()), (tls, pg), "{mode}");
        }
        let t = PgTarget::parse("postgres://localhost/db").unwrap();
        assert_eq!(t.tls(), TlsMode::Prefer);
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_secrets() {
        for url in [
            "mysql://u:pw@h/db",
            "postgres://u:pw@h/db?sslmode=sometimes",
            "postgres://u:pw@h/db?sslcert=/c.pem",
            "postgres://u:pw@h/db?port=notaport",
        ] {
            let e = PgTarget::parse(url).unwrap_err().to_string();
            assert!(!e.contains("pw"), "{e}");
        }
    }

    #[test]
    fn redaction_keeps_everything_but_the_password() {
        assert_eq!(redact("postgres://u:p@h:1/d"), "postgres://u:***@h:1/d");
        assert_eq!(redact("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(redact("postgres://h"), "postgres://h");
        assert_eq!(redact("postgres://u:p:q@h"), "postgres://u:***@h");
    }

    #[test]
    fn verify_modes_need_roots() {
        let t = PgTarget::parse("postgres://h/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem").unwrap();
        assert!(matches!(t.rustls_config(), Err(ConnectError::Tls(_))));
        let t = PgTarget::parse("postgres://h/d?sslmode=require").unwrap();
        assert!(t.rustls_config().is_ok());
    }
}
