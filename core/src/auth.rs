//! Authentication: the users a broker knows, their password hashes, and the login rules every
//! frontend applies (issue 7).
//!
//! A frontend calls [`Authenticator::login`] (through [`Broker::auth`](crate::Broker::auth)) with
//! the listener's [`AuthPolicy`], the client's address and what it sent. Password verification
//! is deliberately slow (argon2id takes tens of milliseconds of CPU and 19 MiB), so it runs on
//! [`MAX_CONCURRENT_VERIFICATIONS`] threads of its own ([`pool`]), with at most
//! [`MAX_WAITING_VERIFICATIONS`] logins queued behind them; past that a login is refused at once
//! with [`AuthError::Busy`]. Before a login reaches that queue, [`throttle`] slows down, then
//! refuses, an address whose logins keep failing, so that one attacking address cannot keep
//! good clients elsewhere out. A flood of bad logins therefore costs at most two cores, a
//! bounded queue and no lasting memory, and never stalls the async workers that serve the
//! connected clients.
//!
//! Hash formats ([`PasswordHash::parse`]):
//! - argon2id PHC strings (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`), what
//!   [`PasswordHash::argon2id`] (and `ferry passwd`) make;
//! - Mosquitto's PBKDF2-SHA512 (`$7$<iterations>$<base64 salt>$<base64 hash>`, what
//!   `mosquitto_passwd` writes since Mosquitto 2.0);
//! - RabbitMQ's salted SHA-256 / SHA-512 (`rabbitmq-sha256:<base64>` / `rabbitmq-sha512:<base64>`,
//!   the `password_hash` of a RabbitMQ definitions export with `rabbit_password_hashing_sha256` /
//!   `_sha512`: base64 of a 4-byte salt followed by SHA-256/512(salt ++ password)).
//!
//! Passwords are never logged, and neither [`PasswordHash`]'s `Debug` nor the parse errors show
//! a hash.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use argon2::password_hash::{PasswordHash as Phc, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use rand_core::OsRng;
use sha2::{Digest, Sha256, Sha512};
use subtle::ConstantTimeEq;

mod pool;
pub mod throttle;

use throttle::{Admit, LoginThrottle, Source};

/// Password verifications running at once: the threads of the checking pool (each takes a core
/// while it checks).
pub const MAX_CONCURRENT_VERIFICATIONS: usize = 2;
/// Logins waiting for a verification slot; one more is refused with [`AuthError::Busy`].
pub const MAX_WAITING_VERIFICATIONS: usize = 64;

/// The user name anonymous clients get.
pub const ANONYMOUS_USER: &str = "anonymous";
/// RabbitMQ's default user, accepted with the password `guest` where [`AuthPolicy::guest`] says so.
pub const GUEST_USER: &str = "guest";

/// argon2id parameters for new hashes: OWASP's recommendation (19 MiB, 2 passes, 1 lane), also
/// the `argon2` crate's defaults.
const ARGON2_M_KIB: u32 = 19_456;
const ARGON2_T: u32 = 2;
const ARGON2_P: u32 = 1;
/// The most memory a configured argon2id hash may ask for per verification (256 MiB): with
/// [`MAX_CONCURRENT_VERIFICATIONS`] running, logins never take more than twice that.
const ARGON2_MAX_M_KIB: u32 = 262_144;
/// The most passes a configured argon2id hash may ask for.
const ARGON2_MAX_T: u32 = 64;
/// The most PBKDF2 iterations a `$7$` hash may ask for (Mosquitto writes 101).
const PBKDF2_MAX_ITERATIONS: u32 = 10_000_000;

/// Who a connection authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub anonymous: bool,
}

impl Identity {
    /// A client that sent no credentials, on a listener that lets them in.
    pub fn anonymous() -> Identity {
        Identity { user: ANONYMOUS_USER.to_string(), anonymous: true }
    }
}

/// Why a login was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("bad user name or password")]
    BadCredentials,
    #[error("too many logins being checked; try again")]
    Busy,
    /// The client's address has failed too often ([`throttle`]).
    #[error("{0}")]
    Throttled(String),
    #[error("{0}")]
    NotAllowed(String),
}

/// Per listener (in [`ListenerSettings`](crate::frontend::ListenerSettings)): what a client may
/// log in with besides configured users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuthPolicy {
    /// Clients without credentials are let in (as user "anonymous").
    pub anonymous: bool,
    /// `guest`/`guest` is accepted when no configured user is called guest (RabbitMQ's
    /// loopback-only guest).
    pub guest: bool,
    /// A verified client certificate is the identity ([`crate::cert_login`]): AMQP offers the
    /// EXTERNAL mechanism, MQTT takes the user name from the certificate.
    pub cert_login: Option<crate::cert_login::CertLogin>,
}

/// A stored password hash, in one of the accepted formats. `Debug` names the format only.
#[derive(Clone, PartialEq, Eq)]
pub enum PasswordHash {
    /// An argon2id PHC string, checked by [`PasswordHash::parse`].
    Argon2id(String),
    /// Mosquitto's `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2Sha512 { iterations: u32, salt: Vec<u8>, hash: Vec<u8> },
    /// RabbitMQ's `rabbit_password_hashing_sha256`: SHA-256(salt ++ password).
    RabbitSha256 { salt: [u8; 4], hash: Vec<u8> },
    /// RabbitMQ's `rabbit_password_hashing_sha512`: SHA-512(salt ++ password).
    RabbitSha512 { salt: [u8; 4], hash: Vec<u8> },
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PasswordHash({})", self.scheme())
    }
}

/// The prefix that marks a RabbitMQ SHA-256 hash in the config.
pub const RABBITMQ_SHA256_PREFIX: &str = "rabbitmq-sha256:";
/// The prefix that marks a RabbitMQ SHA-512 hash in the config.
pub const RABBITMQ_SHA512_PREFIX: &str = "rabbitmq-sha512:";

impl PasswordHash {
    /// Parses a stored hash. The error says what is wrong without repeating the hash.
    pub fn parse(s: &str) -> Result<PasswordHash, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty; make a hash with `ferry passwd`".into());
        }
        if s.starts_with("$argon2") {
            return parse_argon2(s);
        }
        if let Some(rest) = s.strip_prefix("$7$") {
            return parse_mosquitto_pbkdf2(rest);
        }
        if s.starts_with("$6$") {
            return Err("a Mosquitto `$6$` hash (one round of SHA-512) is too weak to accept; have the user \
                        choose a password again and hash it with `ferry passwd`"
                .into());
        }
        if let Some(b64) = s.strip_prefix(RABBITMQ_SHA256_PREFIX) {
            let (salt, hash) = parse_rabbit(b64, 32, "rabbitmq-sha256")?;
            return Ok(PasswordHash::RabbitSha256 { salt, hash });
        }
        if let Some(b64) = s.strip_prefix(RABBITMQ_SHA512_PREFIX) {
            let (salt, hash) = parse_rabbit(b64, 64, "rabbitmq-sha512")?;
            return Ok(PasswordHash::RabbitSha512 { salt, hash });
        }
        Err(format!(
            "not a known hash format: expected an argon2id PHC string (`$argon2id$...`, made by `ferry passwd`), \
             a Mosquitto `$7$...` hash, or a RabbitMQ hash prefixed `{RABBITMQ_SHA256_PREFIX}` or \
             `{RABBITMQ_SHA512_PREFIX}`"
        ))
    }

    /// Whether `password` matches. The final comparison takes the same time wherever the bytes
    /// differ.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            PasswordHash::Argon2id(phc) => verify_argon2id(phc, password).unwrap_or(false),
            PasswordHash::Pbkdf2Sha512 { iterations, salt, hash } => {
                let mut out = vec![0u8; hash.len()];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                out.ct_eq(hash).into()
            }
            PasswordHash::RabbitSha256 { salt, hash } => {
                let digest = Sha256::new().chain_update(salt).chain_update(password).finalize();
                digest.as_slice().ct_eq(hash).into()
            }
            PasswordHash::RabbitSha512 { salt, hash } => {
                let digest = Sha512::new().chain_update(salt).chain_update(password).finalize();
                digest.as_slice().ct_eq(hash).into()
            }
        }
    }

    /// A new argon2id PHC string for `password`, with a random salt and OWASP's parameters
    /// (m=19456 KiB, t=2, p=1).
    pub fn argon2id(password: &[u8]) -> String {
        let salt = SaltString::generate(&mut OsRng);
        argon2id_hasher()
            .hash_password(password, &salt)
            .expect("argon2id with fixed valid parameters and a generated salt cannot fail")
            .to_string()
    }

    /// The hash as [`PasswordHash::parse`] reads it back (the form a configuration file and a
    /// definitions export carry).
    pub fn to_stored(&self) -> String {
        match self {
            PasswordHash::Argon2id(phc) => phc.clone(),
            PasswordHash::Pbkdf2Sha512 { iterations, salt, hash } => {
                format!("$7${iterations}${}${}", BASE64.encode(salt), BASE64.encode(hash))
            }
            PasswordHash::RabbitSha256 { salt, hash } => {
                format!("{RABBITMQ_SHA256_PREFIX}{}", BASE64.encode([&salt[..], hash].concat()))
            }
            PasswordHash::RabbitSha512 { salt, hash } => {
                format!("{RABBITMQ_SHA512_PREFIX}{}", BASE64.encode([&salt[..], hash].concat()))
            }
        }
    }

    /// The format's name, for logs and `Debug`: `argon2id`, `mosquitto-pbkdf2-sha512`,
    /// `rabbitmq-sha256`, `rabbitmq-sha512`.
    pub fn scheme(&self) -> &'static str {
        match self {
            PasswordHash::Argon2id(_) => "argon2id",
            PasswordHash::Pbkdf2Sha512 { .. } => "mosquitto-pbkdf2-sha512",
            PasswordHash::RabbitSha256 { .. } => "rabbitmq-sha256",
            PasswordHash::RabbitSha512 { .. } => "rabbitmq-sha512",
        }
    }
}

/// An argon2id check whose working memory is given back to the system afterwards
/// ([`pool::argon2_blocks`]). `None`: the stored string is not usable (it was checked at parse).
fn verify_argon2id(phc: &str, password: &[u8]) -> Option<bool> {
    let parsed = Phc::new(phc).ok()?;
    let params = Params::try_from(&parsed).ok()?;
    let version = match parsed.version {
        Some(v) => Version::try_from(v).ok()?,
        None => Version::default(),
    };
    let mut salt = [0u8; 64];
    let salt = parsed.salt?.decode_b64(&mut salt).ok()?;
    let expected = parsed.hash?;
    let expected = expected.as_bytes();
    let mut out = vec![0u8; expected.len()];
    let blocks = pool::argon2_blocks(params.block_count());
    Argon2::new(Algorithm::Argon2id, version, params)
        .hash_password_into_with_memory(password, salt, &mut out, blocks)
        .ok()?;
    Some(out.ct_eq(expected).into())
}

fn argon2id_hasher() -> Argon2<'static> {
    let params = Params::new(ARGON2_M_KIB, ARGON2_T, ARGON2_P, None).expect("valid argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

fn parse_argon2(s: &str) -> Result<PasswordHash, String> {
    let phc = Phc::new(s).map_err(|e| format!("not a valid argon2id PHC string: {e}"))?;
    if phc.algorithm != Algorithm::Argon2id.ident() {
        return Err(format!(
            "{} hashes are not accepted, only argon2id (make one with `ferry passwd`)",
            phc.algorithm.as_str()
        ));
    }
    if phc.hash.is_none() {
        return Err("an argon2id PHC string without its hash part".into());
    }
    let params = Params::try_from(&phc).map_err(|e| format!("bad argon2id parameters: {e}"))?;
    if params.m_cost() > ARGON2_MAX_M_KIB {
        return Err(format!(
            "argon2id memory m={} KiB is more than the {ARGON2_MAX_M_KIB} KiB allowed per login",
            params.m_cost()
        ));
    }
    if params.t_cost() > ARGON2_MAX_T {
        return Err(format!("argon2id passes t={} is more than the {ARGON2_MAX_T} allowed", params.t_cost()));
    }
    Ok(PasswordHash::Argon2id(s.to_string()))
}

/// `<iterations>$<base64 salt>$<base64 hash>` (after `$7$`).
fn parse_mosquitto_pbkdf2(rest: &str) -> Result<PasswordHash, String> {
    const FORMAT: &str = "a Mosquitto hash is `$7$<iterations>$<base64 salt>$<base64 hash>`";
    let mut parts = rest.split('$');
    let (Some(iterations), Some(salt), Some(hash), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("{FORMAT}; this one has not got those parts"));
    };
    let iterations: u32 = iterations.parse().map_err(|_| format!("{FORMAT}; the iteration count is not a number"))?;
    if iterations == 0 || iterations > PBKDF2_MAX_ITERATIONS {
        return Err(format!("{FORMAT}; the iteration count must be 1 to {PBKDF2_MAX_ITERATIONS}"));
    }
    let salt = BASE64.decode(salt).map_err(|_| format!("{FORMAT}; the salt is not valid base64"))?;
    let hash = BASE64.decode(hash).map_err(|_| format!("{FORMAT}; the hash is not valid base64"))?;
    if salt.is_empty() {
        return Err(format!("{FORMAT}; the salt is empty"));
    }
    if !(16..=64).contains(&hash.len()) {
        return Err(format!("{FORMAT}; the hash is {} bytes, not 16 to 64 (SHA-512 gives 64)", hash.len()));
    }
    Ok(PasswordHash::Pbkdf2Sha512 { iterations, salt, hash })
}

/// base64 of a 4-byte salt followed by a `len`-byte digest.
fn parse_rabbit(b64: &str, len: usize, name: &str) -> Result<([u8; 4], Vec<u8>), String> {
    let bytes = BASE64.decode(b64).map_err(|_| format!("{name}: the part after the prefix is not valid base64"))?;
    if bytes.len() != 4 + len {
        return Err(format!(
            "{name}: decodes to {} bytes, not {} (a 4-byte salt and the {len}-byte digest); is the prefix right?",
            bytes.len(),
            4 + len
        ));
    }
    let mut salt = [0u8; 4];
    salt.copy_from_slice(&bytes[..4]);
    Ok((salt, bytes[4..].to_vec()))
}

/// A configured user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub hash: PasswordHash,
    /// RabbitMQ's user tags (`administrator`, `monitoring`, `management`, …): what the HTTP
    /// management API lets the user see and do. The protocols ignore them.
    pub tags: Vec<String>,
}

impl User {
    /// A user without tags.
    pub fn new(name: impl Into<String>, hash: PasswordHash) -> User {
        User { name: name.into(), hash, tags: Vec::new() }
    }
}

/// A configured user as the authenticator holds it: what a caller that caches logins checks a
/// cached answer against (the same `hash` allocation means the user was not replaced since).
#[derive(Debug, Clone)]
pub struct Account {
    pub hash: Arc<PasswordHash>,
    pub tags: Arc<[String]>,
}

/// An argon2id hash of a password nobody knows, with the parameters of
/// [`PasswordHash::argon2id`]: what a login with an unknown user name is checked against, so that
/// it costs what a wrong password costs.
pub(crate) const DUMMY_ARGON2ID: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$p9SK88tHuRI5dj6IHt1Chg$WtT9rdVBFc6k9P0PWYnog5e4rswn0e8JBhutj9TUqco";

fn dummy_hash() -> &'static PasswordHash {
    static DUMMY: OnceLock<PasswordHash> = OnceLock::new();
    DUMMY.get_or_init(|| PasswordHash::parse(DUMMY_ARGON2ID).expect("the dummy hash parses"))
}

/// Checks logins. Users can be replaced at run time (reload): logins in progress finish with the
/// users they started with.
///
/// Users come in two layers: the configuration's (`[[users]]`, replaced whole by a reload) and
/// the run-time ones (made through the management API, persisted by the broker,
/// [`crate::runtime`]). Logins see both merged; on a name in both, the configuration's wins.
pub struct Authenticator {
    users: ArcSwap<HashMap<String, Account>>,
    /// The two layers the merged `users` is made from: (configured, run-time).
    layers: std::sync::Mutex<(Vec<User>, Vec<User>)>,
    /// The checking threads, started with the first login that needs one.
    pool: OnceLock<pool::Pool>,
    workers: usize,
    /// Logins being checked or queued for a check.
    admitted: Arc<AtomicUsize>,
    /// [`MAX_CONCURRENT_VERIFICATIONS`] + [`MAX_WAITING_VERIFICATIONS`] (smaller in tests).
    max_admitted: usize,
    throttle: Arc<LoginThrottle>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("users", &self.user_count())
            .field("verifications", &self.admitted.load(Ordering::Relaxed))
            .field("throttled_sources", &self.throttle.len())
            .finish()
    }
}

impl Default for Authenticator {
    fn default() -> Authenticator {
        Authenticator::new(Vec::new())
    }
}

/// A login counted in [`Authenticator::admitted`] until dropped.
struct Admission(Arc<AtomicUsize>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Authenticator {
    pub fn new(users: Vec<User>) -> Authenticator {
        Authenticator::with_limits(users, MAX_CONCURRENT_VERIFICATIONS, MAX_WAITING_VERIFICATIONS)
    }

    fn with_limits(users: Vec<User>, concurrent: usize, waiting: usize) -> Authenticator {
        Authenticator {
            users: ArcSwap::from_pointee(index(users.clone())),
            layers: std::sync::Mutex::new((users, Vec::new())),
            pool: OnceLock::new(),
            workers: concurrent,
            admitted: Arc::new(AtomicUsize::new(0)),
            max_admitted: concurrent + waiting,
            throttle: Arc::new(LoginThrottle::new()),
        }
    }

    /// Replaces every configured user at once (a reload). Of two users with one name the last
    /// one counts. Run-time users stay.
    pub fn replace_users(&self, users: Vec<User>) {
        let mut layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        layers.0 = users;
        self.install(&layers);
    }

    /// Replaces the run-time users (those the management API made).
    pub fn replace_runtime_users(&self, users: Vec<User>) {
        let mut layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        layers.1 = users;
        self.install(&layers);
    }

    /// Whether the configuration names a user `name` (the API may not change it).
    pub fn is_configured(&self, name: &str) -> bool {
        self.layers.lock().unwrap_or_else(|e| e.into_inner()).0.iter().any(|u| u.name == name)
    }

    /// Every user in force (configured, then run-time ones the configuration does not shadow),
    /// with whether it is configured, sorted by name.
    pub fn users(&self) -> Vec<(User, bool)> {
        let layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        let mut by_name: std::collections::BTreeMap<&str, (User, bool)> = std::collections::BTreeMap::new();
        for u in &layers.1 {
            by_name.insert(&u.name, (u.clone(), false));
        }
        for u in &layers.0 {
            by_name.insert(&u.name, (u.clone(), true));
        }
        by_name.into_values().collect()
    }

    fn install(&self, layers: &(Vec<User>, Vec<User>)) {
        // Run-time users first, so that a configured user of the same name replaces its entry.
        self.users.store(Arc::new(index(layers.1.iter().chain(&layers.0).cloned().collect())));
    }

    pub fn user_count(&self) -> usize {
        self.users.load().len()
    }

    /// The configured user called `name`, as of now.
    pub fn account(&self, name: &str) -> Option<Account> {
        self.users.load().get(name).cloned()
    }

    /// Every configured user with its account, by name (what the management API lists).
    pub fn accounts(&self) -> Vec<(String, Account)> {
        let mut all: Vec<(String, Account)> = self.users.load().iter().map(|(n, a)| (n.clone(), a.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The failure scores of the addresses logins come from.
    pub fn throttle(&self) -> &LoginThrottle {
        &self.throttle
    }

    /// `username: None` = the client sent no credentials; `peer` is the client's address.
    /// Verification (argon2 is ~tens of ms of CPU) runs on the checking threads, at most
    /// [`MAX_CONCURRENT_VERIFICATIONS`] at once, with at most [`MAX_WAITING_VERIFICATIONS`]
    /// waiting — beyond that `Err(Busy)` at once — so a flood of bad logins cannot stall the
    /// async workers or queue without bound. An address whose checks keep failing is slowed
    /// down and then refused ([`AuthError::Throttled`], see [`throttle`]) before it takes a
    /// place in that queue. An unknown user name costs the same as a wrong password (verified
    /// against a fixed dummy argon2 hash) so names cannot be probed by timing.
    ///
    /// The rules: no user name → anonymous if `policy.anonymous`, else
    /// [`AuthError::NotAllowed`]; a configured user → its password is verified (a missing
    /// password never matches); `guest` / `guest` when no user is called `guest` and
    /// `policy.guest`; anything else [`AuthError::BadCredentials`].
    pub async fn login(
        &self,
        policy: &AuthPolicy,
        peer: IpAddr,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Identity, AuthError> {
        let Some(name) = username else {
            return if policy.anonymous {
                Ok(Identity::anonymous())
            } else {
                Err(AuthError::NotAllowed("this listener does not accept anonymous clients".into()))
            };
        };
        let known = self.users.load().get(name).map(|a| a.hash.clone());
        if known.is_none() && policy.guest && name == GUEST_USER && password == Some(GUEST_USER.as_bytes()) {
            return Ok(Identity { user: GUEST_USER.to_string(), anonymous: false });
        }
        // Without a password (or with an unknown name) the dummy hash is verified all the same.
        let target = match (known, password) {
            (Some(hash), Some(_)) => Some(hash),
            _ => None,
        };
        let real = target.is_some();
        if self.verify(Source::of(peer), target, password.unwrap_or_default().to_vec()).await? && real {
            Ok(Identity { user: name.to_string(), anonymous: false })
        } else {
            Err(AuthError::BadCredentials)
        }
    }

    /// Verifies `password` against `hash` (`None`: the dummy hash) on the checking threads,
    /// within the throttle of `source` and the pool's limits.
    async fn verify(
        &self,
        source: Source,
        hash: Option<Arc<PasswordHash>>,
        password: Vec<u8>,
    ) -> Result<bool, AuthError> {
        let ticket = loop {
            let turn = self.throttle.done();
            tokio::pin!(turn);
            turn.as_mut().enable();
            match self.throttle.admit(source, std::time::Instant::now()) {
                Admit::Go(ticket) => break ticket,
                Admit::Refuse(why) => return Err(AuthError::Throttled(why)),
                Admit::WaitUntil(at) => tokio::time::sleep_until(at.into()).await,
                Admit::WaitTurn => turn.await,
            }
        };
        let max = self.max_admitted;
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .map_err(|_| AuthError::Busy)?;
        let admission = Admission(self.admitted.clone());
        let (reply, answer) = tokio::sync::oneshot::channel();
        // The admission and the ticket live as long as the check, even if the login is dropped
        // meanwhile (a check already running still counts against the limits); one not started
        // yet is skipped, and records no failure.
        let after = Box::new(move |matched: Option<bool>| {
            drop(admission);
            match matched {
                Some(matched) => ticket.finish(!matched, std::time::Instant::now()),
                None => drop(ticket),
            }
        });
        self.pool.get_or_init(|| pool::Pool::start(self.workers)).submit(pool::Job { hash, password, reply, after });
        Ok(answer.await.unwrap_or(false))
    }
}

fn index(users: Vec<User>) -> HashMap<String, Account> {
    users.into_iter().map(|u| (u.name, Account { hash: Arc::new(u.hash), tags: u.tags.into() })).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Made with Python: `hashlib.pbkdf2_hmac('sha512', b"s3cret pass", bytes(range(1, 13)), 101)`,
    /// base64 — what `mosquitto_passwd` writes.
    const MOSQUITTO: &str =
        "$7$101$AQIDBAUGBwgJCgsM$STSCmE+fzbvU6dsOSP/YYMWBLb6TpCPpOg2l6B/cibzXpYwr89dDHWD70LZ6MP80Yb+qgVcLdO6pKMCAw7FYKw==";
    /// RabbitMQ's documented example for the password `test12` (salt `908dc60a`), computed again
    /// with Python: base64(salt ++ sha256(salt ++ b"test12")).
    const RABBIT_SHA256: &str = "rabbitmq-sha256:kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR";
    /// The same with SHA-512.
    const RABBIT_SHA512: &str =
        "rabbitmq-sha512:kI3GChuNuIYf8lRbCCxZjgjKwsY19ns6+uFO0zcXRBGA/XGJPYD8OWMy7EB8TaOmAzjP2azv84GbINYwX2cDWb4DHnc=";

    fn user(name: &str, password: &str) -> User {
        User::new(name, PasswordHash::parse(&PasswordHash::argon2id(password.as_bytes())).unwrap())
    }

    /// A new client address for each login, so the tests of the rules are not throttled.
    fn addr() -> IpAddr {
        static N: AtomicUsize = AtomicUsize::new(1);
        IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + N.fetch_add(1, Ordering::Relaxed) as u32))
    }

    const OPEN: AuthPolicy = AuthPolicy { anonymous: true, guest: true, cert_login: None };
    const CLOSED: AuthPolicy = AuthPolicy { anonymous: false, guest: false, cert_login: None };

    #[test]
    fn argon2id_round_trip() {
        let phc = PasswordHash::argon2id(b"correct horse");
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        let hash = PasswordHash::parse(&phc).unwrap();
        assert_eq!(hash.scheme(), "argon2id");
        assert!(hash.verify(b"correct horse"));
        assert!(!hash.verify(b"correct horsE"));
        assert!(!hash.verify(b""));
        assert_ne!(PasswordHash::argon2id(b"correct horse"), phc, "salts are random");
    }

    #[test]
    fn the_dummy_hash_is_an_argon2id_hash_with_the_default_parameters() {
        let dummy = dummy_hash();
        assert_eq!(dummy.scheme(), "argon2id");
        let PasswordHash::Argon2id(phc) = dummy else { unreachable!() };
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(!dummy.verify(b"guest") && !dummy.verify(b""));
    }

    #[test]
    fn mosquitto_pbkdf2_hashes_verify() {
        let hash = PasswordHash::parse(MOSQUITTO).unwrap();
        assert!(
            matches!(&hash, PasswordHash::Pbkdf2Sha512 { iterations: 101, salt, hash } if salt.len() == 12 && hash.len() == 64)
        );
        assert!(hash.verify(b"s3cret pass"));
        assert!(!hash.verify(b"s3cret pas"));
        assert!(!hash.verify(b""));
    }

    #[test]
    fn rabbitmq_hashes_verify() {
        let h256 = PasswordHash::parse(RABBIT_SHA256).unwrap();
        assert_eq!(h256.scheme(), "rabbitmq-sha256");
        assert!(h256.verify(b"test12"));
        assert!(!h256.verify(b"test13"));
        let h512 = PasswordHash::parse(RABBIT_SHA512).unwrap();
        assert_eq!(h512.scheme(), "rabbitmq-sha512");
        assert!(h512.verify(b"test12"));
        assert!(!h512.verify(b"test1"));
    }

    #[test]
    fn parse_errors_say_what_is_wrong_without_the_hash() {
        let argon_i = "$argon2i$v=19$m=16,t=2,p=1$c29tZXNhbHQ$UaKhKBPxy6Pdmy9cSW7R6A";
        let huge = "$argon2id$v=19$m=4194304,t=2,p=1$c29tZXNhbHQ$UaKhKBPxy6Pdmy9cSW7R6A";
        for (input, why) in [
            ("", "empty"),
            ("hunter2", "not a known hash format"),
            ("$argon2id$v=19$m=19456", "without its hash part"),
            ("$argon2id$v=19$m=x$$$", "not a valid argon2id PHC string"),
            (argon_i, "only argon2id"),
            (huge, "more than the 262144 KiB"),
            ("$7$101$AQID", "has not got those parts"),
            ("$7$many$AQID$AQID", "not a number"),
            ("$7$0$AQIDBAUGBwgJCgsM$AQID", "must be 1 to"),
            ("$7$101$!!!$AQID", "salt is not valid base64"),
            ("$7$101$AQIDBAUGBwgJCgsM$AQID", "the hash is 3 bytes"),
            ("$6$c2FsdA==$aGFzaA==", "too weak"),
            ("rabbitmq-sha256:%%%", "not valid base64"),
            ("rabbitmq-sha256:kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR/xY=", "decodes to 38 bytes"),
            (&RABBIT_SHA256.replace("256", "512"), "not 68"),
        ] {
            let err = PasswordHash::parse(input).expect_err(input);
            assert!(err.contains(why), "{input:?}: {err}");
            let secret_part = input.rsplit(['$', ':']).next().unwrap();
            if secret_part.len() > 4 {
                assert!(!err.contains(secret_part), "{input:?}: the error repeats the hash: {err}");
            }
        }
    }

    #[test]
    fn debug_does_not_show_the_hash() {
        let phc = PasswordHash::argon2id(b"pw");
        let u = User::new("alice", PasswordHash::parse(&phc).unwrap());
        let debug = format!("{u:?}");
        assert!(debug.contains("alice") && debug.contains("argon2id"), "{debug}");
        let tail = phc.rsplit('$').next().unwrap();
        assert!(!debug.contains(tail) && !debug.contains("m=19456"), "{debug}");
        let m = format!("{:?}", PasswordHash::parse(MOSQUITTO).unwrap());
        assert_eq!(m, "PasswordHash(mosquitto-pbkdf2-sha512)");
        assert!(!format!("{:?}", Authenticator::new(vec![u])).contains(tail));
    }

    #[tokio::test]
    async fn no_credentials_are_anonymous_where_the_listener_allows_it() {
        let auth = Authenticator::default();
        assert_eq!(
            auth.login(&OPEN, addr(), None, None).await,
            Ok(Identity { user: "anonymous".into(), anonymous: true })
        );
        assert_eq!(
            auth.login(&CLOSED, addr(), None, Some(b"pw")).await,
            Err(AuthError::NotAllowed("this listener does not accept anonymous clients".into()))
        );
    }

    #[tokio::test]
    async fn configured_users_log_in_with_their_password_only() {
        let auth = Authenticator::new(vec![user("alice", "wonder")]);
        assert_eq!(auth.user_count(), 1);
        let alice = Identity { user: "alice".into(), anonymous: false };
        assert_eq!(auth.login(&CLOSED, addr(), Some("alice"), Some(b"wonder")).await, Ok(alice.clone()));
        assert_eq!(auth.login(&OPEN, addr(), Some("alice"), Some(b"wander")).await, Err(AuthError::BadCredentials));
        assert_eq!(auth.login(&OPEN, addr(), Some("alice"), None).await, Err(AuthError::BadCredentials));
        assert_eq!(auth.login(&OPEN, addr(), Some("bob"), Some(b"wonder")).await, Err(AuthError::BadCredentials));
        // Migrated hashes log in the same way.
        let rabbit = User::new("svc", PasswordHash::parse(RABBIT_SHA256).unwrap());
        auth.replace_users(vec![rabbit]);
        assert_eq!(auth.user_count(), 1);
        assert_eq!(auth.login(&CLOSED, addr(), Some("alice"), Some(b"wonder")).await, Err(AuthError::BadCredentials));
        assert_eq!(auth.login(&CLOSED, addr(), Some("svc"), Some(b"test12")).await.unwrap().user, "svc");
    }

    #[tokio::test]
    async fn guest_only_where_the_policy_allows_it_and_no_user_is_called_guest() {
        let auth = Authenticator::default();
        let guest = Identity { user: "guest".into(), anonymous: false };
        let loopback = AuthPolicy { anonymous: false, guest: true, cert_login: None };
        assert_eq!(auth.login(&loopback, addr(), Some("guest"), Some(b"guest")).await, Ok(guest));
        assert_eq!(auth.login(&loopback, addr(), Some("guest"), Some(b"other")).await, Err(AuthError::BadCredentials));
        assert_eq!(auth.login(&loopback, addr(), Some("guest"), None).await, Err(AuthError::BadCredentials));
        let public = AuthPolicy { anonymous: true, guest: false, cert_login: None };
        assert_eq!(auth.login(&public, addr(), Some("guest"), Some(b"guest")).await, Err(AuthError::BadCredentials));
        // A configured guest has its own password, even on loopback.
        auth.replace_users(vec![user("guest", "s3cret")]);
        assert_eq!(auth.login(&loopback, addr(), Some("guest"), Some(b"guest")).await, Err(AuthError::BadCredentials));
        assert!(auth.login(&loopback, addr(), Some("guest"), Some(b"s3cret")).await.is_ok());
    }

    #[tokio::test]
    async fn run_time_users_survive_a_reload_and_the_configured_one_wins_a_clash() {
        let auth = Authenticator::new(vec![user("cfg", "one")]);
        auth.replace_runtime_users(vec![user("rt", "two"), user("cfg", "other")]);
        assert!(auth.login(&CLOSED, addr(), Some("rt"), Some(b"two")).await.is_ok());
        assert!(auth.login(&CLOSED, addr(), Some("cfg"), Some(b"one")).await.is_ok());
        assert_eq!(auth.login(&CLOSED, addr(), Some("cfg"), Some(b"other")).await, Err(AuthError::BadCredentials));
        assert!(auth.is_configured("cfg") && !auth.is_configured("rt"));
        let listed: Vec<(String, bool)> = auth.users().into_iter().map(|(u, c)| (u.name, c)).collect();
        assert_eq!(listed, vec![("cfg".to_string(), true), ("rt".to_string(), false)]);
        // A reload replaces the configured layer only.
        auth.replace_users(Vec::new());
        assert!(auth.login(&CLOSED, addr(), Some("rt"), Some(b"two")).await.is_ok());
        assert!(auth.login(&CLOSED, addr(), Some("cfg"), Some(b"other")).await.is_ok(), "unshadowed now");
        auth.replace_runtime_users(Vec::new());
        assert_eq!(auth.login(&CLOSED, addr(), Some("rt"), Some(b"two")).await, Err(AuthError::BadCredentials));
    }

    #[test]
    fn every_hash_format_is_stored_as_it_parses() {
        for s in [DUMMY_ARGON2ID, MOSQUITTO, RABBIT_SHA256, RABBIT_SHA512] {
            assert_eq!(PasswordHash::parse(s).unwrap().to_stored(), s);
        }
    }

    /// On the current-thread runtime every spawned login is first polled (and so admitted or
    /// turned away) before any verification can report back.
    #[tokio::test]
    async fn logins_past_the_waiting_limit_are_busy_at_once() {
        let auth = Arc::new(Authenticator::with_limits(vec![user("alice", "wonder")], 1, 2));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let auth = auth.clone();
            tasks.push(tokio::spawn(async move {
                let started = std::time::Instant::now();
                let r = auth.login(&CLOSED, addr(), Some("alice"), Some(b"wrong")).await;
                (r, started.elapsed())
            }));
        }
        let mut busy = 0;
        let mut bad = 0;
        for t in tasks {
            match t.await.unwrap() {
                (Err(AuthError::Busy), took) => {
                    busy += 1;
                    assert!(took < Duration::from_millis(50), "Busy must be answered at once, took {took:?}");
                }
                (Err(AuthError::BadCredentials), _) => bad += 1,
                other => panic!("{other:?}"),
            }
        }
        // One running and two waiting; every other login is turned away.
        assert_eq!((bad, busy), (3, 7));
        assert_eq!(auth.admitted.load(Ordering::Acquire), 0, "every admission is given back");
        assert!(auth.login(&CLOSED, addr(), Some("alice"), Some(b"wonder")).await.is_ok(), "the limit frees up");
    }

    #[tokio::test]
    async fn unknown_users_take_a_verification_slot_like_known_ones() {
        let auth = Arc::new(Authenticator::with_limits(vec![user("alice", "wonder")], 1, 0));
        let a = auth.clone();
        let known = tokio::spawn(async move { a.login(&CLOSED, addr(), Some("alice"), Some(b"wrong")).await });
        let a = auth.clone();
        let unknown = tokio::spawn(async move { a.login(&CLOSED, addr(), Some("mallory"), Some(b"x")).await });
        assert_eq!(known.await.unwrap(), Err(AuthError::BadCredentials));
        assert_eq!(unknown.await.unwrap(), Err(AuthError::Busy), "an unknown name is verified too");
        assert_eq!(auth.login(&CLOSED, addr(), Some("mallory"), Some(b"x")).await, Err(AuthError::BadCredentials));
    }

    #[tokio::test]
    async fn a_dropped_login_gives_its_place_back() {
        let auth = Authenticator::with_limits(vec![user("alice", "wonder")], 1, 0);
        let slow = auth.login(&CLOSED, addr(), Some("alice"), Some(b"wrong"));
        // Polled once (admitted, verifying), then dropped: the verification finishes on the pool
        // and then frees its slot.
        let _ = tokio::time::timeout(Duration::from_micros(1), slow).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while auth.admitted.load(Ordering::Acquire) != 0 {
            assert!(std::time::Instant::now() < deadline, "the admission was never given back");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(auth.login(&CLOSED, addr(), Some("alice"), Some(b"wonder")).await.is_ok());
    }

    #[tokio::test]
    async fn an_address_that_keeps_failing_is_refused_without_a_check_and_others_are_not() {
        let auth = Authenticator::with_limits(vec![user("alice", "wonder")], 1, 0);
        let attacker: IpAddr = "192.0.2.7".parse().unwrap();
        auth.throttle.record_failures(Source::of(attacker), throttle::REFUSE_AT, std::time::Instant::now());
        // The pool has room for one check only, and the refusal does not take it.
        let started = std::time::Instant::now();
        let r = auth.login(&CLOSED, attacker, Some("alice"), Some(b"wonder")).await;
        assert!(matches!(&r, Err(AuthError::Throttled(why)) if why.contains("192.0.2.7")), "{r:?}");
        assert!(started.elapsed() < Duration::from_millis(50), "refused at once");
        assert_eq!(auth.admitted.load(Ordering::Acquire), 0);
        let good: IpAddr = "192.0.2.8".parse().unwrap();
        assert!(auth.login(&CLOSED, good, Some("alice"), Some(b"wonder")).await.is_ok());
    }

    #[tokio::test]
    async fn failed_checks_count_against_their_address() {
        let auth = Authenticator::new(vec![user("alice", "wonder")]);
        let peer: IpAddr = "192.0.2.9".parse().unwrap();
        let source = Source::of(peer);
        assert_eq!(auth.login(&CLOSED, peer, Some("alice"), Some(b"wrong")).await, Err(AuthError::BadCredentials));
        assert_eq!(auth.login(&CLOSED, peer, Some("mallory"), Some(b"x")).await, Err(AuthError::BadCredentials));
        assert_eq!(auth.throttle.score(source, std::time::Instant::now()), 2);
        assert!(auth.login(&CLOSED, peer, Some("alice"), Some(b"wonder")).await.is_ok());
        assert_eq!(auth.throttle.score(source, std::time::Instant::now()), 2, "a success neither adds nor clears");
    }
}
