//! Tests of routing and declarations through a vhost: what a frontend sees.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::*;
use crate::broker::Broker;
use crate::message::{DeliveryMode, Properties};
use crate::queue::{ConsumerSink, Delivery, OwnerId};
use crate::sink::Outbox;
use crate::store::MemoryStore;
use crate::topic::{Level, Pattern};

const C1: ConnectionId = ConnectionId(1);
const C2: ConnectionId = ConnectionId(2);

fn vhost() -> VHost {
    VHost::new("/", Arc::new(MemoryStore::new()))
}

fn s(x: &str) -> ShortString {
    ShortString::from(x)
}

fn exchange(name: &str, kind: &str) -> ExchangeDeclare {
    ExchangeDeclare { name: s(name), kind: kind.into(), passive: false, options: ExchangeOptions::default() }
}

fn queue(name: &str) -> QueueDeclare {
    QueueDeclare {
        name: s(name),
        passive: false,
        options: QueueOptions { durable: true, ..Default::default() },
        connection: C1,
    }
}

fn msg(key: &str, body: &'static str) -> Message {
    Message::new("", key, Bytes::from_static(body.as_bytes()))
}

fn persistent(key: &str, body: &'static str) -> Message {
    msg(key, body).with_properties(Properties { delivery_mode: Some(DeliveryMode::Persistent), ..Default::default() })
}

fn ready(v: &VHost, q: &str) -> u32 {
    v.queue(q).expect("queue exists").stats().ready
}

fn publish(v: &VHost, x: &str, m: Message) -> PublishOutcome {
    v.publish(&s(x), m, 1_000).expect("publish")
}

#[derive(Debug, Default)]
struct Collect {
    got: Mutex<Vec<Delivery>>,
    cancelled: AtomicBool,
}

impl ConsumerSink for Collect {
    fn has_room(&self) -> bool {
        true
    }
    fn deliver(&self, d: Delivery) {
        self.got.lock().unwrap().push(d);
    }
    fn cancelled(&self, _q: &QueueName, _c: ConsumerId) {
        self.cancelled.store(true, Ordering::SeqCst);
    }
}

use crate::queue::QueueName;

fn consumer(sink: Arc<Collect>, conn: ConnectionId) -> ConsumerSpec {
    ConsumerSpec {
        tag: s("ctag"),
        owner: OwnerId(conn.0),
        connection: conn,
        prefetch: 0,
        no_ack: false,
        exclusive: false,
        priority: 0,
        sink,
    }
}

#[test]
fn predeclared_exchanges_exist_with_their_types() {
    let v = vhost();
    for (name, kind) in PREDECLARED {
        assert_eq!(v.exchange(name).unwrap().kind(), *kind, "{name}");
    }
}

#[test]
fn default_exchange_routes_by_queue_name_and_refuses_binding() {
    let v = vhost();
    v.declare_queue(queue("jobs"), 0).unwrap();
    assert_eq!(publish(&v, "", msg("jobs", "a")).routed, 1);
    assert_eq!(publish(&v, "", msg("nothing", "a")).routed, 0);
    assert_eq!(ready(&v, "jobs"), 1);
    let err = v.bind_queue(&s("jobs"), &s(""), BindingKey::new("x"), C1).unwrap_err();
    assert!(matches!(err, CoreError::AccessRefused(_)), "{err:?}");
    assert!(matches!(v.declare_exchange(exchange("", "direct")).unwrap_err(), CoreError::AccessRefused(_)));
    assert!(matches!(v.delete_exchange(&s(""), false).unwrap_err(), CoreError::AccessRefused(_)));
}

#[test]
fn default_exchange_skips_the_queues_the_installed_policy_reserves() {
    let b = Broker::new(Arc::new(MemoryStore::new()));
    let v = b.vhost("/").unwrap();
    v.declare_queue(queue("own.c1"), 0).unwrap();
    v.declare_queue(queue("jobs"), 0).unwrap();
    assert_eq!(publish(&v, "", msg("own.c1", "a")).routed, 1, "nothing reserved before a policy is installed");
    // Installed after the vhost exists, as the server does after recovery (and on a reload).
    b.set_access(crate::permissions::AccessPolicy {
        topic_policy: Arc::new(crate::policy::testing::OwnKeys),
        ..crate::permissions::AccessPolicy::default()
    });
    assert_eq!(publish(&v, "", msg("own.c1", "b")).routed, 0);
    assert_eq!(publish(&v, "", msg("jobs", "c")).routed, 1);
    assert_eq!(ready(&v, "own.c1"), 1);
    // Other verbs ask the broker, which answers with the policy's text.
    assert_eq!(
        b.reserved_queue_refusal("/", b"own.c1", crate::policy::QueueUse::Publish).as_deref(),
        Some("cannot publish to 'own.c1' in '/'")
    );
    assert_eq!(b.reserved_queue_refusal("/", b"jobs", crate::policy::QueueUse::Publish), None);
    let created_after = b.add_vhost("other");
    created_after.declare_queue(queue("own.c2"), 0).unwrap();
    assert_eq!(publish(&created_after, "", msg("own.c2", "d")).routed, 0);
}

#[test]
fn amq_prefix_is_reserved_but_predeclared_ones_may_be_redeclared() {
    let v = vhost();
    assert!(matches!(v.declare_exchange(exchange("amq.custom", "direct")).unwrap_err(), CoreError::AccessRefused(_)));
    v.declare_exchange(exchange("amq.topic", "topic")).unwrap();
    assert!(matches!(
        v.declare_exchange(exchange("amq.topic", "direct")).unwrap_err(),
        CoreError::PreconditionFailed(_)
    ));
    assert!(matches!(v.delete_exchange(&s("amq.direct"), false).unwrap_err(), CoreError::AccessRefused(_)));
    assert!(matches!(v.declare_queue(queue("amq.q"), 0).unwrap_err(), CoreError::AccessRefused(_)));
}

#[test]
fn unknown_exchange_type_is_a_precondition_failure() {
    let v = vhost();
    let err = v.declare_exchange(exchange("x", "x-consistent-hash")).unwrap_err();
    assert_eq!(err, CoreError::PreconditionFailed("invalid exchange type 'x-consistent-hash'".into()));
}

#[test]
fn exchange_redeclare_must_be_equivalent() {
    let v = vhost();
    v.declare_exchange(exchange("logs", "fanout")).unwrap();
    v.declare_exchange(exchange("logs", "fanout")).unwrap();
    let mut d = exchange("logs", "fanout");
    d.options.durable = false;
    let err = v.declare_exchange(d).unwrap_err();
    assert_eq!(
        err,
        CoreError::PreconditionFailed(
            "inequivalent arg 'durable' for exchange 'logs' in vhost '/': received 'false' but current is 'true'"
                .into()
        )
    );
    let mut d = exchange("logs", "fanout");
    d.options.arguments = arguments(&[("alternate-exchange", FieldValue::string("ae"))]);
    assert!(matches!(v.declare_exchange(d).unwrap_err(), CoreError::PreconditionFailed(_)));
}

#[test]
fn passive_declare_checks_existence() {
    let v = vhost();
    let mut d = exchange("nope", "direct");
    d.passive = true;
    assert_eq!(v.declare_exchange(d).unwrap_err(), CoreError::NotFound("no exchange 'nope' in vhost '/'".into()));
    let mut q = queue("nope");
    q.passive = true;
    assert_eq!(v.declare_queue(q, 0).unwrap_err(), CoreError::NotFound("no queue 'nope' in vhost '/'".into()));
    v.declare_queue(queue("yes"), 0).unwrap();
    let mut q = queue("yes");
    q.passive = true;
    q.options.durable = false; // passive ignores the other fields
    assert!(!v.declare_queue(q, 0).unwrap().created);
}

#[test]
fn the_default_exchange_cannot_be_declared_even_passively() {
    let v = vhost();
    for (kind, passive) in [("direct", true), ("direct", false), ("fanout", false), ("bogus", true), ("bogus", false)] {
        let mut d = exchange("", kind);
        d.passive = passive;
        assert_eq!(
            v.declare_exchange(d).unwrap_err(),
            CoreError::AccessRefused("operation not permitted on the default exchange".into()),
            "{kind} passive={passive}"
        );
    }
    let mut d = exchange("amq.direct", "");
    d.passive = true;
    v.declare_exchange(d).expect("a predeclared exchange passes a passive declare");
}

#[test]
fn unbinding_from_or_to_a_missing_exchange_or_queue_succeeds() {
    let v = vhost();
    let mut d = exchange("ad", "direct");
    d.options.auto_delete = true;
    v.declare_exchange(d.clone()).unwrap();
    v.declare_exchange(exchange("dest", "fanout")).unwrap();
    v.declare_queue(queue("q"), 0).unwrap();
    v.bind_exchange(&s("dest"), &s("ad"), BindingKey::new("k")).unwrap();
    v.unbind_exchange(&s("dest"), &s("ad"), BindingKey::new("k")).unwrap();
    assert!(v.exchange("ad").is_none(), "the auto-delete cascade removed the source");
    // The same unbind again, idempotent, and every other missing combination.
    v.unbind_exchange(&s("dest"), &s("ad"), BindingKey::new("k")).unwrap();
    v.unbind_exchange(&s("gone"), &s("amq.direct"), BindingKey::new("k")).unwrap();
    v.unbind_exchange(&s("gone"), &s("gone-too"), BindingKey::new("k")).unwrap();
    v.declare_exchange(d).unwrap();
    v.bind_queue(&s("q"), &s("ad"), BindingKey::new("k"), C1).unwrap();
    v.unbind_queue(&s("q"), &s("ad"), BindingKey::new("k"), C1).unwrap();
    assert!(v.exchange("ad").is_none());
    v.unbind_queue(&s("q"), &s("ad"), BindingKey::new("k"), C1).unwrap();
    v.unbind_queue(&s("no-queue"), &s("amq.direct"), BindingKey::new("k"), C1).unwrap();
    v.unbind_queue(&s("no-queue"), &s("no-exchange"), BindingKey::new("k"), C1).unwrap();
    // The default exchange is still refused, and an exclusive queue still belongs to its owner.
    for e in [
        v.unbind_queue(&s("q"), &s(""), BindingKey::new("q"), C1).unwrap_err(),
        v.unbind_exchange(&s(""), &s("amq.direct"), BindingKey::new("k")).unwrap_err(),
        v.unbind_exchange(&s("amq.fanout"), &s(""), BindingKey::new("k")).unwrap_err(),
    ] {
        assert!(matches!(e, CoreError::AccessRefused(_)), "{e:?}");
    }
    let mut mine = queue("mine");
    mine.options.exclusive = Some(C1);
    v.declare_queue(mine, 0).unwrap();
    let e = v.unbind_queue(&s("mine"), &s("amq.direct"), BindingKey::new("k"), C2).unwrap_err();
    assert!(matches!(e, CoreError::ResourceLocked(_)), "{e:?}");
}

#[test]
fn exchange_delete_if_unused_and_missing_exchange_is_fine() {
    let v = vhost();
    v.declare_exchange(exchange("x", "direct")).unwrap();
    v.declare_queue(queue("q"), 0).unwrap();
    v.bind_queue(&s("q"), &s("x"), BindingKey::new("k"), C1).unwrap();
    assert!(matches!(v.delete_exchange(&s("x"), true).unwrap_err(), CoreError::PreconditionFailed(_)));
    v.delete_exchange(&s("x"), false).unwrap();
    assert!(v.exchange("x").is_none());
    v.delete_exchange(&s("x"), false).unwrap();
}

#[test]
fn internal_exchange_refuses_publish_but_routes_via_exchange_binding() {
    let v = vhost();
    let mut d = exchange("inner", "fanout");
    d.options.internal = true;
    v.declare_exchange(d).unwrap();
    v.declare_exchange(exchange("outer", "direct")).unwrap();
    v.declare_queue(queue("q"), 0).unwrap();
    v.bind_queue(&s("q"), &s("inner"), BindingKey::new(""), C1).unwrap();
    v.bind_exchange(&s("inner"), &s("outer"), BindingKey::new("k")).unwrap();
    assert!(matches!(v.publish(&s("inner"), msg("k", "x"), 0).unwrap_err(), CoreError::AccessRefused(_)));
    assert_eq!(publish(&v, "outer", msg("k", "x")).routed, 1);
    assert_eq!(publish(&v, "outer", msg("other", "x")).routed, 0);
    assert_eq!(ready(&v, "q"), 1);
}

#[test]
fn exchange_binding_cycles_deliver_once() {
    let v = vhost();
    v.declare_exchange(exchange("a", "fanout")).unwrap();
    v.declare_exchange(exchange("b", "fanout")).unwrap();
    v.declare_queue(queue("q"), 0).unwrap();
    v.bind_exchange(&s("b"), &s("a"), BindingKey::new("")).unwrap();
    v.bind_exchange(&s("a"), &s("b"), BindingKey::new("")).unwrap();
    v.bind_queue(&s("q"), &s("a"), BindingKey::new(""), C1).unwrap();
    v.bind_queue(&s("q"), &s("b"), BindingKey::new(""), C1).unwrap();
    assert_eq!(publish(&v, "a", msg("", "x")).routed, 1);
    assert_eq!(ready(&v, "q"), 1);
}

#[test]
fn a_queue_matched_by_several_bindings_gets_one_copy() {
    let v = vhost();
    v.declare_queue(queue("q"), 0).unwrap();
    v.bind_queue(&s("q"), &s("amq.topic"), BindingKey::new("a.*"), C1).unwrap();
    v.bind_queue(&s("q"), &s("amq.topic"), BindingKey::new("#"), C1).unwrap();
    assert_eq!(publish(&v, "amq.topic", msg("a.b", "x")).routed, 1);
    assert_eq!(ready(&v, "q"), 1);
}

#[test]
fn alternate_exchange_takes_unroutable_messages() {
    let v = vhost();
    v.declare_exchange(exchange("ae", "fanout")).unwrap();
    let mut d = exchange("main", "direct");
    d.options.arguments = arguments(&[("alternate-exchange", FieldValue::string("ae"))]);
    v.declare_exchange(d).unwrap();
    v.declare_queue(queue("routed"), 0).unwrap();
    v.declare_queue(queue("unrouted"), 0).unwrap();
    v.bind_queue(&s("routed"), &s("main"), BindingKey::new("k"), C1).unwrap();
    v.bind_queue(&s("unrouted"), &s("ae"), BindingKey::new(""), C1).unwrap();
    publish(&v, "main", msg("k", "1"));
    publish(&v, "main", msg("other", "2"));
    assert_eq!((ready(&v, "routed"), ready(&v, "unrouted")), (1, 1));
    // A missing alternate exchange leaves the message unroutable.
    let mut d = exchange("main2", "direct");
    d.options.arguments = arguments(&[("alternate-exchange", FieldValue::string("missing"))]);
    v.declare_exchange(d).unwrap();
    assert_eq!(publish(&v, "main2", msg("k", "x")).routed, 0);
    assert_eq!(v.stats().unroutable.load(Ordering::Relaxed), 1);
}

#[test]
fn publish_to_a_missing_exchange_is_not_found() {
    let v = vhost();
    assert_eq!(
        v.publish(&s("nope"), msg("k", "x"), 0).unwrap_err(),
        CoreError::NotFound("no exchange 'nope' in vhost '/'".into())
    );
}

#[test]
fn server_named_queues_are_unique_amq_gen_names() {
    let v = vhost();
    let a = v.declare_queue(queue(""), 0).unwrap().queue;
    let b = v.declare_queue(queue(""), 0).unwrap().queue;
    assert!(a.name().as_str().unwrap().starts_with("amq.gen-"));
    assert_eq!(a.name().len(), "amq.gen-".len() + 22);
    assert_ne!(a.name(), b.name());
}

#[test]
fn queue_redeclare_must_be_equivalent_with_integer_widths_ignored() {
    let v = vhost();
    let mut d = queue("q");
    d.options.arguments = arguments(&[("x-message-ttl", FieldValue::I32(1000))]);
    v.declare_queue(d, 0).unwrap();
    let mut d = queue("q");
    d.options.arguments = arguments(&[("x-message-ttl", FieldValue::I64(1000))]);
    v.declare_queue(d, 0).unwrap();
    let mut d = queue("q");
    d.options.arguments = arguments(&[("x-message-ttl", FieldValue::I64(2000))]);
    assert_eq!(
        v.declare_queue(d, 0).unwrap_err(),
        CoreError::PreconditionFailed(
            "inequivalent arg 'x-message-ttl' for queue 'q' in vhost '/': received '2000' but current is '1000'".into()
        )
    );
    let mut d = queue("q");
    d.options.durable = false;
    assert!(matches!(v.declare_queue(d, 0).unwrap_err(), CoreError::PreconditionFailed(_)));
}

#[test]
fn invalid_queue_arguments_are_refused() {
    let v = vhost();
    let mut d = queue("q");
    d.options.arguments = arguments(&[("x-message-ttl", FieldValue::I32(-1))]);
    assert!(matches!(v.declare_queue(d, 0).unwrap_err(), CoreError::PreconditionFailed(_)));
    assert!(v.queue("q").is_none());
}

#[test]
fn exclusive_queues_are_locked_to_their_connection_and_go_with_it() {
    let v = vhost();
    let mut d = queue("mine");
    d.options.exclusive = Some(C1);
    v.declare_queue(d, 0).unwrap();
    let locked = |r: Result<_, CoreError>| matches!(r, Err(CoreError::ResourceLocked(_)));
    let mut other = queue("mine");
    other.connection = C2;
    other.options.exclusive = Some(C2);
    assert!(locked(v.declare_queue(other, 0).map(|_| ())));
    assert!(locked(v.bind_queue(&s("mine"), &s("amq.direct"), BindingKey::new("k"), C2)));
    assert!(locked(v.delete_queue(&s("mine"), C2, false, false, 0).map(|_| ())));
    assert!(locked(v.purge_queue(&s("mine"), C2, 0).map(|_| ())));
    assert!(locked(v.consume(&s("mine"), consumer(Arc::default(), C2), 0).map(|_| ())));
    v.bind_queue(&s("mine"), &s("amq.direct"), BindingKey::new("k"), C1).unwrap();
    v.connection_closed(C2, 0);
    assert!(v.queue("mine").is_some());
    v.connection_closed(C1, 0);
    assert!(v.queue("mine").is_none());
    assert_eq!(publish(&v, "amq.direct", msg("k", "x")).routed, 0, "its bindings went with it");
}

#[test]
fn queue_delete_if_empty_and_if_unused_and_missing_queue_is_fine() {
    let v = vhost();
    v.declare_queue(queue("q"), 0).unwrap();
    publish(&v, "", msg("q", "x"));
    assert!(matches!(v.delete_queue(&s("q"), C1, false, true, 0).unwrap_err(), CoreError::PreconditionFailed(_)));
    v.purge_queue(&s("q"), C1, 0).unwrap();
    let sink = Arc::new(Collect::default());
    v.consume(&s("q"), consumer(sink.clone(), C1), 0).unwrap();
    assert!(matches!(v.delete_queue(&s("q"), C1, true, false, 0).unwrap_err(), CoreError::PreconditionFailed(_)));
    assert_eq!(v.delete_queue(&s("q"), C1, false, false, 0).unwrap(), 0);
    assert!(sink.cancelled.load(Ordering::SeqCst), "consumer told of the deletion");
    assert_eq!(v.delete_queue(&s("q"), C1, false, false, 0).unwrap(), 0);
}

#[test]
fn auto_delete_queue_goes_with_its_last_consumer() {
    let v = vhost();
    let mut d = queue("temp");
    d.options.auto_delete = true;
    v.declare_queue(d, 0).unwrap();
    let (q, a) = v.consume(&s("temp"), consumer(Arc::default(), C1), 0).unwrap();
    let (_, b) = v.consume(&s("temp"), consumer(Arc::default(), C1), 0).unwrap();
    v.cancel(&q, a, 0);
    assert!(v.queue("temp").is_some());
    v.cancel(&q, b, 0);
    assert!(v.queue("temp").is_none());
}

#[test]
fn auto_delete_exchange_goes_with_its_last_binding() {
    let v = vhost();
    let mut d = exchange("ad", "direct");
    d.options.auto_delete = true;
    v.declare_exchange(d).unwrap();
    v.declare_queue(queue("q1"), 0).unwrap();
    v.declare_queue(queue("q2"), 0).unwrap();
    v.bind_queue(&s("q1"), &s("ad"), BindingKey::new("k"), C1).unwrap();
    v.bind_queue(&s("q2"), &s("ad"), BindingKey::new("k"), C1).unwrap();
    v.unbind_queue(&s("q1"), &s("ad"), BindingKey::new("k"), C1).unwrap();
    assert!(v.exchange("ad").is_some());
    v.delete_queue(&s("q2"), C1, false, false, 0).unwrap();
    assert!(v.exchange("ad").is_none(), "deleting the last bound queue removes it");
}

#[test]
fn rejected_messages_are_dead_lettered_through_the_dlx() {
    let v = vhost();
    v.declare_exchange(exchange("dlx", "direct")).unwrap();
    v.declare_queue(queue("dead"), 0).unwrap();
    v.bind_queue(&s("dead"), &s("dlx"), BindingKey::new("failed"), C1).unwrap();
    let mut d = queue("work");
    d.options.arguments = arguments(&[
        ("x-dead-letter-exchange", FieldValue::string("dlx")),
        ("x-dead-letter-routing-key", FieldValue::string("failed")),
    ]);
    v.declare_queue(d, 0).unwrap();
    publish(&v, "", msg("work", "job"));
    let sink = Arc::new(Collect::default());
    let (q, _) = v.consume(&s("work"), consumer(sink.clone(), C1), 0).unwrap();
    let seq = sink.got.lock().unwrap()[0].seq;
    let effects = q.reject(seq, false, 2_000).unwrap();
    v.settle(&q, effects, 2_000);
    assert_eq!(ready(&v, "dead"), 1);
    let dq = v.queue("dead").unwrap();
    let (d, _) = dq.get(OwnerId(9), true, 2_000).0.unwrap();
    assert_eq!(&d.message.payload[..], b"job");
    assert_eq!(d.message.routing_key, "failed");
    let death = d.message.properties.header("x-death").expect("x-death set");
    assert!(matches!(death, FieldValue::Array(a) if a.len() == 1));
}

#[test]
fn expired_queues_are_deleted_by_tick() {
    let v = vhost();
    let mut d = queue("idle");
    d.options.arguments = arguments(&[("x-expires", FieldValue::I32(500))]);
    v.declare_queue(d, 1_000).unwrap();
    v.tick(1_400);
    assert!(v.queue("idle").is_some());
    v.tick(1_600);
    assert!(v.queue("idle").is_none());
}

#[test]
fn message_ttl_dead_letters_on_tick() {
    let v = vhost();
    v.declare_queue(queue("expired"), 0).unwrap();
    let mut d = queue("delay");
    d.options.arguments =
        arguments(&[("x-message-ttl", FieldValue::I32(100)), ("x-dead-letter-exchange", FieldValue::string(""))]);
    d.options.arguments.insert("x-dead-letter-routing-key", FieldValue::string("expired"));
    v.declare_queue(d, 0).unwrap();
    v.publish(&s(""), msg("delay", "x"), 1_000).unwrap();
    assert_eq!(v.tick(1_050), Some(1_100));
    v.tick(1_100);
    assert_eq!((ready(&v, "delay"), ready(&v, "expired")), (0, 1));
}

#[test]
fn a_ttl_that_ran_out_while_the_broker_was_down_dead_letters_at_the_first_expiry() {
    let store: Arc<MemoryStore> = Arc::new(MemoryStore::new());
    {
        let b = Broker::new(store.clone());
        let v = b.vhost("/").unwrap();
        v.declare_queue(queue("expired"), 0).unwrap();
        let mut d = queue("ttl");
        d.options.arguments =
            arguments(&[("x-message-ttl", FieldValue::I32(2000)), ("x-dead-letter-exchange", FieldValue::string(""))]);
        d.options.arguments.insert("x-dead-letter-routing-key", FieldValue::string("expired"));
        v.declare_queue(d, 0).unwrap();
        v.publish(&s(""), persistent("ttl", "gone").at(1_000), 1_000).unwrap();
        v.publish(&s(""), persistent("ttl", "left").at(2_000), 2_000).unwrap();
    }
    // Down from 2 000 to 3 500: "gone" (deadline 3 000) ran out meanwhile, "left" has 500 ms.
    let b = Broker::recover(store, 3_500).unwrap();
    let v = b.vhost("/").unwrap();
    assert_eq!(b.expire(3_500), Some(4_000), "the survivor's deadline counts from its publish");
    assert_eq!((ready(&v, "ttl"), ready(&v, "expired")), (1, 1));
    assert_eq!(b.expire(3_999), Some(4_000));
    assert_eq!(ready(&v, "ttl"), 1);
    b.expire(4_000);
    assert_eq!((ready(&v, "ttl"), ready(&v, "expired")), (0, 2));
}

fn sink_ref(sink: &Arc<DirectSink>, cookie: u64) -> SinkRef {
    SinkRef { sink: sink.clone(), cookie }
}

#[test]
fn direct_sinks_get_one_copy_with_every_matching_cookie() {
    let v = vhost();
    let sink = DirectSink::new(Outbox::new(16));
    let mqtt = |levels| BindingKey::new("pattern").with_pattern(Pattern { levels, dollar_rule: true });
    let lit = |w: &str| Level::Literal(w.into());
    v.bind_sink(&s("amq.topic"), mqtt(vec![lit("farm"), Level::One, lit("soil")]), sink_ref(&sink, 1)).unwrap();
    v.bind_sink(&s("amq.topic"), mqtt(vec![lit("farm"), Level::Many]), sink_ref(&sink, 2)).unwrap();
    v.bind_sink(&s("amq.topic"), mqtt(vec![Level::Many]), sink_ref(&sink, 3)).unwrap();
    assert_eq!(publish(&v, "amq.topic", msg("farm.7.soil", "x")).routed, 1);
    assert_eq!(publish(&v, "amq.topic", msg("$SYS.uptime", "x")).routed, 0, "the $ rule");
    let mut out = Vec::new();
    sink.outbox().drain_into(&mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].cookies.as_slice(), &[1, 2, 3]);
    v.unbind_sink_all(&s("amq.topic"), &sink, []);
    assert_eq!(publish(&v, "amq.topic", msg("farm.7.soil", "x")).routed, 0);
}

/// A sink's bindings that the topic trie alone keeps (MQTT's, whose keys spell their
/// patterns) go by the keys given; the indexed ones by owner, in every exchange.
#[test]
fn unbinding_a_sink_takes_its_keys_and_its_indexed_bindings() {
    let v = vhost();
    let sink = DirectSink::new(Outbox::new(16));
    let spelled = |key: &str| BindingKey::new(key).with_pattern(Pattern::parse_amqp(key).with_dollar_rule(true));
    v.bind_sink(&s("amq.topic"), spelled("devices.d1.cmd"), sink_ref(&sink, 1)).unwrap();
    v.bind_sink(&s("amq.topic"), spelled("devices.d1.#"), sink_ref(&sink, 2)).unwrap();
    v.bind_sink(&s("amq.fanout"), BindingKey::new(""), sink_ref(&sink, 3)).unwrap();
    let topic = v.exchange("amq.topic").unwrap();
    assert_eq!(topic.binding_count(), 2);
    v.unbind_sink_all(&s("amq.topic"), &sink, [(spelled("devices.d1.cmd"), 1), (spelled("devices.d1.#"), 2)]);
    assert_eq!(topic.binding_count(), 0);
    assert_eq!(v.exchange("amq.fanout").unwrap().binding_count(), 0);
    assert_eq!(publish(&v, "amq.topic", msg("devices.d1.cmd", "x")).routed, 0);
    assert_eq!(Arc::strong_count(&sink), 1, "no route holds the sink");
}

#[test]
fn a_full_sink_reports_congestion_then_drops_and_the_vhost_counts_it() {
    let v = vhost();
    let sink = DirectSink::new(Outbox::new(1));
    v.bind_sink(&s("amq.fanout"), BindingKey::new(""), sink_ref(&sink, 1)).unwrap();
    assert!(publish(&v, "amq.fanout", msg("", "1")).congested.is_empty());
    let second = publish(&v, "amq.fanout", msg("", "2"));
    assert_eq!(second.congested.len(), 1, "the publisher is told to wait");
    assert!(second.congested[0].is_outbox(sink.outbox()));
    publish(&v, "amq.fanout", msg("", "3"));
    let dropped = || v.stats().dropped_at_sinks.load(Ordering::Relaxed);
    assert_eq!(dropped(), 1);
    let durable = publish(&v, "amq.fanout", persistent("", "4"));
    assert_eq!((dropped(), durable.congested.len()), (1, 1), "persistent messages are never dropped");
    assert_eq!(sink.outbox().len(), 3);
}

#[test]
fn persistent_messages_in_durable_queues_reach_the_store_and_leave_on_ack() {
    let store = Arc::new(MemoryStore::new());
    let v = VHost::new("/", store.clone());
    v.declare_queue(queue("durable"), 0).unwrap();
    let mut t = queue("transient");
    t.options.durable = false;
    v.declare_queue(t, 0).unwrap();
    v.declare_exchange(exchange("fan", "fanout")).unwrap();
    v.bind_queue(&s("durable"), &s("fan"), BindingKey::new(""), C1).unwrap();
    v.bind_queue(&s("transient"), &s("fan"), BindingKey::new(""), C1).unwrap();
    publish(&v, "fan", persistent("", "p"));
    publish(&v, "fan", msg("", "t"));
    assert_eq!(store.message_count("/", "durable"), 1);
    assert_eq!(store.message_count("/", "transient"), 0);
    let q = v.queue("durable").unwrap();
    let (d, _) = q.get(OwnerId(1), false, 0).0.unwrap();
    let effects = q.ack(d.seq, 0).unwrap();
    v.settle(&q, effects, 0);
    assert_eq!(store.message_count("/", "durable"), 0);
}

#[test]
fn retained_messages_are_kept_cleared_and_stored() {
    let store = Arc::new(MemoryStore::new());
    let v = VHost::new("/", store.clone());
    v.set_retained(&s("a.b"), Arc::new(msg("a.b", "21.5")));
    assert_eq!(store.recover().unwrap().retained.len(), 1);
    v.set_retained(&s("a.b"), Arc::new(msg("a.b", "")));
    assert!(v.retained().get("a.b").is_none());
    assert!(store.recover().unwrap().retained.is_empty());
}

#[test]
fn durable_objects_come_back_after_a_restart() {
    let store: Arc<MemoryStore> = Arc::new(MemoryStore::new());
    {
        let b = Broker::new(store.clone());
        let v = b.vhost("/").unwrap();
        v.declare_exchange(exchange("orders", "topic")).unwrap();
        let mut te = exchange("scratch", "topic");
        te.options.durable = false;
        v.declare_exchange(te).unwrap();
        v.declare_queue(queue("payments"), 0).unwrap();
        let mut tq = queue("tmp");
        tq.options.durable = false;
        v.declare_queue(tq, 0).unwrap();
        v.bind_queue(&s("payments"), &s("orders"), BindingKey::new("order.*"), C1).unwrap();
        v.bind_queue(&s("tmp"), &s("orders"), BindingKey::new("#"), C1).unwrap();
        v.set_retained(&s("a.b"), Arc::new(msg("a.b", "r")));
    }
    let b = Broker::recover(store, 1_000).unwrap();
    let v = b.vhost("/").unwrap();
    assert!(v.exchange("orders").is_some());
    assert!(v.exchange("scratch").is_none());
    assert!(v.queue("payments").is_some());
    assert!(v.queue("tmp").is_none());
    assert_eq!(publish(&v, "orders", msg("order.created", "x")).routed, 1);
    assert!(v.retained().get("a.b").is_some());
}

#[test]
fn persistent_messages_come_back_in_order_those_delivered_marked_redelivered() {
    let store: Arc<MemoryStore> = Arc::new(MemoryStore::new());
    {
        let b = Broker::new(store.clone());
        let v = b.vhost("/").unwrap();
        v.declare_queue(queue("q"), 0).unwrap();
        for body in ["1", "2", "3"] {
            publish(&v, "", persistent("q", body));
        }
        publish(&v, "", msg("q", "transient"));
        let q = v.queue("q").unwrap();
        // "1" delivered and acked: gone. "2" delivered, not acked: redelivered after the restart.
        let (got, effects) = q.get(OwnerId(1), false, 0);
        v.settle(&q, effects, 0);
        let effects = q.ack(got.unwrap().0.seq, 0).unwrap();
        v.settle(&q, effects, 0);
        let (got, effects) = q.get(OwnerId(1), false, 0);
        assert_eq!(&got.unwrap().0.message.payload[..], b"2");
        v.settle(&q, effects, 0);
    }
    let b = Broker::recover(store, 1_000).unwrap();
    let v = b.vhost("/").unwrap();
    let q = v.queue("q").unwrap();
    assert_eq!(q.stats().ready, 2);
    let (d, left) = q.get(OwnerId(1), true, 0).0.unwrap();
    assert_eq!((&d.message.payload[..], d.redelivered, left), (&b"2"[..], true, 1));
    // New messages are numbered after the recovered ones and come after them.
    publish(&v, "", persistent("q", "4"));
    let (d, _) = q.get(OwnerId(1), true, 0).0.unwrap();
    assert_eq!((&d.message.payload[..], d.redelivered), (&b"3"[..], false));
    let (d, _) = q.get(OwnerId(1), true, 0).0.unwrap();
    assert_eq!(&d.message.payload[..], b"4");
}

#[test]
fn a_block_queue_holds_the_commit_of_a_waiting_publisher_and_refuses_one_that_waits_for_nothing() {
    let v = vhost();
    let mut d = queue("q");
    d.options.arguments =
        arguments(&[("x-max-length", FieldValue::I32(1)), ("x-overflow", FieldValue::string("block"))]);
    v.declare_queue(d, 0).unwrap();
    let first = v.publish_waiting(&s(""), persistent("q", "1"), 0, true).unwrap();
    assert!(!first.rejected);
    assert_eq!(first.commit.try_result(), Some(Ok(())), "within the limit: only the store's commit");
    let mut held = v.publish_waiting(&s(""), persistent("q", "2"), 0, true).unwrap();
    assert!(!held.rejected, "taken past the limit");
    assert!(!held.commit.try_resolve(), "its acknowledgement waits for room");
    let refused = v.publish(&s(""), persistent("q", "3"), 0).unwrap();
    assert!(refused.rejected, "a publisher that waits for nothing is refused");
    assert_eq!((ready(&v, "q"), v.queue("q").unwrap().stats().rejected_overflow), (2, 1));
    v.purge_queue(&s("q"), C1, 0).unwrap();
    assert!(held.commit.try_resolve());
    assert_eq!(held.commit.try_result(), Some(Ok(())));
}

#[test]
fn deleting_a_block_queue_releases_its_held_publishers() {
    let v = vhost();
    let mut d = queue("q");
    d.options.arguments =
        arguments(&[("x-max-length", FieldValue::I32(0)), ("x-overflow", FieldValue::string("block"))]);
    v.declare_queue(d, 0).unwrap();
    let mut held = v.publish_waiting(&s(""), msg("q", "1"), 0, true).unwrap();
    assert!(!held.commit.try_resolve());
    assert_eq!(v.delete_queue(&s("q"), C1, false, false, 0).unwrap(), 1);
    assert!(held.commit.try_resolve());
    assert_eq!(held.commit.try_result(), Some(Ok(())));
}

#[test]
fn a_queue_longer_than_the_recovery_window_comes_back_whole_and_in_order() {
    let store: Arc<MemoryStore> = Arc::new(MemoryStore::new());
    let n = crate::store::RECOVER_WINDOW as usize + 100;
    {
        let b = Broker::new(store.clone());
        let v = b.vhost("/").unwrap();
        v.declare_queue(queue("q"), 0).unwrap();
        for _ in 0..n {
            publish(&v, "", persistent("q", "m"));
        }
    }
    let b = Broker::recover(store, 1_000).unwrap();
    let v = b.vhost("/").unwrap();
    assert_eq!(ready(&v, "q") as usize, n);
    let q = v.queue("q").unwrap();
    assert_eq!(q.stats().paged_out, 100);
    let mut last = 0;
    // Through the vhost: a get with nothing in memory reads the tail back first.
    for _ in 0..n {
        let got = v.get(&q, OwnerId(1), true, 1_000);
        let seq = got.expect("a message").0.seq;
        assert!(seq > last);
        last = seq;
    }
    assert!(v.get(&q, OwnerId(1), true, 1_000).is_none());
}

#[test]
fn a_transient_message_paged_out_is_stored_deleted_when_consumed_and_not_restored() {
    let store: Arc<MemoryStore> = Arc::new(MemoryStore::new());
    let w = crate::queue::PAGE_WINDOW as usize;
    {
        let b = Broker::new(store.clone());
        let v = b.vhost("/").unwrap();
        v.declare_queue(queue("q"), 0).unwrap();
        for _ in 0..w {
            publish(&v, "", persistent("q", "p"));
        }
        publish(&v, "", msg("q", "t1"));
        publish(&v, "", msg("q", "t2"));
        assert_eq!(store.message_count("/", "q"), w + 2);
        let q = v.queue("q").unwrap();
        // Purging takes the tail with one range delete.
        assert_eq!(v.purge_queue(&s("q"), C1, 0).unwrap() as usize, w + 2);
        assert_eq!(store.message_count("/", "q"), 0);
        for _ in 0..w {
            publish(&v, "", persistent("q", "p"));
        }
        publish(&v, "", msg("q", "t3"));
        publish(&v, "", persistent("q", "last"));
        // Take one of the window and ack it: the tail stays on disk.
        let (d, _) = v.get(&q, OwnerId(1), false, 0).unwrap();
        let effects = q.ack(d.seq, 0).unwrap();
        v.settle(&q, effects, 0);
        assert_eq!(store.message_count("/", "q"), w + 1);
    }
    let b = Broker::recover(store.clone(), 1_000).unwrap();
    let v = b.vhost("/").unwrap();
    // The transient message is gone; "last" still comes after the rest.
    assert_eq!(ready(&v, "q") as usize, w);
    let q = v.queue("q").unwrap();
    let mut bodies = Vec::new();
    while let Some((d, _)) = v.get(&q, OwnerId(1), true, 1_000) {
        bodies.push(String::from_utf8(d.message.payload.to_vec()).unwrap());
    }
    assert_eq!(bodies.len(), w);
    assert_eq!(bodies.last().unwrap(), "last");
    assert_eq!(store.message_count("/", "q"), 0);
}

fn xmsg(x: &str, key: &str, body: &'static str) -> Message {
    Message::new(x, key, Bytes::from_static(body.as_bytes()))
}

/// A publisher's cached exchange is used while it is in the vhost, and looked up again once it
/// is deleted: a message must not go through the removed one's bindings.
#[test]
fn a_cached_exchange_is_looked_up_again_once_deleted() {
    let v = vhost();
    for q in ["old", "new"] {
        v.declare_queue(queue(q), 0).unwrap();
    }
    v.declare_exchange(exchange("x", "fanout")).unwrap();
    v.bind_queue(&s("old"), &s("x"), BindingKey::new(""), C1).unwrap();
    let mut cache = None;
    let o = v.publish_cached(&mut cache, xmsg("x", "k", "1"), 1_000, false).unwrap();
    assert_eq!((o.routed, ready(&v, "old")), (1, 1));
    let first = cache.clone().expect("cached");
    v.publish_cached(&mut cache, xmsg("x", "k", "2"), 1_000, false).unwrap();
    assert!(Arc::ptr_eq(&first, cache.as_ref().unwrap()), "the same exchange, not looked up again");
    assert_eq!(ready(&v, "old"), 2);

    v.delete_exchange(&s("x"), false).unwrap();
    assert!(first.is_removed());
    let err = v.publish_cached(&mut cache, xmsg("x", "k", "3"), 1_000, false).unwrap_err();
    assert!(matches!(err, CoreError::NotFound(_)), "{err:?}");

    v.declare_exchange(exchange("x", "fanout")).unwrap();
    v.bind_queue(&s("new"), &s("x"), BindingKey::new(""), C1).unwrap();
    v.publish_cached(&mut cache, xmsg("x", "k", "4"), 1_000, false).unwrap();
    assert_eq!((ready(&v, "old"), ready(&v, "new")), (2, 1), "through the new exchange only");
    // Another name is looked up, not taken from the cache.
    v.publish_cached(&mut cache, xmsg("", "old", "5"), 1_000, false).unwrap();
    assert_eq!(ready(&v, "old"), 3);
}
