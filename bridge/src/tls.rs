//! TLS towards the remote: a bridge's `tls` table becomes a rustls `ClientConfig` (ring
//! provider, TLS 1.3 and 1.2), read again at each connect so that renewed files are picked up.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

use crate::config::{BridgeConfig, BridgeTls};

/// Why a bridge's TLS material was refused (names the file, never a key's contents).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.{key}: cannot read {}: {error}", path.display())]
    Read { key: &'static str, path: PathBuf, error: io::Error },
    #[error("tls.{key}: nothing usable in {} ({what})", path.display())]
    Empty { key: &'static str, path: PathBuf, what: &'static str },
    #[error("tls.ca: {} holds a certificate that cannot be a trust anchor: {error}", path.display())]
    BadCa { path: PathBuf, error: rustls::Error },
    #[error("tls: {0}")]
    Refused(rustls::Error),
    #[error("tls.server_name: {0:?} is not a DNS name or IP address")]
    ServerName(String),
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read { key, path: path.to_path_buf(), error })
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(key, path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Read { key, path: path.to_path_buf(), error })?;
    if certs.is_empty() {
        return Err(TlsError::Empty { key, path: path.to_path_buf(), what: "no PEM certificate" });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("key", path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|error| TlsError::Read { key: "key", path: path.to_path_buf(), error })?
        .ok_or_else(|| TlsError::Empty { key: "key", path: path.to_path_buf(), what: "no PEM private key" })
}

/// The client configuration for `tls`.
pub fn client_config(tls: &BridgeTls) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs("ca", &tls.ca)? {
        roots.add(cert).map_err(|error| TlsError::BadCa { path: tls.ca.clone(), error })?;
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Refused)?
        .with_root_certificates(roots);
    let config = match &tls.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            builder.with_client_auth_cert(certs("cert", cert)?, private_key(key)?).map_err(TlsError::Refused)?
        }
    };
    Ok(Arc::new(config))
}

/// The name the remote's certificate is checked against.
pub fn server_name(config: &BridgeConfig, tls: &BridgeTls) -> Result<ServerName<'static>, TlsError> {
    let name = tls.server_name.clone().unwrap_or_else(|| config.host().to_string());
    ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName(name))
}

/// Everything [`client_config`] and [`server_name`] check, for `ferry check-config`.
pub fn check(config: &BridgeConfig) -> Result<(), TlsError> {
    if let Some(tls) = &config.tls {
        client_config(tls)?;
        server_name(config, tls)?;
    }
    Ok(())
}
