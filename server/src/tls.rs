//! TLS set-up: a listener's `tls` table becomes a rustls `ServerConfig` (ring provider), and an
//! established session becomes the [`TlsIdentity`] a frontend sees.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_core::frontend::TlsIdentity;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConnection, VerifierBuilderError, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};

use crate::config::TlsConfig;

/// Why a listener's TLS material was refused. `key` is the config key, e.g.
/// `listeners[0].tls.cert`.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {}: {error}", path.display())]
    Read { key: String, path: PathBuf, error: io::Error },
    #[error("{key}: {} is not valid PEM: {error}", path.display())]
    Pem { key: String, path: PathBuf, error: io::Error },
    #[error("{key}: no certificate found in {}", path.display())]
    NoCertificate { key: String, path: PathBuf },
    #[error("{key}: no private key found in {}", path.display())]
    NoPrivateKey { key: String, path: PathBuf },
    #[error("{key}: {} holds a certificate that cannot be a trust anchor: {error}", path.display())]
    BadCa { key: String, path: PathBuf, error: rustls::Error },
    #[error("{key}: {error}")]
    ClientVerifier { key: String, error: VerifierBuilderError },
    /// The certificate and key were read but rustls would not use them (e.g. they do not match).
    #[error("{key}: certificate and key refused: {error}")]
    Refused { key: String, error: rustls::Error },
}

/// Builds the rustls server config for one listener. `key_prefix` is the listener's `tls` key,
/// e.g. `listeners[0].tls`, used to name the offending key in errors.
/// What a TLS listener speaks.
pub const PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

pub fn server_config(tls: &TlsConfig, key_prefix: &str) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_key = format!("{key_prefix}.cert");
    let key_key = format!("{key_prefix}.key");
    let certs = load_certs(&cert_key, &tls.cert)?;
    let private_key = load_private_key(&key_key, &tls.key)?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // TLS 1.3 and 1.2 only, named rather than left to the library's defaults: SSL 3, TLS 1.0
    // and 1.1 are refused with a protocol_version alert.
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(|error| TlsError::Refused { key: key_prefix.to_string(), error })?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca_path) => {
            let ca_key = format!("{key_prefix}.client_ca");
            let mut roots = RootCertStore::empty();
            for cert in load_certs(&ca_key, ca_path)? {
                roots.add(cert).map_err(|error| TlsError::BadCa {
                    key: ca_key.clone(),
                    path: ca_path.clone(),
                    error,
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if tls.require_client_cert { verifier } else { verifier.allow_unauthenticated() };
            let verifier = verifier.build().map_err(|error| TlsError::ClientVerifier { key: ca_key, error })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config =
        builder.with_single_cert(certs, private_key).map_err(|error| TlsError::Refused { key: key_key, error })?;
    Ok(Arc::new(config))
}

/// What the handshake established about the client.
pub fn identity(conn: &ServerConnection) -> TlsIdentity {
    TlsIdentity {
        peer_certificates: conn.peer_certificates().unwrap_or_default().iter().map(|c| c.as_ref().to_vec()).collect(),
        server_name: conn.server_name().map(str::to_string),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
    }
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read { key: key.to_string(), path: path.to_path_buf(), error })
}

fn load_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(key, path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem { key: key.to_string(), path: path.to_path_buf(), error })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { key: key.to_string(), path: path.to_path_buf() });
    }
    Ok(certs)
}

fn load_private_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(key, path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|error| TlsError::Pem { key: key.to_string(), path: path.to_path_buf(), error })?
        .ok_or_else(|| TlsError::NoPrivateKey { key: key.to_string(), path: path.to_path_buf() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(dir: &Path, cert: &str, key: &str) -> TlsConfig {
        TlsConfig { cert: dir.join(cert), key: dir.join(key), client_ca: None, require_client_cert: false }
    }

    #[test]
    fn missing_cert_names_the_key_and_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = server_config(&tls(dir.path(), "nope.pem", "nope.key"), "listeners[0].tls").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("listeners[0].tls.cert: cannot read "), "{msg}");
        assert!(msg.contains("nope.pem"), "{msg}");
    }

    /// Drives a handshake in memory; the version agreed, or `None` when it failed.
    fn handshake(server: Arc<ServerConfig>, client: Arc<rustls::ClientConfig>) -> Option<rustls::ProtocolVersion> {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(client, name).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        for _ in 0..10 {
            let mut wire = Vec::new();
            c.write_tls(&mut wire).unwrap();
            s.read_tls(&mut &wire[..]).unwrap();
            s.process_new_packets().ok()?;
            let mut wire = Vec::new();
            s.write_tls(&mut wire).unwrap();
            c.read_tls(&mut &wire[..]).unwrap();
            c.process_new_packets().ok()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return s.protocol_version();
            }
        }
        None
    }

    #[test]
    fn tls_1_2_and_1_3_are_spoken() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
        std::fs::write(dir.path().join("c.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("k.pem"), key.serialize_pem()).unwrap();
        let server = server_config(&tls(dir.path(), "c.pem", "k.pem"), "listeners[0].tls").unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
            let client = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            assert_eq!(handshake(server.clone(), Arc::new(client)), Some(version.version));
        }
    }

    #[test]
    fn file_without_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("empty.pem"), "not a certificate\n").unwrap();
        let err = server_config(&tls(dir.path(), "empty.pem", "k"), "listeners[2].tls").unwrap_err();
        assert!(err.to_string().starts_with("listeners[2].tls.cert: no certificate found in "), "{err}");
    }
}
