//! A CONNECT decided without I/O: the checks made before the login (§3.1.2, §3.1.3), what a
//! login's outcome means for the client, and whether its will may ever be published. The
//! driver (`driver::establish`) reads the CONNECT, runs the login and the claim of the client
//! id, and acts on what these return: whether a CONNACK goes out, with which code, and what is
//! logged. Each rule is unit-tested here with packets alone.

use ferry_core::auth::AuthError;

use crate::acl::Acl;
use crate::codec::{Connect, ProtocolVersion};
use crate::errors::MqttError;
use crate::topic::{check_topic_name, server_only};

/// Why a CONNECT is refused, and how the client learns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The CONNACK's reason ([`MqttError::code`] gives its byte for the version).
    pub why: MqttError,
    /// Whether a CONNACK is sent at all before the connection closes.
    pub answer: bool,
    /// What the log line says.
    pub detail: String,
}

impl Refusal {
    fn new(why: MqttError, detail: impl Into<String>) -> Refusal {
        Refusal { why, answer: true, detail: detail.into() }
    }
}

/// The client id the session takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientId {
    pub id: String,
    /// Chosen by the server for an empty one (5.0 tells the client in the CONNACK).
    pub assigned: bool,
}

/// The checks of a CONNECT that need neither the login nor the session: an authentication
/// method Ferry does not offer (5.0 AUTH), a will topic that is not a valid topic name, and
/// the client id rules of each version. `assign` makes an id for a client that sent none.
pub fn admit(connect: &Connect, assign: impl FnOnce() -> String) -> Result<ClientId, Refusal> {
    let version = connect.version;
    let v5 = version == ProtocolVersion::V5;
    if v5 && connect.properties.authentication_method.is_some() {
        return Err(Refusal::new(MqttError::BadAuthenticationMethod, "unsupported authentication method"));
    }
    if let Some(w) = &connect.will {
        if check_topic_name(w.topic.as_str()).is_err() {
            // 3.1.1 has no code for it: closed without a CONNACK.
            return Err(Refusal {
                answer: v5,
                ..Refusal::new(MqttError::WillTopicInvalid, format!("invalid will topic {:?}", w.topic.as_str()))
            });
        }
    }
    if !connect.client_id.is_empty() {
        return Ok(ClientId { id: connect.client_id.as_str().to_string(), assigned: false });
    }
    // 3.1 §3.1 requires 1 to 23 characters (no assigned ids before 3.1.1); 3.1.1 §3.1.3-8: an
    // empty id needs clean session 1. Longer 3.1 ids are accepted, as Mosquitto, EMQX and
    // RabbitMQ do (docs/conformance.md).
    if version == ProtocolVersion::V31 || (!v5 && !connect.clean_start) {
        return Err(Refusal::new(
            MqttError::ClientIdentifierNotValid,
            format!("empty client id in MQTT {}", version.name()),
        ));
    }
    Ok(ClientId { id: assign(), assigned: true })
}

/// What a refused login tells the client.
pub fn login_refusal(e: &AuthError) -> MqttError {
    match e {
        AuthError::BadCredentials => MqttError::BadUserNameOrPassword,
        AuthError::NotAllowed(_) => MqttError::NotAuthorized,
        AuthError::Busy => MqttError::ServerBusy,
        // The address failed too often.
        AuthError::Throttled(_) => MqttError::ConnectionRateExceeded,
    }
}

/// A will the client could not publish refuses the CONNECT (as Mosquitto does): one the ACL
/// forbids (it would be accepted and then silently never published), or one on a topic that
/// is the server's (`$SYS/...`: a will there would overwrite `$SYS/broker/uptime` when the
/// client goes; a Mosquitto bridge's `$SYS/broker/connection/<id>/state` will is allowed).
pub fn check_will(connect: &Connect, acl: &Acl, user: Option<&str>, client_id: &str) -> Result<(), Refusal> {
    match &connect.will {
        Some(w) if server_only(w.topic.as_str()) => {
            Err(Refusal::new(MqttError::NotAuthorized, format!("will topic {:?} is the server's", w.topic.as_str())))
        }
        Some(w) if !acl.can_write(user, client_id, w.topic.as_str()) => {
            Err(Refusal::new(MqttError::NotAuthorized, "will topic not authorized"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::{Access, AclEntry};
    use crate::codec::{QoS, Str, Will};

    const V31: ProtocolVersion = ProtocolVersion::V31;
    const V311: ProtocolVersion = ProtocolVersion::V311;
    const V5: ProtocolVersion = ProtocolVersion::V5;

    fn connect(version: ProtocolVersion, client_id: &str, clean: bool) -> Connect {
        Connect {
            bridge: false,
            version,
            clean_start: clean,
            keep_alive: 60,
            client_id: Str::from(client_id),
            will: None,
            username: None,
            password: None,
            properties: Default::default(),
        }
    }

    fn with_will(mut c: Connect, topic: &str) -> Connect {
        c.will = Some(Will {
            topic: Str::from(topic),
            payload: bytes::Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
        });
        c
    }

    fn assigned() -> String {
        "ferry-assigned".into()
    }

    #[test]
    fn a_client_id_is_kept_or_assigned_as_each_version_allows() {
        let kept = admit(&connect(V311, "dev-1", false), assigned).unwrap();
        assert_eq!(kept, ClientId { id: "dev-1".into(), assigned: false });
        for (version, clean) in [(V311, true), (V5, true), (V5, false)] {
            let c = admit(&connect(version, "", clean), assigned).unwrap();
            assert_eq!(c, ClientId { id: "ferry-assigned".into(), assigned: true }, "{version:?} clean {clean}");
        }
        // 3.1.1 without clean session, and 3.1 always: identifier rejected, with a CONNACK.
        for (version, clean) in [(V311, false), (V31, true), (V31, false)] {
            let r = admit(&connect(version, "", clean), assigned).unwrap_err();
            assert_eq!((r.why, r.answer), (MqttError::ClientIdentifierNotValid, true), "{version:?}");
        }
        // 3.1's 23-character limit is not enforced (gateways send longer ids).
        assert!(admit(&connect(V31, &"x".repeat(40), true), assigned).is_ok());
    }

    #[test]
    fn an_invalid_will_topic_is_answered_in_5_and_closed_in_3() {
        for (version, answer) in [(V5, true), (V311, false), (V31, false)] {
            for topic in ["a/+", "#", "", "$share/g/t"] {
                let r = admit(&with_will(connect(version, "c", true), topic), assigned).unwrap_err();
                assert_eq!((r.why, r.answer), (MqttError::WillTopicInvalid, answer), "{version:?} {topic:?}");
            }
        }
        assert!(admit(&with_will(connect(V5, "c", true), "status/c"), assigned).is_ok());
    }

    #[test]
    fn an_authentication_method_is_refused() {
        let mut c = connect(V5, "c", true);
        c.properties.authentication_method = Some(Str::from("SCRAM-SHA-1"));
        assert_eq!(admit(&c, assigned).unwrap_err().why, MqttError::BadAuthenticationMethod);
    }

    #[test]
    fn each_login_failure_has_its_code() {
        assert_eq!(login_refusal(&AuthError::BadCredentials), MqttError::BadUserNameOrPassword);
        assert_eq!(login_refusal(&AuthError::NotAllowed("no".into())), MqttError::NotAuthorized);
        assert_eq!(login_refusal(&AuthError::Busy), MqttError::ServerBusy);
        assert_eq!(login_refusal(&AuthError::Throttled("later".into())), MqttError::ConnectionRateExceeded);
        assert_eq!(MqttError::ConnectionRateExceeded.code(V5), Some(0x9F));
        assert_eq!(MqttError::BadUserNameOrPassword.code(V311), Some(4));
    }

    #[test]
    fn a_will_the_acl_forbids_refuses_the_connect() {
        let acl = Acl::new(vec![AclEntry { user: None, topic: "status/%c".into(), access: Access::Write }]);
        let c = with_will(connect(V311, "dev-1", true), "status/dev-1");
        assert!(check_will(&c, &acl, None, "dev-1").is_ok());
        let r = check_will(&with_will(connect(V311, "dev-1", true), "status/other"), &acl, None, "dev-1").unwrap_err();
        assert_eq!((r.why, r.answer), (MqttError::NotAuthorized, true));
        assert!(check_will(&connect(V311, "dev-1", true), &acl, None, "dev-1").is_ok(), "no will");
    }

    #[test]
    fn a_will_on_the_servers_topics_refuses_the_connect_whatever_the_acl() {
        let open = Acl::new(Vec::new());
        let r = check_will(&with_will(connect(V5, "c", true), "$SYS/broker/uptime"), &open, None, "c").unwrap_err();
        assert_eq!((r.why, r.answer), (MqttError::NotAuthorized, true));
        // A Mosquitto bridge's notification will.
        let bridge = with_will(connect(V311, "edge-1", true), "$SYS/broker/connection/edge-1/state");
        assert!(check_will(&bridge, &open, None, "edge-1").is_ok());
    }
}
