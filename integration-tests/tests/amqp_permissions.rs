//! AMQP authorization as RabbitMQ does it, through lapin and raw frames: vhost permissions
//! (`[[permissions]]`: configure / write / read regexes per user and vhost, unanchored searches,
//! `""` granting nothing) checked on every AMQP method that touches a resource, with RabbitMQ's
//! method-to-permission table (alternate and dead-letter exchanges, server-named queues, the
//! default exchange checked as `amq.default`, passive declares unchecked); access to a vhost
//! refused at connection.open (530); topic permissions (`[[topic_permissions]]`, `{username}` /
//! `{vhost}`) on routing keys and binding keys of topic exchanges; the MQTT `[[acl]]` applied to
//! AMQP users on the MQTT exchange; and reloads that open connections see at their next
//! operation. Every refusal is checked for its code and RabbitMQ's exact text, and every denial
//! next to the neighbouring grant that works.

use std::sync::OnceLock;

use ferry_amqp::codec::{
    BasicQos, ChannelClose, ChannelCloseOk, ConnectionClose, ConnectionCloseOk, ConnectionTuneOk, Method,
};
use ferry_core::auth::PasswordHash;
use ferry_integration_tests::amqp::{args, lapin_uri, plain_start_ok, RawClient, AMQP_LISTENER};
use ferry_integration_tests::cross::{consume, next_delivery, no_delivery};
use ferry_integration_tests::mqtt::MQTT_LISTENER;
use ferry_integration_tests::{within, write_config, TestServer};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    ExchangeUnbindOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, ExchangeKind};

// ----- configuration -----------------------------------------------------------------------------

/// Every user's password.
const PASSWORD: &str = "pw";

/// The users every test configures; `bob` never gets a `[[permissions]]` entry for `/`.
const USERS: &[&str] = &["admin", "alice", "bob", "carol", "dave", "una", "wendy", "tina"];

/// RabbitMQ-style permissions for `/` (TOML literal strings: the regexes as written).
const PERMISSIONS: &str = r#"
[[permissions]]
user = "admin"
configure = ".*"
write = ".*"
read = ".*"

# RabbitMQ's "own prefix" setup, plus the default exchange for writing.
[[permissions]]
user = "alice"
vhost = "/"
configure = '^alice\.'
write = '^(alice\.|amq\.default$)'
read = '^alice\.'

# Like alice, but without the default exchange.
[[permissions]]
user = "carol"
configure = '^carol\.'
write = '^carol\.'
read = '^carol\.'

# May declare server-named queues.
[[permissions]]
user = "dave"
configure = '^(dave\.|amq\.gen)'
write = '^dave\.'
read = '^dave\.'

# Unanchored configure; "" grants nothing.
[[permissions]]
user = "una"
configure = 'q'
write = ''
read = ''

# Everything but read.
[[permissions]]
user = "wendy"
configure = '.*'
write = '.*'
read = ''

[[permissions]]
user = "tina"
configure = '^tina\.'
write = '^(tina\.|amq\.topic$)'
read = '^(tina\.|amq\.topic$)'
"#;

/// One argon2id hash of [`PASSWORD`], computed once for all users and tests.
fn password_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| PasswordHash::argon2id(PASSWORD.as_bytes()))
}

fn users_toml() -> String {
    USERS
        .iter()
        .map(|name| format!("[[users]]\nname = \"{name}\"\npassword_hash = \"{}\"\n", password_hash()))
        .collect()
}

/// The users, then `tables` (permissions, topic permissions, ACL, listeners with their keys),
/// then one AMQP listener.
fn config(tables: &str) -> String {
    format!("{}{tables}\n{AMQP_LISTENER}", users_toml())
}

/// A server with the built-in frontends (as the `ferry` binary has) on [`config`]`(tables)`.
async fn start(tables: &str) -> TestServer {
    let frontends = ferry_server::frontends::builtin(&Default::default());
    TestServer::start(&config(tables), &frontends).await
}

/// Reloads the server with [`config`]`(tables)`, as SIGHUP does.
fn reload(s: &TestServer, tables: &str) {
    s.server.reload(&write_config(s.dir.path(), &config(tables))).expect("reload");
}

// ----- lapin ---------------------------------------------------------------------------------------

fn uri(s: &TestServer, user: &str, vhost: &str) -> String {
    let vhost = if vhost == "/" { "%2f" } else { vhost };
    format!("amqp://{user}:{PASSWORD}@{}/{vhost}", s.amqp_addr())
}

/// A lapin connection as `user` to vhost `/`.
async fn login(s: &TestServer, user: &str) -> lapin::Connection {
    lapin_uri(&uri(s, user, "/")).await
}

async fn channel(conn: &lapin::Connection) -> Channel {
    within("channel.open", conn.create_channel()).await.expect("channel.open (the connection must still be usable)")
}

async fn declare_queue(ch: &Channel, name: &str, arguments: FieldTable) -> Result<lapin::Queue, lapin::Error> {
    within("queue.declare", ch.queue_declare(name.into(), QueueDeclareOptions::default(), arguments)).await
}

async fn passive_queue(ch: &Channel, name: &str) -> Result<lapin::Queue, lapin::Error> {
    let options = QueueDeclareOptions { passive: true, ..Default::default() };
    within("passive queue.declare", ch.queue_declare(name.into(), options, FieldTable::default())).await
}

async fn declare_exchange(
    ch: &Channel,
    name: &str,
    kind: ExchangeKind,
    arguments: FieldTable,
) -> Result<(), lapin::Error> {
    within("exchange.declare", ch.exchange_declare(name.into(), kind, ExchangeDeclareOptions::default(), arguments))
        .await
}

async fn passive_exchange(ch: &Channel, name: &str, kind: ExchangeKind) -> Result<(), lapin::Error> {
    let options = ExchangeDeclareOptions { passive: true, ..Default::default() };
    within("passive exchange.declare", ch.exchange_declare(name.into(), kind, options, FieldTable::default())).await
}

async fn bind_queue(ch: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), lapin::Error> {
    within(
        "queue.bind",
        ch.queue_bind(queue.into(), exchange.into(), key.into(), QueueBindOptions::default(), FieldTable::default()),
    )
    .await
}

async fn bind_x(ch: &Channel, dest: &str, source: &str) -> Result<(), lapin::Error> {
    let bind =
        ch.exchange_bind(dest.into(), source.into(), "k".into(), ExchangeBindOptions::default(), FieldTable::default());
    within("exchange.bind", bind).await
}

async fn unbind_x(ch: &Channel, dest: &str, source: &str) -> Result<(), lapin::Error> {
    let unbind = ch.exchange_unbind(
        dest.into(),
        source.into(),
        "k".into(),
        ExchangeUnbindOptions::default(),
        FieldTable::default(),
    );
    within("exchange.unbind", unbind).await
}

async fn get(ch: &Channel, queue: &str) -> Result<Option<Vec<u8>>, lapin::Error> {
    let got = within("basic.get", ch.basic_get(queue.into(), BasicGetOptions { no_ack: true })).await?;
    Ok(got.map(|m| m.delivery.data))
}

/// basic.publish through lapin (for publishes that are allowed), awaited until written.
async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8]) {
    within("basic.publish", async {
        ch.basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), body, BasicProperties::default())
            .await?
            .await
    })
    .await
    .expect("basic.publish");
}

fn long_string(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

fn alternate_exchange(name: &str) -> FieldTable {
    args(&[("alternate-exchange", long_string(name))])
}

fn dead_letter_exchange(name: &str) -> FieldTable {
    args(&[("x-dead-letter-exchange", long_string(name))])
}

/// The reply text RabbitMQ sends for an access refusal (its `ACCESS_REFUSED - ` prefix included).
fn refusal(detail: &str) -> String {
    format!("ACCESS_REFUSED - {detail}")
}

/// Asserts that `r` failed with a channel close 403 ACCESS_REFUSED whose text is
/// `ACCESS_REFUSED - {detail}`.
#[track_caller]
fn assert_refused<T: std::fmt::Debug>(r: Result<T, lapin::Error>, detail: &str) {
    match r {
        Ok(v) => panic!("expected 403 \"{detail}\", got Ok({v:?})"),
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(p) => {
                assert_eq!(p.get_id(), 403, "expected 403 \"{detail}\", got {e:?}");
                assert_eq!(p.get_message().as_str(), refusal(detail), "reply text");
            }
            _ => panic!("expected an AMQP 403 \"{detail}\", got {e:?}"),
        },
    }
}

// ----- raw frames ----------------------------------------------------------------------------------

/// A raw client logged in as `user` that sent connection.open for `vhost`: the client once the
/// server answered open-ok, or the connection.close it answered with (close-ok is sent back and
/// the socket is seen closed).
async fn raw_open(s: &TestServer, user: &str, vhost: &str) -> Result<RawClient, ConnectionClose> {
    let (mut c, _start) = RawClient::start(s.amqp_addr()).await;
    c.send_method(0, Method::ConnectionStartOk(plain_start_ok(user, PASSWORD))).await;
    let tune = c.recv_tune().await;
    let tune_ok = ConnectionTuneOk { channel_max: tune.channel_max, frame_max: tune.frame_max, heartbeat: 0 };
    c.send_method(0, Method::ConnectionTuneOk(tune_ok)).await;
    c.open_vhost(vhost).await;
    match c.recv_method().await {
        (0, Method::ConnectionOpenOk(_)) => Ok(c),
        (0, Method::ConnectionClose(close)) => {
            c.send_method(0, Method::ConnectionCloseOk(ConnectionCloseOk {})).await;
            c.expect_eof().await;
            Err(close)
        }
        other => panic!("expected connection.open-ok or connection.close, got {other:?}"),
    }
}

/// A raw client as `user` on vhost `/` with channel 1 open.
async fn raw_login(s: &TestServer, user: &str) -> RawClient {
    let mut c = raw_open(s, user, "/").await.unwrap_or_else(|close| panic!("{user} may open '/': {close:?}"));
    c.open_channel(1).await;
    c
}

/// Publishes on channel `ch` and shows, with a basic.qos round trip behind it, that the channel
/// was not closed: the publish was allowed.
async fn raw_publish_ok(c: &mut RawClient, ch: u16, exchange: &str, key: &str, body: &[u8]) {
    c.publish(ch, exchange, key, body).await;
    c.send_method(ch, Method::BasicQos(BasicQos { prefetch_size: 0, prefetch_count: 0, global: false })).await;
    match c.recv_method().await {
        (n, Method::BasicQosOk(_)) if n == ch => {}
        other => panic!("publish to '{exchange}' with key '{key}' must be allowed, got {other:?}"),
    }
}

/// Publishes on channel `ch`, expects the channel closed with 403 and `ACCESS_REFUSED - {detail}`,
/// and answers close-ok (the channel number is free again).
async fn raw_publish_refused(c: &mut RawClient, ch: u16, exchange: &str, key: &str, detail: &str) {
    c.publish(ch, exchange, key, b"refused").await;
    let close = expect_channel_close(c, ch).await;
    assert_eq!(
        (close.reply_code, close.reply_text.to_string_lossy()),
        (403, refusal(detail)),
        "publish to '{exchange}' with key '{key}'"
    );
}

async fn expect_channel_close(c: &mut RawClient, ch: u16) -> ChannelClose {
    match c.recv_method().await {
        (n, Method::ChannelClose(close)) if n == ch => {
            c.send_method(ch, Method::ChannelCloseOk(ChannelCloseOk {})).await;
            close
        }
        other => panic!("expected channel.close on channel {ch}, got {other:?}"),
    }
}

/// Takes `n` deliveries from `queue` (as `user`) and returns their routing keys and bodies, then
/// checks that nothing else arrives.
async fn drain(s: &TestServer, user: &str, queue: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    let conn = login(s, user).await;
    let ch = channel(&conn).await;
    let mut consumer = consume(&ch, queue, true).await;
    let mut got = Vec::new();
    for _ in 0..n {
        let d = next_delivery(&mut consumer).await;
        got.push((d.routing_key.as_str().to_string(), d.data));
    }
    no_delivery(&mut consumer).await;
    got.sort();
    got
}

fn keyed(pairs: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = pairs.iter().map(|(k, b)| (k.to_string(), b.to_vec())).collect();
    v.sort();
    v
}

// ----- no permissions configured ------------------------------------------------------------------

#[tokio::test]
async fn without_permission_tables_every_user_may_do_everything() {
    let s = start("").await;
    // bob never has an entry; without any [[permissions]] he is not restricted at all.
    let conn = login(&s, "bob").await;
    let ch = channel(&conn).await;
    declare_exchange(&ch, "alice.x", ExchangeKind::Topic, alternate_exchange("amq.fanout")).await.unwrap();
    declare_queue(&ch, "alice.q", dead_letter_exchange("")).await.unwrap();
    let named = declare_queue(&ch, "", FieldTable::default()).await.unwrap();
    assert!(named.name().as_str().starts_with("amq.gen-"), "{:?}", named.name());
    bind_queue(&ch, "alice.q", "alice.x", "#").await.unwrap();
    bind_queue(&ch, "alice.q", "amq.topic", "anything.#").await.unwrap();
    publish(&ch, "", "alice.q", b"default").await;
    publish(&ch, "alice.x", "k", b"topic").await;
    assert_eq!(get(&ch, "alice.q").await.unwrap().as_deref(), Some(&b"default"[..]));
    assert_eq!(get(&ch, "alice.q").await.unwrap().as_deref(), Some(&b"topic"[..]));
    within("queue.purge", ch.queue_purge("alice.q".into(), QueuePurgeOptions::default())).await.unwrap();
    within("queue.delete", ch.queue_delete("alice.q".into(), QueueDeleteOptions::default())).await.unwrap();
    within("exchange.delete", ch.exchange_delete("alice.x".into(), ExchangeDeleteOptions::default())).await.unwrap();
    // Publishing on the topic exchange is not restricted either.
    let mut raw = raw_login(&s, "bob").await;
    raw_publish_ok(&mut raw, 1, "amq.topic", "anything.at.all", b"x").await;
}

// ----- vhost access ------------------------------------------------------------------------------

#[tokio::test]
async fn a_user_without_an_entry_for_the_vhost_is_refused_at_connection_open_with_530() {
    // A second listener creates vhost `plant`. alice has an entry for each vhost (another one on
    // `plant`), carol only one for `plant`, dave only one for `/`, bob none at all.
    let tables = r#"
[[permissions]]
user = "alice"
configure = '^alice\.'
write = '^alice\.'
read = '^alice\.'

[[permissions]]
user = "alice"
vhost = "plant"
configure = '^(alice|bob)\.'
write = '.*'
read = '.*'

[[permissions]]
user = "carol"
vhost = "plant"
configure = '.*'
write = '.*'
read = '.*'

[[permissions]]
user = "dave"
vhost = "/"
configure = '.*'
write = '.*'
read = '.*'

[[listeners]]
protocol = "amqp"
bind = "127.0.0.1:0"
vhost = "plant"
"#;
    let s = start(tables).await;

    for (user, vhost) in [("bob", "/"), ("bob", "plant"), ("carol", "/"), ("dave", "plant")] {
        let close = raw_open(&s, user, vhost).await.err().unwrap_or_else(|| panic!("{user} must not open {vhost}"));
        assert_eq!(
            (close.reply_code, close.reply_text.to_string_lossy()),
            (530, format!("NOT_ALLOWED - access to vhost '{vhost}' refused for user '{user}'")),
            "{user} on {vhost}"
        );
    }
    // lapin sees the refusal as a failed connect (with 530, when it reports the close).
    let refused = within("lapin connect", lapin::Connection::connect(&uri(&s, "bob", "/"), Default::default())).await;
    match refused {
        Ok(_) => panic!("bob must not open '/'"),
        Err(e) => {
            if let lapin::ErrorKind::ProtocolError(p) = e.kind() {
                assert_eq!(p.get_id(), 530, "{e:?}");
            }
        }
    }

    // The users with an entry get in, each with the permissions of that vhost.
    let dave = login(&s, "dave").await;
    declare_queue(&channel(&dave).await, "anything", FieldTable::default()).await.expect("dave configures on '/'");
    let carol = lapin_uri(&uri(&s, "carol", "plant")).await;
    declare_queue(&channel(&carol).await, "anything", FieldTable::default()).await.expect("carol configures on plant");
    let alice_plant = lapin_uri(&uri(&s, "alice", "plant")).await;
    declare_queue(&channel(&alice_plant).await, "bob.q", FieldTable::default())
        .await
        .expect("bob.* is alice's on plant");
    assert_refused(
        declare_queue(&channel(&alice_plant).await, "carol.q", FieldTable::default()).await,
        "configure access to queue 'carol.q' in vhost 'plant' refused for user 'alice'",
    );
    let alice = login(&s, "alice").await;
    assert_refused(
        declare_queue(&channel(&alice).await, "bob.q", FieldTable::default()).await,
        "configure access to queue 'bob.q' in vhost '/' refused for user 'alice'",
    );
    declare_queue(&channel(&alice).await, "alice.q", FieldTable::default()).await.expect("alice.* on '/'");
}

// ----- configure -----------------------------------------------------------------------------------

#[tokio::test]
async fn queue_declare_and_delete_need_configure_and_passive_declares_check_nothing() {
    let s = start(PERMISSIONS).await;
    let admin = channel(&login(&s, "admin").await).await;
    declare_queue(&admin, "bob.q", FieldTable::default()).await.unwrap();

    let conn = login(&s, "alice").await;
    let ch = channel(&conn).await;
    declare_queue(&ch, "alice.q", FieldTable::default()).await.expect("alice.* may be configured");
    assert_refused(
        declare_queue(&ch, "bob.q", FieldTable::default()).await,
        "configure access to queue 'bob.q' in vhost '/' refused for user 'alice'",
    );
    // The channel is closed, the connection is not; a passive declare checks nothing.
    let ch = channel(&conn).await;
    assert_eq!(passive_queue(&ch, "bob.q").await.expect("passive declare").name().as_str(), "bob.q");
    assert_refused(
        within("queue.delete", ch.queue_delete("bob.q".into(), QueueDeleteOptions::default())).await,
        "configure access to queue 'bob.q' in vhost '/' refused for user 'alice'",
    );
    let ch = channel(&conn).await;
    within("queue.delete", ch.queue_delete("alice.q".into(), QueueDeleteOptions::default()))
        .await
        .expect("alice deletes her own queue");
    // Nothing of the refused delete happened.
    passive_queue(&admin, "bob.q").await.expect("bob.q is still there");
    assert!(passive_queue(&admin, "alice.q").await.is_err(), "alice.q was deleted");
}

#[tokio::test]
async fn a_server_named_queue_is_checked_under_its_generated_name() {
    let s = start(PERMISSIONS).await;
    let dave = channel(&login(&s, "dave").await).await;
    let q = declare_queue(&dave, "", FieldTable::default()).await.expect("dave may configure amq.gen*");
    assert!(q.name().as_str().starts_with("amq.gen-"), "{:?}", q.name());

    let conn = login(&s, "alice").await;
    let ch = channel(&conn).await;
    match declare_queue(&ch, "", FieldTable::default()).await {
        Ok(q) => panic!("alice must not declare a server-named queue, got {q:?}"),
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(p) => {
                assert_eq!(p.get_id(), 403, "{e:?}");
                let text = p.get_message().as_str();
                let prefix = refusal("configure access to queue 'amq.gen-");
                let suffix = "' in vhost '/' refused for user 'alice'";
                assert!(text.starts_with(&prefix) && text.ends_with(suffix), "{text}");
                assert!(text.len() > prefix.len() + suffix.len(), "a generated name: {text}");
            }
            _ => panic!("expected 403, got {e:?}"),
        },
    }
    declare_queue(&channel(&conn).await, "alice.named", FieldTable::default()).await.expect("a name of her own");
}

#[tokio::test]
async fn exchange_declare_and_delete_need_configure() {
    let s = start(PERMISSIONS).await;
    let admin = channel(&login(&s, "admin").await).await;
    declare_exchange(&admin, "bob.x", ExchangeKind::Direct, FieldTable::default()).await.unwrap();

    let conn = login(&s, "alice").await;
    let ch = channel(&conn).await;
    declare_exchange(&ch, "alice.x", ExchangeKind::Direct, FieldTable::default()).await.expect("alice.x");
    assert_refused(
        declare_exchange(&ch, "bob.y", ExchangeKind::Direct, FieldTable::default()).await,
        "configure access to exchange 'bob.y' in vhost '/' refused for user 'alice'",
    );
    assert!(passive_exchange(&admin, "bob.y", ExchangeKind::Direct).await.is_err(), "bob.y was not declared");
    let admin = channel(&login(&s, "admin").await).await;

    // Passive declares check nothing: alice may look at exchanges she cannot configure.
    let ch = channel(&conn).await;
    passive_exchange(&ch, "bob.x", ExchangeKind::Direct).await.expect("passive bob.x");
    passive_exchange(&ch, "amq.topic", ExchangeKind::Topic).await.expect("passive amq.topic");
    assert_refused(
        within("exchange.delete", ch.exchange_delete("bob.x".into(), ExchangeDeleteOptions::default())).await,
        "configure access to exchange 'bob.x' in vhost '/' refused for user 'alice'",
    );
    let ch = channel(&conn).await;
    within("exchange.delete", ch.exchange_delete("alice.x".into(), ExchangeDeleteOptions::default()))
        .await
        .expect("alice deletes her own exchange");
    passive_exchange(&admin, "bob.x", ExchangeKind::Direct).await.expect("bob.x is still there");
}

#[tokio::test]
async fn alternate_and_dead_letter_exchanges_need_read_on_the_declared_resource_and_write_on_the_target() {
    let s = start(PERMISSIONS).await;
    let admin = channel(&login(&s, "admin").await).await;
    declare_exchange(&admin, "bob.ae", ExchangeKind::Fanout, FieldTable::default()).await.unwrap();
    declare_exchange(&admin, "bob.dlx", ExchangeKind::Fanout, FieldTable::default()).await.unwrap();

    let conn = login(&s, "alice").await;
    let ch = channel(&conn).await;
    declare_exchange(&ch, "alice.ae", ExchangeKind::Fanout, FieldTable::default()).await.unwrap();
    declare_exchange(&ch, "alice.x", ExchangeKind::Direct, alternate_exchange("alice.ae")).await.expect("own AE");
    assert_refused(
        declare_exchange(&ch, "alice.y", ExchangeKind::Direct, alternate_exchange("bob.ae")).await,
        "write access to exchange 'bob.ae' in vhost '/' refused for user 'alice'",
    );
    assert!(passive_exchange(&admin, "alice.y", ExchangeKind::Direct).await.is_err(), "alice.y was not declared");
    let admin = channel(&login(&s, "admin").await).await;

    // The granted alternate exchange works: unroutable messages reach alice.q through it.
    let ch = channel(&conn).await;
    declare_queue(&ch, "alice.q", FieldTable::default()).await.unwrap();
    bind_queue(&ch, "alice.q", "alice.ae", "").await.unwrap();
    publish(&ch, "alice.x", "nobody", b"via ae").await;
    assert_eq!(get(&ch, "alice.q").await.unwrap().as_deref(), Some(&b"via ae"[..]));

    // Dead-letter exchanges: write on the target; "" is the default exchange, amq.default.
    declare_queue(&ch, "alice.dlq", dead_letter_exchange("alice.ae")).await.expect("own DLX");
    declare_queue(&ch, "alice.dlq2", dead_letter_exchange("")).await.expect("alice may write amq.default");
    assert_refused(
        declare_queue(&ch, "alice.dlq3", dead_letter_exchange("bob.dlx")).await,
        "write access to exchange 'bob.dlx' in vhost '/' refused for user 'alice'",
    );
    assert!(passive_queue(&admin, "alice.dlq3").await.is_err(), "alice.dlq3 was not declared");
    let carol = channel(&login(&s, "carol").await).await;
    declare_queue(&carol, "carol.q", FieldTable::default()).await.unwrap();
    assert_refused(
        declare_queue(&carol, "carol.dlq", dead_letter_exchange("")).await,
        "write access to exchange 'amq.default' in vhost '/' refused for user 'carol'",
    );

    // And read on the declared exchange or queue itself (wendy may configure and write, not read).
    let wendy = login(&s, "wendy").await;
    let ch = channel(&wendy).await;
    declare_exchange(&ch, "w.ae", ExchangeKind::Fanout, FieldTable::default()).await.unwrap();
    declare_exchange(&ch, "w.x", ExchangeKind::Direct, FieldTable::default()).await.expect("no AE: no read needed");
    declare_queue(&ch, "w.q", FieldTable::default()).await.expect("no DLX: no read needed");
    assert_refused(
        declare_exchange(&ch, "w.x2", ExchangeKind::Direct, alternate_exchange("w.ae")).await,
        "read access to exchange 'w.x2' in vhost '/' refused for user 'wendy'",
    );
    assert_refused(
        declare_queue(&channel(&wendy).await, "w.q2", dead_letter_exchange("w.ae")).await,
        "read access to queue 'w.q2' in vhost '/' refused for user 'wendy'",
    );
}

// ----- write and read ------------------------------------------------------------------------------

#[tokio::test]
async fn bindings_need_write_on_the_destination_and_read_on_the_source() {
    let s = start(PERMISSIONS).await;
    let conn = login(&s, "alice").await;
    let ch = channel(&conn).await;
    declare_queue(&ch, "alice.q", FieldTable::default()).await.unwrap();
    declare_exchange(&ch, "alice.x", ExchangeKind::Direct, FieldTable::default()).await.unwrap();
    declare_exchange(&ch, "alice.x2", ExchangeKind::Fanout, FieldTable::default()).await.unwrap();
    let admin = channel(&login(&s, "admin").await).await;
    declare_queue(&admin, "bob.q", FieldTable::default()).await.unwrap();
    declare_exchange(&admin, "bob.x", ExchangeKind::Direct, FieldTable::default()).await.unwrap();
    // Bindings for alice to try to remove.
    bind_queue(&admin, "bob.q", "alice.x", "admin").await.unwrap();
    bind_x(&admin, "alice.x2", "bob.x").await.unwrap();

    // queue.bind: write on the queue, read on the exchange.
    bind_queue(&ch, "alice.q", "alice.x", "k").await.expect("alice binds her queue to her exchange");
    publish(&ch, "alice.x", "k", b"bound").await;
    assert_eq!(get(&ch, "alice.q").await.unwrap().as_deref(), Some(&b"bound"[..]));
    assert_refused(
        bind_queue(&ch, "alice.q", "bob.x", "k").await,
        "read access to exchange 'bob.x' in vhost '/' refused for user 'alice'",
    );
    assert_refused(
        bind_queue(&channel(&conn).await, "bob.q", "alice.x", "k").await,
        "write access to queue 'bob.q' in vhost '/' refused for user 'alice'",
    );
    // exchange.bind: write on the destination, read on the source.
    let ch = channel(&conn).await;
    bind_x(&ch, "alice.x2", "alice.x").await.expect("alice binds her exchanges");
    assert_refused(
        bind_x(&ch, "bob.x", "alice.x").await,
        "write access to exchange 'bob.x' in vhost '/' refused for user 'alice'",
    );
    assert_refused(
        bind_x(&channel(&conn).await, "alice.x2", "bob.x").await,
        "read access to exchange 'bob.x' in vhost '/' refused for user 'alice'",
    );
    // The unbinds check the same.
    let ch = channel(&conn).await;
    assert_refused(
        within(
            "queue.unbind",
            ch.queue_unbind("bob.q".into(), "alice.x".into(), "admin".into(), FieldTable::default()),
        )
        .await,
        "write access to queue 'bob.q' in vhost '/' refused for user 'alice'",
    );
    assert_refused(
        unbind_x(&channel(&conn).await, "alice.x2", "bob.x").await,
        "read access to exchange 'bob.x' in vhost '/' refused for user 'alice'",
    );
    let ch = channel(&conn).await;
    within("queue.unbind", ch.queue_unbind("alice.q".into(), "alice.x".into(), "k".into(), FieldTable::default()))
        .await
        .expect("alice unbinds her queue");
    unbind_x(&ch, "alice.x2", "alice.x").await.expect("alice unbinds her exchanges");
    // The refused unbind left admin's binding in place.
    publish(&admin, "alice.x", "admin", b"still bound").await;
    assert_eq!(get(&admin, "bob.q").await.unwrap().as_deref(), Some(&b"still bound"[..]));
}

#[tokio::test]
async fn purge_get_and_consume_need_read() {
    let s = start(PERMISSIONS).await;
    let admin = channel(&login(&s, "admin").await).await;
    declare_queue(&admin, "bob.q", FieldTable::default()).await.unwrap();
    publish(&admin, "", "bob.q", b"bob's").await;

    let conn = login(&s, "alice").await;
    let ch = channel(&conn).await;
    declare_queue(&ch, "alice.q", FieldTable::default()).await.unwrap();
    publish(&ch, "", "alice.q", b"1").await;
    assert_eq!(get(&ch, "alice.q").await.expect("basic.get on alice.q").as_deref(), Some(&b"1"[..]));
    publish(&ch, "", "alice.q", b"2").await;
    let purged = within("queue.purge", ch.queue_purge("alice.q".into(), QueuePurgeOptions::default())).await;
    assert_eq!(purged.expect("alice purges her queue"), 1);

    assert_refused(get(&ch, "bob.q").await, "read access to queue 'bob.q' in vhost '/' refused for user 'alice'");
    let ch = channel(&conn).await;
    assert_refused(
        within("queue.purge", ch.queue_purge("bob.q".into(), QueuePurgeOptions::default())).await,
        "read access to queue 'bob.q' in vhost '/' refused for user 'alice'",
    );
    let ch = channel(&conn).await;
    let options = lapin::options::BasicConsumeOptions { no_ack: true, ..Default::default() };
    assert_refused(
        within("basic.consume", ch.basic_consume("bob.q".into(), "".into(), options, FieldTable::default())).await,
        "read access to queue 'bob.q' in vhost '/' refused for user 'alice'",
    );

    // Consuming her own queue works; bob.q kept its message through the refused purge and get.
    let ch = channel(&conn).await;
    let mut consumer = consume(&ch, "alice.q", true).await;
    publish(&ch, "", "alice.q", b"3").await;
    assert_eq!(next_delivery(&mut consumer).await.data, b"3");
    assert_eq!(get(&admin, "bob.q").await.unwrap().as_deref(), Some(&b"bob's"[..]));
}

#[tokio::test]
async fn publish_needs_write_on_the_exchange_and_the_default_exchange_is_amq_default() {
    let s = start(PERMISSIONS).await;
    let admin = channel(&login(&s, "admin").await).await;
    declare_queue(&admin, "alice.q", FieldTable::default()).await.unwrap();
    declare_queue(&admin, "carol.q", FieldTable::default()).await.unwrap();
    for (exchange, queue) in [("alice.x", "alice.q"), ("bob.x", "alice.q"), ("carol.x", "carol.q")] {
        declare_exchange(&admin, exchange, ExchangeKind::Direct, FieldTable::default()).await.unwrap();
        bind_queue(&admin, queue, exchange, "k").await.unwrap();
    }

    let mut alice = raw_login(&s, "alice").await;
    raw_publish_ok(&mut alice, 1, "", "alice.q", b"default").await;
    raw_publish_ok(&mut alice, 1, "alice.x", "k", b"alice.x").await;
    raw_publish_refused(
        &mut alice,
        1,
        "bob.x",
        "k",
        "write access to exchange 'bob.x' in vhost '/' refused for user 'alice'",
    )
    .await;
    // The connection stays open: another channel publishes again.
    alice.open_channel(2).await;
    raw_publish_ok(&mut alice, 2, "", "alice.q", b"after").await;
    let got = drain(&s, "admin", "alice.q", 3).await;
    assert_eq!(got, keyed(&[("alice.q", b"default"), ("k", b"alice.x"), ("alice.q", b"after")]));

    // carol may write carol.*, not the default exchange.
    let mut carol = raw_login(&s, "carol").await;
    raw_publish_ok(&mut carol, 1, "carol.x", "k", b"carol.x").await;
    raw_publish_refused(
        &mut carol,
        1,
        "",
        "carol.q",
        "write access to exchange 'amq.default' in vhost '/' refused for user 'carol'",
    )
    .await;
    assert_eq!(drain(&s, "admin", "carol.q", 1).await, keyed(&[("k", b"carol.x")]));
}

#[tokio::test]
async fn patterns_are_unanchored_searches_and_the_empty_pattern_grants_nothing() {
    let s = start(PERMISSIONS).await;
    // una: configure 'q' (anywhere in the name), write '' and read '' (nothing).
    let conn = login(&s, "una").await;
    let ch = channel(&conn).await;
    for name in ["q", "my-q-1", "queue"] {
        declare_queue(&ch, name, FieldTable::default()).await.unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
    declare_exchange(&ch, "x.q.y", ExchangeKind::Direct, FieldTable::default()).await.expect("x.q.y");
    assert_refused(
        declare_queue(&ch, "nothing", FieldTable::default()).await,
        "configure access to queue 'nothing' in vhost '/' refused for user 'una'",
    );
    assert_refused(
        bind_queue(&channel(&conn).await, "my-q-1", "x.q.y", "k").await,
        "write access to queue 'my-q-1' in vhost '/' refused for user 'una'",
    );
    assert_refused(
        get(&channel(&conn).await, "my-q-1").await,
        "read access to queue 'my-q-1' in vhost '/' refused for user 'una'",
    );
    let mut raw = raw_login(&s, "una").await;
    raw_publish_refused(
        &mut raw,
        1,
        "",
        "q",
        "write access to exchange 'amq.default' in vhost '/' refused for user 'una'",
    )
    .await;

    // An anchor is the pattern's own: '^alice\.' does not match inside a name, '\.' is a dot.
    let conn = login(&s, "alice").await;
    for name in ["xalice.q", "alice", "aliceXq"] {
        assert_refused(
            declare_queue(&channel(&conn).await, name, FieldTable::default()).await,
            &format!("configure access to queue '{name}' in vhost '/' refused for user 'alice'"),
        );
    }
    declare_queue(&channel(&conn).await, "alice.q.x", FieldTable::default()).await.expect("alice.q.x");
}

// ----- topic permissions -------------------------------------------------------------------------

const TOPIC_PERMISSIONS: &str = r#"
[[topic_permissions]]
user = "tina"
exchange = "amq.topic"
write = '^sensors\.{username}\.'
read = '^sensors\.'

# A topic permission on a direct exchange restricts nothing (RabbitMQ checks topic exchanges).
[[topic_permissions]]
user = "tina"
vhost = "/"
exchange = "tina.direct"
write = '^nope$'
read = '^nope$'

[[topic_permissions]]
user = "tina"
exchange = "tina.vt"
write = '^{vhost}:{username}$'
read = '^{vhost}:'
"#;

#[tokio::test]
async fn topic_permissions_check_routing_keys_on_publish_and_binding_keys_on_bind() {
    let s = start(&format!("{PERMISSIONS}{TOPIC_PERMISSIONS}")).await;
    let conn = login(&s, "tina").await;
    let ch = channel(&conn).await;
    declare_queue(&ch, "tina.q", FieldTable::default()).await.unwrap();
    declare_exchange(&ch, "tina.direct", ExchangeKind::Direct, FieldTable::default()).await.unwrap();
    declare_exchange(&ch, "tina.vt", ExchangeKind::Topic, FieldTable::default()).await.unwrap();
    // A topic exchange with no topic permission: no restriction.
    declare_exchange(&ch, "tina.free", ExchangeKind::Topic, FieldTable::default()).await.unwrap();

    // Binding keys against the read pattern.
    bind_queue(&ch, "tina.q", "amq.topic", "sensors.#").await.expect("sensors.# is readable");
    bind_queue(&ch, "tina.q", "tina.direct", "anything").await.expect("not a topic exchange");
    bind_queue(&ch, "tina.q", "tina.free", "#").await.expect("no topic permission for tina.free");
    bind_queue(&ch, "tina.q", "tina.vt", "/:tina").await.expect("{vhost} is '/'");
    assert_refused(
        bind_queue(&ch, "tina.q", "amq.topic", "alerts.#").await,
        "read access to topic 'alerts.#' in exchange 'amq.topic' in vhost '/' refused for user 'tina'",
    );
    assert_refused(
        bind_queue(&channel(&conn).await, "tina.q", "tina.vt", "plant:tina").await,
        "read access to topic 'plant:tina' in exchange 'tina.vt' in vhost '/' refused for user 'tina'",
    );

    // Routing keys against the write pattern, {username} filled in.
    let mut raw = raw_login(&s, "tina").await;
    raw_publish_ok(&mut raw, 1, "amq.topic", "sensors.tina.t", b"1").await;
    raw_publish_ok(&mut raw, 1, "tina.direct", "anything", b"2").await;
    raw_publish_ok(&mut raw, 1, "tina.free", "whatever", b"3").await;
    raw_publish_ok(&mut raw, 1, "tina.vt", "/:tina", b"4").await;
    raw_publish_refused(
        &mut raw,
        1,
        "amq.topic",
        "sensors.bob.t",
        "write access to topic 'sensors.bob.t' in exchange 'amq.topic' in vhost '/' refused for user 'tina'",
    )
    .await;
    raw.open_channel(2).await;
    raw_publish_refused(
        &mut raw,
        2,
        "tina.vt",
        "/:bob",
        "write access to topic '/:bob' in exchange 'tina.vt' in vhost '/' refused for user 'tina'",
    )
    .await;
    // queue.unbind checks binding keys as queue.bind does.
    let ch = channel(&conn).await;
    assert_refused(
        within(
            "queue.unbind",
            ch.queue_unbind("tina.q".into(), "amq.topic".into(), "alerts.#".into(), FieldTable::default()),
        )
        .await,
        "read access to topic 'alerts.#' in exchange 'amq.topic' in vhost '/' refused for user 'tina'",
    );
    let ch = channel(&conn).await;
    within(
        "queue.unbind",
        ch.queue_unbind("tina.q".into(), "amq.topic".into(), "sensors.#".into(), FieldTable::default()),
    )
    .await
    .expect("sensors.# may be unbound");
    let got = drain(&s, "tina", "tina.q", 4).await;
    assert_eq!(
        got,
        keyed(&[("sensors.tina.t", b"1"), ("anything", b"2"), ("whatever", b"3"), ("/:tina", b"4")]),
        "only the allowed publishes are routed"
    );
}

// ----- the MQTT ACL on the MQTT exchange ---------------------------------------------------------

const ACL: &str = r#"
[[acl]]
user = "alice"
topic = "a/#"
access = "readwrite"

[[acl]]
user = "alice"
topic = "r/+"
access = "read"

[[acl]]
user = "alice"
topic = "u/%u"
access = "write"

[[acl]]
topic = "c/%c/#"
access = "readwrite"
"#;

#[tokio::test]
async fn the_mqtt_acl_governs_amqp_users_on_the_mqtt_exchange() {
    // No [[permissions]]: only the ACL restricts, and only on amq.topic (the MQTT exchange).
    let s = start(&format!("{ACL}\n{MQTT_LISTENER}")).await;
    let conn = login(&s, "alice").await;
    let ch = channel(&conn).await;
    declare_queue(&ch, "alice.q", FieldTable::default()).await.unwrap();
    declare_exchange(&ch, "alice.t", ExchangeKind::Topic, FieldTable::default()).await.unwrap();

    // Binding keys as MQTT filters ('.' → '/', '*' → '+', '#' → '#') against the read grants.
    for key in ["a.*", "a.#", "r.x", "r.*"] {
        bind_queue(&ch, "alice.q", "amq.topic", key).await.unwrap_or_else(|e| panic!("{key}: {e:?}"));
    }
    bind_queue(&ch, "alice.q", "alice.t", "b.*").await.expect("alice.t is no MQTT exchange");
    for key in ["b.*", "r.#", "#", "u.alice", "c.alice.x"] {
        assert_refused(
            bind_queue(&channel(&conn).await, "alice.q", "amq.topic", key).await,
            &format!("read access to topic '{key}' in exchange 'amq.topic' in vhost '/' refused for user 'alice'"),
        );
    }

    // Routing keys as MQTT topics against the write grants.
    let mut raw = raw_login(&s, "alice").await;
    raw_publish_ok(&mut raw, 1, "amq.topic", "a.b", b"1").await;
    raw_publish_ok(&mut raw, 1, "amq.topic", "u.alice", b"2").await;
    raw_publish_ok(&mut raw, 1, "alice.t", "b.c", b"3").await;
    for (next, key) in (2..).zip(["b.c", "r.x", "u.bob", "c.alice.x"]) {
        raw_publish_refused(
            &mut raw,
            next - 1,
            "amq.topic",
            key,
            &format!("write access to topic '{key}' in exchange 'amq.topic' in vhost '/' refused for user 'alice'"),
        )
        .await;
        raw.open_channel(next).await;
    }
    let got = drain(&s, "alice", "alice.q", 2).await;
    assert_eq!(got, keyed(&[("a.b", b"1"), ("b.c", b"3")]), "only the allowed publishes are routed");

    // Another user without ACL entries is refused on the MQTT exchange, free elsewhere.
    let mut bob = raw_login(&s, "bob").await;
    raw_publish_ok(&mut bob, 1, "alice.t", "b.c", b"4").await;
    raw_publish_refused(
        &mut bob,
        1,
        "amq.topic",
        "a.b",
        "write access to topic 'a.b' in exchange 'amq.topic' in vhost '/' refused for user 'bob'",
    )
    .await;

    // Without an MQTT listener the ACL (about MQTT topics) does not restrict AMQP at all.
    let s = start(ACL).await;
    let mut bob = raw_login(&s, "bob").await;
    raw_publish_ok(&mut bob, 1, "amq.topic", "b.c", b"free").await;
    let ch = channel(&login(&s, "bob").await).await;
    declare_queue(&ch, "bob.q", FieldTable::default()).await.unwrap();
    bind_queue(&ch, "bob.q", "amq.topic", "#").await.expect("no MQTT listener: no ACL on amq.topic");
}

#[tokio::test]
async fn a_listeners_mqtt_exchange_is_the_one_the_acl_governs() {
    let s = start(&format!("{ACL}\n{MQTT_LISTENER}mqtt_exchange = \"iot\"\n")).await;
    let conn = login(&s, "alice").await;
    let ch = channel(&conn).await;
    declare_queue(&ch, "alice.q", FieldTable::default()).await.unwrap();
    // The MQTT frontend declares its exchange when it first needs it; declare it as it would.
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    within("exchange.declare", ch.exchange_declare("iot".into(), ExchangeKind::Topic, durable, FieldTable::default()))
        .await
        .expect("declare iot");
    bind_queue(&ch, "alice.q", "iot", "a.#").await.expect("a/# readable");
    bind_queue(&ch, "alice.q", "amq.topic", "b.#").await.expect("amq.topic is no MQTT exchange here");
    assert_refused(
        bind_queue(&ch, "alice.q", "iot", "b.#").await,
        "read access to topic 'b.#' in exchange 'iot' in vhost '/' refused for user 'alice'",
    );

    let mut raw = raw_login(&s, "alice").await;
    raw_publish_ok(&mut raw, 1, "iot", "a.b", b"1").await;
    raw_publish_ok(&mut raw, 1, "amq.topic", "b.c", b"2").await;
    raw_publish_refused(
        &mut raw,
        1,
        "iot",
        "b.c",
        "write access to topic 'b.c' in exchange 'iot' in vhost '/' refused for user 'alice'",
    )
    .await;
    let got = drain(&s, "alice", "alice.q", 2).await;
    assert_eq!(got, keyed(&[("a.b", b"1"), ("b.c", b"2")]));
}

// ----- reload ------------------------------------------------------------------------------------

#[tokio::test]
async fn a_reload_replaces_the_permissions_and_open_connections_see_it_at_their_next_operation() {
    let s = start(PERMISSIONS).await;
    let refused = raw_open(&s, "bob", "/").await.expect_err("bob has no entry yet");
    assert_eq!(refused.reply_code, 530);

    // Connections opened before the reload.
    let conn = login(&s, "alice").await;
    let ch = channel(&conn).await;
    declare_queue(&ch, "alice.q", FieldTable::default()).await.unwrap();
    declare_queue(&ch, "alice.other", FieldTable::default()).await.unwrap();
    let mut raw = raw_login(&s, "alice").await;
    raw_publish_ok(&mut raw, 1, "", "alice.q", b"before").await;

    // alice loses amq.default and may configure only alice.new.*; bob gets an entry.
    let changed = PERMISSIONS.replace(
        "configure = '^alice\\.'\nwrite = '^(alice\\.|amq\\.default$)'",
        "configure = '^alice\\.new\\.'\nwrite = '^alice\\.'",
    );
    assert_ne!(changed, PERMISSIONS, "the replacement applies");
    let changed = format!(
        "{changed}\n[[permissions]]\nuser = \"bob\"\nconfigure = '^bob\\.'\nwrite = '^bob\\.'\nread = '^bob\\.'\n"
    );
    reload(&s, &changed);

    // The same channel, next operation.
    assert_refused(
        declare_queue(&ch, "alice.q2", FieldTable::default()).await,
        "configure access to queue 'alice.q2' in vhost '/' refused for user 'alice'",
    );
    declare_queue(&channel(&conn).await, "alice.new.q", FieldTable::default()).await.expect("alice.new.* now");
    raw_publish_refused(
        &mut raw,
        1,
        "",
        "alice.q",
        "write access to exchange 'amq.default' in vhost '/' refused for user 'alice'",
    )
    .await;
    // Read is unchanged: the message published before the reload is there to consume.
    let ch = channel(&conn).await;
    let mut consumer = consume(&ch, "alice.q", true).await;
    assert_eq!(next_delivery(&mut consumer).await.data, b"before");
    no_delivery(&mut consumer).await;

    // bob gets in now, with his own permissions.
    let bob = lapin_uri(&uri(&s, "bob", "/")).await;
    declare_queue(&channel(&bob).await, "bob.q", FieldTable::default()).await.expect("bob.q");
    assert_refused(
        declare_queue(&channel(&bob).await, "alice.x", FieldTable::default()).await,
        "configure access to queue 'alice.x' in vhost '/' refused for user 'bob'",
    );

    // Removing every [[permissions]] table lifts all restrictions.
    reload(&s, "");
    declare_queue(&channel(&conn).await, "anything", FieldTable::default()).await.expect("no restrictions");
    raw.open_channel(1).await;
    raw_publish_ok(&mut raw, 1, "", "alice.q", b"free").await;
}

#[tokio::test]
async fn a_reload_replaces_the_topic_permissions_and_the_acl() {
    // tina's topic permission on her own topic exchange, and admin's ACL on amq.topic.
    let tables = |topic: &str| {
        format!(
            "{PERMISSIONS}\n[[topic_permissions]]\nuser = \"tina\"\nexchange = \"tina.t\"\nwrite = '^{topic}\\.'\n\
             read = '^{topic}\\.'\n\n[[acl]]\nuser = \"admin\"\ntopic = \"{topic}/#\"\naccess = \"readwrite\"\n\n\
             {MQTT_LISTENER}"
        )
    };
    let s = start(&tables("old")).await;
    let tina = channel(&login(&s, "tina").await).await;
    declare_exchange(&tina, "tina.t", ExchangeKind::Topic, FieldTable::default()).await.unwrap();
    declare_queue(&tina, "tina.q", FieldTable::default()).await.unwrap();
    let admin = channel(&login(&s, "admin").await).await;
    declare_queue(&admin, "admin.q", FieldTable::default()).await.unwrap();

    let mut t = raw_login(&s, "tina").await;
    let mut a = raw_login(&s, "admin").await;
    raw_publish_ok(&mut t, 1, "tina.t", "old.x", b"t").await;
    raw_publish_ok(&mut a, 1, "amq.topic", "old.x", b"a").await;

    reload(&s, &tables("new"));
    raw_publish_refused(
        &mut t,
        1,
        "tina.t",
        "old.x",
        "write access to topic 'old.x' in exchange 'tina.t' in vhost '/' refused for user 'tina'",
    )
    .await;
    raw_publish_refused(
        &mut a,
        1,
        "amq.topic",
        "old.x",
        "write access to topic 'old.x' in exchange 'amq.topic' in vhost '/' refused for user 'admin'",
    )
    .await;
    t.open_channel(2).await;
    a.open_channel(2).await;
    raw_publish_ok(&mut t, 2, "tina.t", "new.x", b"t").await;
    raw_publish_ok(&mut a, 2, "amq.topic", "new.x", b"a").await;

    // Binding keys too, on channels opened before the reload.
    bind_queue(&tina, "tina.q", "tina.t", "new.#").await.expect("new.# readable after the reload");
    assert_refused(
        bind_queue(&tina, "tina.q", "tina.t", "old.#").await,
        "read access to topic 'old.#' in exchange 'tina.t' in vhost '/' refused for user 'tina'",
    );
    bind_queue(&admin, "admin.q", "amq.topic", "new.#").await.expect("new/# readable after the reload");
    assert_refused(
        bind_queue(&admin, "admin.q", "amq.topic", "old.#").await,
        "read access to topic 'old.#' in exchange 'amq.topic' in vhost '/' refused for user 'admin'",
    );
    raw_publish_ok(&mut t, 2, "tina.t", "new.y", b"t2").await;
    raw_publish_ok(&mut a, 2, "amq.topic", "new.y", b"a2").await;
    assert_eq!(drain(&s, "tina", "tina.q", 1).await, keyed(&[("new.y", b"t2")]));
    assert_eq!(drain(&s, "admin", "admin.q", 1).await, keyed(&[("new.y", b"a2")]));
}

/// Under the ACL an AMQP user cannot route around it: an exchange-to-exchange binding, an
/// alternate exchange or a dead-letter exchange into the MQTT exchange is publishing there, and
/// the MQTT frontend's session queues (filled by other clients' subscriptions) are off limits
/// without read access to everything.
#[tokio::test]
async fn amqp_users_cannot_route_around_the_mqtt_acl_nor_take_mqtt_session_queues() {
    let s = start(&format!("{ACL}\n{MQTT_LISTENER}")).await;
    // An MQTT persistent session "bob", away: its queue exists.
    let mut bob = ferry_integration_tests::mqtt::RawClient::connect_ok(
        s.mqtt_addr(),
        ferry_mqtt::codec::ProtocolVersion::V311,
        "bob",
        false,
    )
    .await;
    bob.subscribe(1, "secret/#", ferry_integration_tests::mqtt::sub_options(ferry_mqtt::codec::QoS::AtLeastOnce)).await;
    drop(bob);

    let conn = login(&s, "alice").await;
    let ch = channel(&conn).await;
    declare_exchange(&ch, "alice.x", ExchangeKind::Topic, FieldTable::default()).await.unwrap();
    let bind = |ch: Channel, key: &'static str| async move {
        let bind = ch.exchange_bind(
            "amq.topic".into(),
            "alice.x".into(),
            key.into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        );
        within("exchange.bind", bind).await
    };
    bind(channel(&conn).await, "a.#").await.expect("within alice's write grant");
    for key in ["#", "secret.t"] {
        assert_refused(
            bind(channel(&conn).await, key).await,
            &format!("write access to topic '{key}' in exchange 'amq.topic' in vhost '/' refused for user 'alice'"),
        );
    }
    assert_refused(
        declare_exchange(&channel(&conn).await, "alice.ae", ExchangeKind::Direct, alternate_exchange("amq.topic"))
            .await,
        "write access to topic '#' in exchange 'amq.topic' in vhost '/' refused for user 'alice'",
    );
    let mut dlx = dead_letter_exchange("amq.topic");
    dlx.insert("x-dead-letter-routing-key".into(), long_string("secret.t"));
    assert_refused(
        declare_queue(&channel(&conn).await, "alice.dl", dlx).await,
        "write access to topic 'secret.t' in exchange 'amq.topic' in vhost '/' refused for user 'alice'",
    );
    let mut dlx = dead_letter_exchange("amq.topic");
    dlx.insert("x-dead-letter-routing-key".into(), long_string("a.t"));
    declare_queue(&channel(&conn).await, "alice.dl", dlx).await.expect("dead letters to a topic alice may write");

    for q in ["mqtt-session.bob"] {
        assert_refused(
            get(&channel(&conn).await, q).await,
            &format!("read access to queue '{q}' in vhost '/' refused for user 'alice'"),
        );
    }
    // A binding whose first word is a wildcard also matches $SYS, which alice may not read.
    assert_refused(
        bind_queue(&channel(&conn).await, "alice.dl", "amq.topic", "*.t").await,
        "read access to topic '*.t' in exchange 'amq.topic' in vhost '/' refused for user 'alice'",
    );
}
