//! TLS towards the remote: a bridge's `tls` table becomes a rustls `ClientConfig` (ring
//! provider, TLS 1.3 and 1.2), read again at each connect so that renewed files are picked up.
//! Trust is the `ca` file, or without one the system's trusted CAs.

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
    #[error("tls: no tls.ca given and no usable certificate in the system's trust store ({0})")]
    NoSystemRoots(String),
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

/// The system's trusted CAs, read now (so that an updated ca-certificates is picked up at the
/// next connect): rustls-native-certs, which on Linux reads the distribution's bundle
/// (Debian: /etc/ssl/certs/ca-certificates.crt) or `SSL_CERT_FILE` / `SSL_CERT_DIR`.
/// Certificates that do not parse are skipped, as OpenSSL does; none usable is an error.
fn system_roots(roots: &mut RootCertStore) -> Result<(), TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let (added, _skipped) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = match found.errors.first() {
            Some(e) => e.to_string(),
            None => "none found".to_string(),
        };
        return Err(TlsError::NoSystemRoots(why));
    }
    Ok(())
}

/// The client configuration for `tls`.
pub fn client_config(tls: &BridgeTls) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match &tls.ca {
        Some(ca) => {
            for cert in certs("ca", ca)? {
                roots.add(cert).map_err(|error| TlsError::BadCa { path: ca.clone(), error })?;
            }
        }
        None => system_roots(&mut roots)?,
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

/// The name the remote's certificate is checked against when connecting to `address` (one of
/// the bridge's): `tls.server_name`, else the host of `address`.
pub fn server_name(address: &str, tls: &BridgeTls) -> Result<ServerName<'static>, TlsError> {
    let name = tls.server_name.clone().unwrap_or_else(|| crate::config::host_of(address).to_string());
    ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName(name))
}

/// Everything [`client_config`] and [`server_name`] check, for `ferry check-config`.
pub fn check(config: &BridgeConfig) -> Result<(), TlsError> {
    if let Some(tls) = &config.tls {
        client_config(tls)?;
        for i in 0..config.address_count() {
            server_name(config.address_at(i), tls)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_ca_the_systems_trusted_cas_make_a_client_config() {
        // Debian's ca-certificates (on this machine and in CI's) or what SSL_CERT_FILE /
        // SSL_CERT_DIR name.
        let tls = BridgeTls { ca: None, client_cert: None, server_name: None };
        client_config(&tls).unwrap_or_else(|e| panic!("{e}"));
        let mut roots = RootCertStore::empty();
        system_roots(&mut roots).unwrap_or_else(|e| panic!("{e}"));
        assert!(roots.len() > 10, "a real trust store: {} roots", roots.len());
    }

    #[test]
    fn an_unreadable_ca_file_is_named() {
        let tls = BridgeTls { ca: Some("/nonexistent/ca.pem".into()), client_cert: None, server_name: None };
        let e = client_config(&tls).unwrap_err().to_string();
        assert!(e.starts_with("tls.ca: cannot read /nonexistent/ca.pem"), "{e}");
    }
}
