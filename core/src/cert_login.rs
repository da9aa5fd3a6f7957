//! Client certificates as identities: the user name a verified TLS client certificate stands
//! for, for listeners with `cert_login` (AMQP's EXTERNAL mechanism, MQTT's Mosquitto-style
//! `use_identity_as_username` / `use_subject_as_username`).
//!
//! The certificate has already been verified against the listener's `client_ca` by rustls; this
//! only reads its subject (with `x509-parser`).

use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::x509::X509Name;

use crate::auth::{AuthError, Identity};

/// Which part of the subject is the user name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertLogin {
    /// The subject's common name (CN): Mosquitto's `use_identity_as_username`, RabbitMQ's
    /// `ssl_cert_login_from = common_name`.
    CommonName,
    /// The whole subject as an RFC 4514 string, most specific first (`CN=client,O=Acme,C=DE`):
    /// RabbitMQ's default `ssl_cert_login_from = distinguished_name`.
    DistinguishedName,
}

impl CertLogin {
    /// Parses the config value: `common_name` or `distinguished_name`.
    pub fn parse(s: &str) -> Option<CertLogin> {
        match s {
            "common_name" => Some(CertLogin::CommonName),
            "distinguished_name" => Some(CertLogin::DistinguishedName),
            _ => None,
        }
    }
}

/// The identity of a client that presented `peer_certificates` (DER, leaf first). Refused with
/// [`AuthError::NotAllowed`] when there is no certificate or its subject has no usable name.
pub fn certificate_identity(peer_certificates: &[Vec<u8>], from: CertLogin) -> Result<Identity, AuthError> {
    let leaf =
        peer_certificates.first().ok_or_else(|| AuthError::NotAllowed("no client certificate was presented".into()))?;
    let user = certificate_user(leaf, from).map_err(AuthError::NotAllowed)?;
    Ok(Identity { user, anonymous: false })
}

/// The user name `der` (one certificate) stands for.
pub fn certificate_user(der: &[u8], from: CertLogin) -> Result<String, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("unreadable client certificate: {e}"))?;
    let subject = cert.subject();
    let name = match from {
        CertLogin::CommonName => common_name(subject)?,
        CertLogin::DistinguishedName => distinguished_name(subject)?,
    };
    if name.is_empty() {
        return Err("the client certificate's subject is empty".into());
    }
    Ok(name)
}

fn common_name(subject: &X509Name<'_>) -> Result<String, String> {
    let cn = subject.iter_common_name().next().ok_or("the client certificate has no common name (CN)")?;
    cn.as_str().map(str::to_string).map_err(|_| "the client certificate's common name is not a string".to_string())
}

/// RFC 4514: RDNs in reverse order, `+` between the values of a multi-valued RDN, known
/// attribute types by their short names, others as dotted OIDs with the DER value in hex.
fn distinguished_name(subject: &X509Name<'_>) -> Result<String, String> {
    let mut rdns = Vec::new();
    for rdn in subject.iter_rdn() {
        let mut parts = Vec::new();
        for atv in rdn.iter() {
            let oid = atv.attr_type().to_id_string();
            let short = match oid.as_str() {
                "2.5.4.3" => Some("CN"),
                "2.5.4.7" => Some("L"),
                "2.5.4.8" => Some("ST"),
                "2.5.4.10" => Some("O"),
                "2.5.4.11" => Some("OU"),
                "2.5.4.6" => Some("C"),
                "2.5.4.9" => Some("STREET"),
                "0.9.2342.19200300.100.1.25" => Some("DC"),
                "0.9.2342.19200300.100.1.1" => Some("UID"),
                _ => None,
            };
            match (short, atv.as_str()) {
                (Some(short), Ok(value)) => parts.push(format!("{short}={}", escape(value))),
                _ => {
                    let hex: String = atv.attr_value().data.iter().map(|b| format!("{b:02x}")).collect();
                    parts.push(format!("{oid}=#{hex}"));
                }
            }
        }
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    Ok(rdns.join(","))
}

/// RFC 4514 §2.4 escaping of an attribute value.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == ' ' || c == '#'))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
            out.push(c);
        } else if c == '\0' {
            out.push_str("\\00");
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped_as_rfc_4514_says() {
        assert_eq!(escape("plain"), "plain");
        assert_eq!(escape("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape(" #x "), "\\ #x\\ ");
        assert_eq!(escape("#"), "\\#");
    }

    fn cert(dn: &[(rcgen::DnType, &str)]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["client".to_string()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in dn {
            params.distinguished_name.push(t.clone(), *v);
        }
        params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().der().to_vec()
    }

    #[test]
    fn common_name_and_distinguished_name_are_read_from_the_subject() {
        use rcgen::DnType;
        let der = cert(&[
            (DnType::CountryName, "DE"),
            (DnType::OrganizationName, "Acme, Inc"),
            (DnType::CommonName, "sensor-7"),
        ]);
        assert_eq!(certificate_user(&der, CertLogin::CommonName).unwrap(), "sensor-7");
        assert_eq!(certificate_user(&der, CertLogin::DistinguishedName).unwrap(), "CN=sensor-7,O=Acme\\, Inc,C=DE");
        let id = certificate_identity(&[der], CertLogin::CommonName).unwrap();
        assert_eq!((id.user.as_str(), id.anonymous), ("sensor-7", false));

        let no_cn = cert(&[(DnType::OrganizationName, "Acme")]);
        assert!(certificate_user(&no_cn, CertLogin::CommonName).unwrap_err().contains("no common name"));
        assert_eq!(certificate_user(&no_cn, CertLogin::DistinguishedName).unwrap(), "O=Acme");
        assert!(certificate_user(&cert(&[]), CertLogin::DistinguishedName).is_err());
    }

    #[test]
    fn garbage_is_refused_not_a_panic() {
        assert!(certificate_user(b"", CertLogin::CommonName).is_err());
        assert!(certificate_user(&[0x30, 0x82, 0xff, 0xff, 0x00], CertLogin::DistinguishedName).is_err());
        assert!(certificate_identity(&[], CertLogin::CommonName).is_err());
    }
}
