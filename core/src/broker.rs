//! The broker: its vhosts and its store.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use crate::auth::{Authenticator, User};
use crate::connections::Connections;
use crate::frontend::Shutdown;
use crate::message::{now_millis, ConnectionId, Millis};
use crate::permissions::{AccessPolicy, TopicPermissions, VhostPermissions};
use crate::policy::QueueUse;
use crate::runtime::RuntimeDefinitions;
use crate::size::ByteSize;
use crate::store::{Commit, SessionRecord, Store, StoreError, StoreOp};
use crate::timer::Timer;
use crate::vhost::VHost;

/// The name of the vhost that always exists.
pub const DEFAULT_VHOST: &str = "/";

/// How often housekeeping checks the memory and disk alarms. Queue deadlines (message TTL,
/// `x-expires`) do not wait for it: they arm the broker's [`Timer`], which wakes housekeeping
/// at the deadline.
const HOUSEKEEPING_PERIOD: Duration = Duration::from_secs(1);

/// The memory alarm: when what the messages held in queues cost in memory (bodies plus
/// [`crate::queue::MESSAGE_MEMORY`] each) passes the high watermark, the
/// alarm goes up and the frontends stop reading from publishing connections (AMQP clients are
/// told with connection.blocked) until consumers bring the total back under it — RabbitMQ's
/// memory alarm, measured on what actually grows with a backlog.
#[derive(Debug)]
pub struct MemoryAlarm {
    /// Bytes; 0 turns the alarm off.
    limit: AtomicU64,
    /// What queued messages cost at the last check.
    used: AtomicU64,
    raised: watch::Sender<bool>,
}

impl MemoryAlarm {
    fn new() -> MemoryAlarm {
        MemoryAlarm { limit: AtomicU64::new(0), used: AtomicU64::new(0), raised: watch::Sender::new(false) }
    }
    /// Whether the alarm is up now, and a receiver that sees it change.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.raised.subscribe()
    }
    pub fn is_raised(&self) -> bool {
        *self.raised.borrow()
    }
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
    fn update(&self, used: u64) {
        self.used.store(used, Ordering::Relaxed);
        let limit = self.limit();
        let raise = limit > 0 && used > limit;
        self.raised.send_if_modified(|r| {
            if *r != raise {
                if raise {
                    tracing::warn!(
                        used,
                        limit,
                        "memory alarm: queued messages ({}) above the high watermark ({}); publishers blocked",
                        ByteSize(used),
                        ByteSize(limit)
                    );
                } else {
                    tracing::info!(
                        used,
                        limit,
                        "memory alarm cleared ({} queued, watermark {}); publishers unblocked",
                        ByteSize(used),
                        ByteSize(limit)
                    );
                }
                *r = raise;
                true
            } else {
                false
            }
        });
    }
}

/// A probe of the free space where the store keeps its file, in bytes (`None`: unknown).
pub type FreeSpaceProbe = Box<dyn Fn() -> Option<u64> + Send + Sync>;

/// The disk alarm: raised when the free space where the store lives falls under the
/// configured minimum, or while store commits fail (a full or failing disk). While it is up,
/// new persistent publishes are refused: AMQP publishers are blocked (connection.blocked), MQTT
/// 5.0 publishers get PUBACK/PUBREC 0x97, MQTT 3.1.1 publishers are not read. Consumers keep
/// being served (acks free space), and publishing resumes when the alarm clears.
pub struct DiskAlarm {
    /// Bytes of free space under which the alarm goes up; 0 turns the free-space check off.
    min_free: AtomicU64,
    /// Free bytes at the last check (`u64::MAX` when unknown).
    free: AtomicU64,
    probe: std::sync::OnceLock<FreeSpaceProbe>,
    raised: watch::Sender<bool>,
}

impl fmt::Debug for DiskAlarm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskAlarm")
            .field("min_free", &self.min_free)
            .field("free", &self.free)
            .field("raised", &self.is_raised())
            .finish()
    }
}

impl DiskAlarm {
    fn new() -> DiskAlarm {
        DiskAlarm {
            min_free: AtomicU64::new(0),
            free: AtomicU64::new(u64::MAX),
            probe: std::sync::OnceLock::new(),
            raised: watch::Sender::new(false),
        }
    }
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.raised.subscribe()
    }
    pub fn is_raised(&self) -> bool {
        *self.raised.borrow()
    }
    /// Free bytes at the last check (`u64::MAX` when unknown).
    pub fn free(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }
    /// Sets the free-space probe (once) and the minimum free space in bytes (0 = off).
    pub fn watch_free_space(&self, min_free: u64, probe: FreeSpaceProbe) {
        self.min_free.store(min_free, Ordering::Relaxed);
        let _ = self.probe.set(probe);
    }
    fn update(&self, store_failing: bool) {
        let min = self.min_free.load(Ordering::Relaxed);
        let free = self.probe.get().and_then(|p| p()).unwrap_or(u64::MAX);
        self.free.store(free, Ordering::Relaxed);
        let low = min > 0 && free < min;
        let raise = low || store_failing;
        self.raised.send_if_modified(|r| {
            if *r == raise {
                return false;
            }
            if raise {
                tracing::warn!(
                    free,
                    min_free = min,
                    store_failing,
                    "disk alarm ({} free, limit {}): persistent publishes refused until space returns",
                    ByteSize(free),
                    ByteSize(min)
                );
            } else {
                tracing::info!(
                    free,
                    "disk alarm cleared ({} free); persistent publishes accepted again",
                    ByteSize(free)
                );
            }
            *r = raise;
            true
        });
    }
}

/// The shared state every connection holds a handle to.
#[derive(Debug)]
pub struct Broker {
    vhosts: RwLock<HashMap<String, Arc<VHost>>>,
    store: Arc<dyn Store>,
    memory: MemoryAlarm,
    disk: DiskAlarm,
    /// Either alarm is up: publishing connections are held back.
    publishers_blocked: watch::Sender<bool>,
    /// Frontend sessions read back by [`Broker::recover`], until the frontend takes them.
    recovered_sessions: std::sync::Mutex<Vec<SessionRecord>>,
    /// The users and the login check; empty until the server sets them.
    auth: Authenticator,
    /// Permissions, topic permissions and the frontends' topic policy; swapped whole on a
    /// reload. The vhosts share it: the default exchange asks which queues are reserved.
    access: Arc<arc_swap::ArcSwap<AccessPolicy>>,
    /// Bumped after each swap of `access` (see `VHost::with_access`).
    access_epoch: Arc<AtomicU64>,
    /// The policy the server set (the configuration's), before the run-time permissions are
    /// merged in.
    configured_access: std::sync::Mutex<AccessPolicy>,
    /// Users, permissions and other definitions made at run time ([`crate::runtime`]).
    /// Lock order: this, then `configured_access`, then the authenticator's layers.
    runtime: std::sync::Mutex<RuntimeDefinitions>,
    /// Queue deadlines of every vhost (see [`crate::timer`]).
    timer: Arc<Timer>,
    /// Every live connection (see [`crate::connections`]).
    connections: Arc<Connections>,
}

impl Broker {
    /// A broker with the default vhost `/` and nothing else (ignores what the store holds).
    pub fn new(store: Arc<dyn Store>) -> Arc<Broker> {
        let b = Broker {
            vhosts: RwLock::new(HashMap::new()),
            store,
            memory: MemoryAlarm::new(),
            disk: DiskAlarm::new(),
            publishers_blocked: watch::Sender::new(false),
            recovered_sessions: Default::default(),
            auth: Authenticator::default(),
            access: Arc::new(arc_swap::ArcSwap::from_pointee(AccessPolicy::default())),
            access_epoch: Arc::new(AtomicU64::new(0)),
            configured_access: Default::default(),
            runtime: Default::default(),
            timer: Arc::new(Timer::new()),
            connections: Connections::new(),
        };
        b.add_vhost(DEFAULT_VHOST);
        Arc::new(b)
    }

    /// A broker rebuilt from what `store` holds: vhosts, durable exchanges, queues (with their
    /// persistent messages), bindings and retained messages. Frontend sessions wait in
    /// [`Broker::take_recovered_sessions`]. `now` is the time of the restart: a message's TTL
    /// counts from its publish before it, so one that ran out while the broker was down goes at
    /// the first expiry.
    pub fn recover(store: Arc<dyn Store>, now: Millis) -> Result<Arc<Broker>, StoreError> {
        let started = std::time::Instant::now();
        let mut snapshot = store.recover()?;
        let read = started.elapsed();
        let messages: usize = snapshot.messages.values().map(Vec::len).sum::<usize>()
            + snapshot.tails.values().map(|t| t.count as usize).sum::<usize>();
        let (queues, sessions, retained) = (snapshot.queues.len(), snapshot.sessions.len(), snapshot.retained.len());
        let b = Broker {
            vhosts: RwLock::new(HashMap::new()),
            store,
            memory: MemoryAlarm::new(),
            disk: DiskAlarm::new(),
            publishers_blocked: watch::Sender::new(false),
            recovered_sessions: std::sync::Mutex::new(std::mem::take(&mut snapshot.sessions)),
            auth: Authenticator::default(),
            access: Arc::new(arc_swap::ArcSwap::from_pointee(AccessPolicy::default())),
            access_epoch: Arc::new(AtomicU64::new(0)),
            configured_access: Default::default(),
            runtime: std::sync::Mutex::new(RuntimeDefinitions::restore(std::mem::take(&mut snapshot.settings))),
            timer: Arc::new(Timer::new()),
            connections: Connections::new(),
        };
        b.install_runtime(&b.runtime());
        b.add_vhost(DEFAULT_VHOST);
        for v in &snapshot.vhosts {
            b.add_vhost(v);
        }
        for v in b.vhosts.read().unwrap_or_else(|e| e.into_inner()).values() {
            v.restore(&snapshot, now);
        }
        tracing::info!(
            queues,
            messages,
            retained,
            sessions,
            read_ms = read.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "recovered the store"
        );
        Ok(Arc::new(b))
    }

    /// The stored sessions of `filter`'s choosing, taken out (a frontend calls this once, at
    /// start-up, for the sessions it encoded).
    pub fn take_recovered_sessions(&self, filter: impl Fn(&SessionRecord) -> bool) -> Vec<SessionRecord> {
        let mut all = self.recovered_sessions.lock().unwrap_or_else(|e| e.into_inner());
        let (taken, kept) = std::mem::take(&mut *all).into_iter().partition(|r| filter(r));
        *all = kept;
        taken
    }

    /// The vhost with this name, if it exists.
    pub fn vhost(&self, name: &str) -> Option<Arc<VHost>> {
        self.vhosts.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    /// Creates a vhost (idempotent) and returns it. New vhosts are stored.
    pub fn add_vhost(&self, name: &str) -> Arc<VHost> {
        let mut map = self.vhosts.write().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = map.get(name) {
            return v.clone();
        }
        let v = Arc::new(
            VHost::with_timer(name, self.store.clone(), self.timer.clone())
                .with_access(self.access.clone(), self.access_epoch.clone()),
        );
        v.attach();
        map.insert(name.to_string(), v.clone());
        drop(map);
        self.store.submit(vec![StoreOp::PutVhost(name.to_string())]);
        v
    }

    /// Deletes a vhost and everything in it. The default vhost cannot be deleted.
    pub fn delete_vhost(&self, name: &str) -> bool {
        if name == DEFAULT_VHOST {
            return false;
        }
        let removed = self.vhosts.write().unwrap_or_else(|e| e.into_inner()).remove(name);
        if removed.is_some() {
            self.store.submit(vec![StoreOp::DeleteVhost(name.to_string())]);
        }
        removed.is_some()
    }

    pub fn vhost_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.vhosts.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        v.sort();
        v
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// A connection closed: its exclusive queues go.
    pub fn connection_closed(&self, connection: ConnectionId, now: Millis) {
        let all: Vec<Arc<VHost>> = self.vhosts.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for v in all {
            v.connection_closed(connection, now);
        }
    }

    /// The users and the login check (users are set, and replaced on reload, by the server).
    pub fn auth(&self) -> &Authenticator {
        &self.auth
    }

    /// The authorization policy in force (connections resolve a
    /// [`Grant`](crate::permissions::Grant) from it and notice when it is replaced).
    pub fn access(&self) -> Arc<AccessPolicy> {
        self.access.load_full()
    }

    /// Is `policy` the one in force? (Cheaper than [`Broker::access`]: no reference count.)
    pub fn access_is(&self, policy: &Arc<AccessPolicy>) -> bool {
        Arc::ptr_eq(&self.access.load(), policy)
    }

    /// Replaces the authorization policy (at start-up and on a reload), with the frontends'
    /// [`TopicPolicy`](crate::policy::TopicPolicy) in it. The run-time permissions
    /// ([`Broker::put_runtime`]) are merged in; on a (user, vhost) both name, the policy's
    /// entry wins.
    pub fn set_access(&self, policy: AccessPolicy) {
        let runtime = self.runtime();
        *self.configured_access.lock().unwrap_or_else(|e| e.into_inner()) = policy;
        self.install_runtime(&runtime);
    }

    // ----- run-time definitions ([`crate::runtime`]) -------------------------------------------

    fn runtime(&self) -> std::sync::MutexGuard<'_, RuntimeDefinitions> {
        self.runtime.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands the run-time layer to the authenticator and merges its permissions into the
    /// configured policy. Called with the run-time lock held, so installs happen in the order
    /// of the changes.
    fn install_runtime(&self, runtime: &RuntimeDefinitions) {
        self.auth.replace_runtime_users(runtime.users.values().cloned().collect());
        let mut policy = self.configured_access.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let extra: Vec<VhostPermissions> = runtime
            .permissions
            .values()
            .filter(|p| !policy.permissions.iter().any(|c| c.user == p.user && c.vhost == p.vhost))
            .cloned()
            .collect();
        policy.permissions.extend(extra);
        let topics: Vec<TopicPermissions> = runtime
            .topic_permissions
            .values()
            .filter(|t| {
                !policy
                    .topic_permissions
                    .iter()
                    .any(|c| c.user == t.user && c.vhost == t.vhost && c.exchange == t.exchange)
            })
            .cloned()
            .collect();
        policy.topic_permissions.extend(topics);
        self.access.store(Arc::new(policy));
        self.access_epoch.fetch_add(1, Ordering::Release);
    }

    /// The run-time users, by name.
    pub fn runtime_users(&self) -> Vec<User> {
        self.runtime().users.values().cloned().collect()
    }

    /// The run-time permissions, by vhost and user.
    pub fn runtime_permissions(&self) -> Vec<VhostPermissions> {
        self.runtime().permissions.values().cloned().collect()
    }

    /// The run-time topic permissions, by vhost, user and exchange.
    pub fn runtime_topic_permissions(&self) -> Vec<TopicPermissions> {
        self.runtime().topic_permissions.values().cloned().collect()
    }

    /// Whether the configuration gives `user` a topic permission entry on `vhost` for
    /// `exchange` (it wins over a run-time one).
    pub fn topic_permission_is_configured(&self, vhost: &str, user: &str, exchange: &str) -> bool {
        let policy = self.configured_access.lock().unwrap_or_else(|e| e.into_inner());
        policy.topic_permissions.iter().any(|t| t.user == user && t.vhost == vhost && t.exchange == exchange)
    }

    /// Adds or replaces a run-time topic permission (the templates validated by the caller), in
    /// force at once and durable when the returned commit resolves.
    pub fn put_runtime_topic_permission(&self, t: TopicPermissions) -> Commit {
        let mut runtime = self.runtime();
        let op = StoreOp::PutSetting {
            key: crate::runtime::topic_permission_key(&t.vhost, &t.user, &t.exchange),
            value: crate::runtime::encode_topic_permission(&t),
        };
        runtime.topic_permissions.insert((t.vhost.clone(), t.user.clone(), t.exchange.clone()), t);
        self.install_runtime(&runtime);
        self.store.submit(vec![op])
    }

    /// Deletes the run-time topic permissions of `user` on `vhost` (for every exchange, as
    /// RabbitMQ's `DELETE /api/topic-permissions/{vhost}/{user}`). `None`: there were none.
    pub fn delete_runtime_topic_permissions(&self, vhost: &str, user: &str) -> Option<Commit> {
        let mut runtime = self.runtime();
        let ops = Self::take_topic_permissions(&mut runtime, |v, u| v == vhost && u == user);
        if ops.is_empty() {
            return None;
        }
        self.install_runtime(&runtime);
        Some(self.store.submit(ops))
    }

    /// Removes the run-time topic permissions `which` names; the store operations that delete
    /// them.
    fn take_topic_permissions(runtime: &mut RuntimeDefinitions, which: impl Fn(&str, &str) -> bool) -> Vec<StoreOp> {
        let gone: Vec<(String, String, String)> =
            runtime.topic_permissions.keys().filter(|(v, u, _)| which(v, u)).cloned().collect();
        gone.into_iter()
            .map(|k| {
                runtime.topic_permissions.remove(&k);
                StoreOp::DeleteSetting { key: crate::runtime::topic_permission_key(&k.0, &k.1, &k.2) }
            })
            .collect()
    }

    /// Whether the configuration gives `user` a permission entry on `vhost`.
    pub fn permission_is_configured(&self, vhost: &str, user: &str) -> bool {
        let policy = self.configured_access.lock().unwrap_or_else(|e| e.into_inner());
        policy.permissions.iter().any(|p| p.user == user && p.vhost == vhost)
    }

    /// Adds or replaces run-time users and permissions, in force at once and durable when the
    /// returned commit resolves (one store batch).
    pub fn put_runtime(&self, users: Vec<User>, permissions: Vec<VhostPermissions>) -> Commit {
        let mut runtime = self.runtime();
        let mut ops = Vec::with_capacity(users.len() + permissions.len());
        for u in users {
            ops.push(StoreOp::PutSetting {
                key: crate::runtime::user_key(&u.name),
                value: crate::runtime::encode_user(&u),
            });
            runtime.users.insert(u.name.clone(), u);
        }
        for p in permissions {
            ops.push(StoreOp::PutSetting {
                key: crate::runtime::permission_key(&p.vhost, &p.user),
                value: crate::runtime::encode_permission(&p),
            });
            runtime.permissions.insert((p.vhost.clone(), p.user.clone()), p);
        }
        self.install_runtime(&runtime);
        self.store.submit(ops)
    }

    /// Deletes a run-time user and its run-time permissions (as RabbitMQ deletes a user's
    /// permissions with it). `None`: there is no such run-time user.
    pub fn delete_runtime_user(&self, name: &str) -> Option<Commit> {
        let mut runtime = self.runtime();
        runtime.users.remove(name)?;
        let mut ops = vec![StoreOp::DeleteSetting { key: crate::runtime::user_key(name) }];
        let gone: Vec<(String, String)> = runtime.permissions.keys().filter(|(_, u)| u == name).cloned().collect();
        for (vhost, user) in gone {
            ops.push(StoreOp::DeleteSetting { key: crate::runtime::permission_key(&vhost, &user) });
            runtime.permissions.remove(&(vhost, user));
        }
        ops.extend(Self::take_topic_permissions(&mut runtime, |_, u| u == name));
        self.install_runtime(&runtime);
        Some(self.store.submit(ops))
    }

    /// Deletes a run-time permission. `None`: there is no such run-time permission.
    pub fn delete_runtime_permission(&self, vhost: &str, user: &str) -> Option<Commit> {
        let mut runtime = self.runtime();
        runtime.permissions.remove(&(vhost.to_string(), user.to_string()))?;
        self.install_runtime(&runtime);
        Some(self.store.submit(vec![StoreOp::DeleteSetting { key: crate::runtime::permission_key(vhost, user) }]))
    }

    /// Other services' run-time definitions whose key starts with `prefix`, by key.
    pub fn settings(&self, prefix: &str) -> Vec<(String, Bytes)> {
        self.runtime()
            .settings
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Stores (`Some`) or deletes (`None`) another service's run-time definition under `key`
    /// (which must not start with the prefixes of [`crate::runtime`]).
    pub fn put_setting(&self, key: &str, value: Option<Bytes>) -> Commit {
        debug_assert!(
            !key.starts_with(crate::runtime::USER_PREFIX)
                && !key.starts_with(crate::runtime::PERMISSION_PREFIX)
                && !key.starts_with(crate::runtime::TOPIC_PERMISSION_PREFIX)
        );
        let mut runtime = self.runtime();
        let op = match value {
            Some(value) => {
                runtime.settings.insert(key.to_string(), value.clone());
                StoreOp::PutSetting { key: key.to_string(), value }
            }
            None => {
                runtime.settings.remove(key);
                StoreOp::DeleteSetting { key: key.to_string() }
            }
        };
        self.store.submit(vec![op])
    }

    /// Why another protocol's client may not `what` the queue `name` of `vhost`: it is one a
    /// frontend keeps for its own clients (`None`: it may). Cheap when it is not (no
    /// allocation, no reference count): asked on every publish to the default exchange.
    pub fn reserved_queue_refusal(&self, vhost: &str, name: &[u8], what: QueueUse) -> Option<String> {
        self.access.load().reserved_queue_refusal(vhost, name, what)
    }

    /// The memory alarm.
    pub fn memory(&self) -> &MemoryAlarm {
        &self.memory
    }

    /// The disk alarm.
    pub fn disk(&self) -> &DiskAlarm {
        &self.disk
    }

    /// `true` while the memory or the disk alarm is up: frontends stop reading from
    /// connections that publish (AMQP tells them with connection.blocked).
    pub fn publishers_blocked(&self) -> watch::Receiver<bool> {
        self.publishers_blocked.subscribe()
    }

    /// Sets the memory high watermark in bytes of what queued messages cost (0 = off).
    pub fn set_memory_limit(&self, bytes: u64) {
        self.memory.limit.store(bytes, Ordering::Relaxed);
    }

    /// Every live connection: what management and metrics list, and where a connection is
    /// closed from outside.
    pub fn connections(&self) -> &Arc<Connections> {
        &self.connections
    }

    /// The timer the queues' deadlines arm.
    pub fn timer(&self) -> &Arc<Timer> {
        &self.timer
    }

    /// Expires messages and idle queues in every vhost; returns the earliest next deadline.
    pub fn expire(&self, now: Millis) -> Option<Millis> {
        let all: Vec<Arc<VHost>> = self.vhosts.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        all.iter().filter_map(|v| v.tick(now)).min()
    }

    /// Expires messages and idle queues in every vhost, checks the memory and disk alarms;
    /// returns the earliest next deadline.
    pub fn tick(&self, now: Millis) -> Option<Millis> {
        let next = self.expire(now);
        let all: Vec<Arc<VHost>> = self.vhosts.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        self.memory.update(all.iter().map(|v| v.queued_memory()).sum());
        let failing = self.store.is_failing();
        if failing {
            // Nothing persistent is submitted while the alarm is up, so a small idempotent write
            // tells when the disk takes writes again.
            self.store.submit(vec![StoreOp::PutVhost(DEFAULT_VHOST.to_string())]);
        }
        self.disk.update(failing);
        let blocked = self.memory.is_raised() || self.disk.is_raised();
        self.publishers_blocked.send_if_modified(|b| std::mem::replace(b, blocked) != blocked);
        next
    }

    /// Runs until shutdown: [`Broker::expire`] at the earliest queue deadline (woken by the
    /// [`Timer`] when a queue reports an earlier one), and the whole [`Broker::tick`] (alarms
    /// too) every [`HOUSEKEEPING_PERIOD`].
    pub async fn run_housekeeping(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut full_at = tokio::time::Instant::now();
        loop {
            // Before asking the queues, so that a deadline armed meanwhile is kept.
            self.timer.start_round();
            let now = now_millis();
            let next = if tokio::time::Instant::now() >= full_at {
                full_at = tokio::time::Instant::now() + HOUSEKEEPING_PERIOD;
                self.tick(now)
            } else {
                self.expire(now)
            };
            self.timer.end_round(next);
            let until_full = full_at.saturating_duration_since(tokio::time::Instant::now());
            let wait = self
                .timer
                .next()
                .map_or(until_full, |d| Duration::from_millis(d.saturating_sub(now_millis())).min(until_full));
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = self.timer.woken() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use crate::queue::QueueOptions;
    use crate::store::MemoryStore;
    use crate::vhost::QueueDeclare;
    use bytes::Bytes;

    fn declare(v: &VHost, name: &str) {
        let decl = QueueDeclare {
            name: name.into(),
            passive: false,
            options: QueueOptions::default(),
            connection: ConnectionId(1),
        };
        v.declare_queue(decl, 0).unwrap();
    }

    #[test]
    fn the_memory_alarm_follows_what_queued_messages_cost() {
        let b = Broker::new(Arc::new(MemoryStore::new()));
        let one = crate::queue::MESSAGE_MEMORY + 60;
        b.set_memory_limit(one + 1);
        let mut alarm = b.memory().subscribe();
        let v = b.vhost("/").unwrap();
        declare(&v, "q");
        v.publish(&"".into(), Message::new("", "q", Bytes::from(vec![0u8; 60])), 0).unwrap();
        b.tick(0);
        assert!(!b.memory().is_raised());
        assert_eq!(b.memory().used(), one);
        v.publish(&"".into(), Message::new("", "q", Bytes::from(vec![0u8; 60])), 0).unwrap();
        b.tick(0);
        assert!(b.memory().is_raised() && alarm.has_changed().unwrap());
        assert_eq!(b.memory().used(), 2 * one);
        alarm.mark_unchanged();
        v.purge_queue(&"q".into(), ConnectionId(1), 0).unwrap();
        b.tick(0);
        assert!(!b.memory().is_raised() && alarm.has_changed().unwrap());
    }

    #[test]
    fn tiny_messages_raise_the_memory_alarm_by_their_count() {
        // 2 M empty bodies once counted as 0 bytes, while the broker held ~1.3 GB for them.
        let b = Broker::new(Arc::new(MemoryStore::new()));
        b.set_memory_limit(1_000 * crate::queue::MESSAGE_MEMORY);
        let v = b.vhost("/").unwrap();
        declare(&v, "q");
        for _ in 0..1_000 {
            v.publish(&"".into(), Message::new("", "q", Bytes::new()), 0).unwrap();
        }
        b.tick(0);
        assert!(!b.memory().is_raised());
        v.publish(&"".into(), Message::new("", "q", Bytes::new()), 0).unwrap();
        b.tick(0);
        assert!(b.memory().is_raised(), "1,001 empty messages are over a limit of 1,000 messages' cost");
    }

    #[test]
    fn unacked_messages_count_until_they_are_acknowledged() {
        let b = Broker::new(Arc::new(MemoryStore::new()));
        let v = b.vhost("/").unwrap();
        declare(&v, "q");
        let q = v.queue("q").unwrap();
        v.publish(&"".into(), Message::new("", "q", Bytes::from(vec![0u8; 10])), 0).unwrap();
        let (got, _) = q.get(crate::queue::OwnerId(7), false, 0);
        let (delivery, _) = got.expect("one ready");
        let stats = q.stats();
        assert_eq!((stats.ready, stats.unacked, stats.unacked_bytes), (0, 1, 10));
        b.tick(0);
        assert_eq!(b.memory().used(), crate::queue::MESSAGE_MEMORY + 10);
        q.ack(delivery.seq, 0).unwrap();
        assert_eq!(q.stats().unacked_bytes, 0);
        b.tick(0);
        assert_eq!(b.memory().used(), 0);
    }

    #[test]
    fn a_queue_deadline_arms_the_broker_timer_and_expire_meets_it() {
        let b = Broker::new(Arc::new(MemoryStore::new()));
        let v = b.vhost("/").unwrap();
        let ttl = crate::vhost::arguments(&[("x-message-ttl", crate::FieldValue::I32(100))]);
        let options = QueueOptions { arguments: ttl, ..QueueOptions::default() };
        let decl = QueueDeclare { name: "q".into(), passive: false, options, connection: ConnectionId(1) };
        v.declare_queue(decl, 0).unwrap();
        b.timer().start_round();
        b.timer().end_round(b.expire(0));
        assert_eq!(b.timer().next(), None, "an empty queue has no deadline");
        v.publish(&"".into(), Message::new("", "q", Bytes::from_static(b"m")), 1_000).unwrap();
        assert_eq!(b.timer().next(), Some(1_100), "the publish armed the timer for the head's TTL");
        b.timer().start_round();
        assert_eq!(b.expire(1_099), Some(1_100));
        assert_eq!(v.queue("q").unwrap().stats().ready, 1);
        assert_eq!(b.expire(1_100), None);
        assert_eq!(v.queue("q").unwrap().stats().ready, 0, "expired at its deadline");
    }

    #[test]
    fn a_zero_limit_never_raises_the_alarm() {
        let b = Broker::new(Arc::new(MemoryStore::new()));
        b.memory().update(u64::MAX);
        assert!(!b.memory().is_raised());
    }
}
