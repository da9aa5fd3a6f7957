"""AMQP 0-9-1 interop cases driven by pika, against a running Ferry.

Usage: python3 interop_amqp.py HOST PORT
Prints one line per case, "ok   <case>" or "FAIL <case>: <why>", and exits with the number of
failed cases. Every wait is bounded.
"""

import sys
import time
import uuid

import pika
from pika.exceptions import ChannelClosedByBroker, UnroutableError, NackError

from interop_case import case, finish

HOST = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 5672


def connect():
    return pika.BlockingConnection(
        pika.ConnectionParameters(HOST, PORT, heartbeat=30, blocked_connection_timeout=10, socket_timeout=10)
    )


def name(prefix):
    return f"interop.{prefix}.{uuid.uuid4().hex[:8]}"


def drain(ch, queue, n, timeout=5.0):
    got = []
    deadline = time.time() + timeout
    while len(got) < n and time.time() < deadline:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.02)
            continue
        got.append((props, body))
    return got


@case("pika: publish with confirms, consume with manual acks")
def confirms_and_acks():
    conn = connect()
    ch = conn.channel()
    ch.confirm_delivery()
    q = name("work")
    ch.queue_declare(q, durable=True)
    for i in range(20):
        ch.basic_publish("", q, f"m{i}".encode(), pika.BasicProperties(delivery_mode=2))
    ch.basic_qos(prefetch_count=5)
    got = []
    for method, props, body in ch.consume(q, inactivity_timeout=2):
        if method is None:
            break
        got.append(body)
        ch.basic_ack(method.delivery_tag)
        if len(got) == 20:
            break
    ch.cancel()
    assert got == [f"m{i}".encode() for i in range(20)], got
    assert ch.queue_declare(q, passive=True).method.message_count == 0
    ch.queue_delete(q)
    conn.close()


@case("pika: a mandatory publish nobody can take comes back (basic.return 312)")
def mandatory_return():
    conn = connect()
    ch = conn.channel()
    ch.confirm_delivery()
    try:
        ch.basic_publish("amq.direct", name("nowhere"), b"x", mandatory=True)
        raise AssertionError("no basic.return")
    except UnroutableError as e:
        assert e.messages[0].method.reply_code == 312, e.messages[0].method
    conn.close()


@case("pika: topic and headers exchanges route, exchange-to-exchange bindings too")
def routing():
    conn = connect()
    ch = conn.channel()
    x, hx, e2e = name("topic"), name("headers"), name("e2e")
    ch.exchange_declare(x, "topic")
    ch.exchange_declare(hx, "headers")
    ch.exchange_declare(e2e, "fanout")
    ch.exchange_bind(destination=x, source=e2e)
    q1 = ch.queue_declare("", exclusive=True).method.queue
    q2 = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q1, x, "farm.*.soil.#")
    ch.queue_bind(q2, hx, arguments={"x-match": "any", "zone": "north", "kind": "alarm"})
    ch.basic_publish(x, "farm.7.soil.ph", b"a")
    ch.basic_publish(x, "farm.7.air", b"no")
    ch.basic_publish(e2e, "farm.8.soil", b"b")
    ch.basic_publish(hx, "", b"h", pika.BasicProperties(headers={"zone": "north"}))
    ch.basic_publish(hx, "", b"no", pika.BasicProperties(headers={"zone": "south"}))
    assert [b for _, b in drain(ch, q1, 2)] == [b"a", b"b"]
    assert [b for _, b in drain(ch, q2, 1)] == [b"h"]
    time.sleep(0.2)  # a bounded look for stray copies
    assert ch.basic_get(q1)[0] is None and ch.basic_get(q2)[0] is None
    for e in (x, hx, e2e):
        ch.exchange_delete(e)
    conn.close()


@case("pika: reject without requeue dead-letters with x-death")
def dead_letter():
    conn = connect()
    ch = conn.channel()
    dlx, dlq, work = name("dlx"), name("dlq"), name("work")
    ch.exchange_declare(dlx, "fanout")
    ch.queue_declare(dlq)
    ch.queue_bind(dlq, dlx)
    ch.queue_declare(work, arguments={"x-dead-letter-exchange": dlx})
    ch.basic_publish("", work, b"bad")
    method, _, _ = ch.basic_get(work)
    ch.basic_reject(method.delivery_tag, requeue=False)
    got = drain(ch, dlq, 1)
    assert got and got[0][1] == b"bad", got
    death = got[0][0].headers["x-death"][0]
    assert death["reason"] == "rejected" and death["queue"] == work and death["count"] == 1, death
    for q in (dlq, work):
        ch.queue_delete(q)
    ch.exchange_delete(dlx)
    conn.close()


@case("pika: message TTL and max-length with reject-publish (publisher nack)")
def ttl_and_limits():
    conn = connect()
    ch = conn.channel()
    ch.confirm_delivery()
    q = name("limited")
    ch.queue_declare(q, arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
    ch.basic_publish("", q, b"1")
    ch.basic_publish("", q, b"2")
    try:
        ch.basic_publish("", q, b"3")
        raise AssertionError("third publish was confirmed")
    except NackError:
        pass
    t = name("ttl")
    ch.queue_declare(t, arguments={"x-message-ttl": 100})
    ch.basic_publish("", t, b"short-lived")
    time.sleep(1.5)  # the TTL must pass; housekeeping runs at least every second
    assert ch.queue_declare(t, passive=True).method.message_count == 0
    ch.queue_delete(q)
    ch.queue_delete(t)
    conn.close()


@case("pika: channel errors close only the channel (404, 406, 405)")
def channel_errors():
    conn = connect()
    ch = conn.channel()
    try:
        ch.queue_declare(name("missing"), passive=True)
        raise AssertionError("no 404")
    except ChannelClosedByBroker as e:
        assert e.reply_code == 404, e
    ch = conn.channel()
    q = name("eq")
    ch.queue_declare(q, durable=True)
    try:
        ch.queue_declare(q, durable=False)
        raise AssertionError("no 406")
    except ChannelClosedByBroker as e:
        assert e.reply_code == 406, e
    ch = conn.channel()
    mine = ch.queue_declare("", exclusive=True).method.queue
    other = connect()
    try:
        other.channel().queue_declare(mine, passive=True)
        raise AssertionError("no 405")
    except ChannelClosedByBroker as e:
        assert e.reply_code == 405, e
    other.close()
    ch.queue_delete(q)
    assert conn.is_open
    conn.close()


@case("pika: transactions commit and roll back")
def transactions():
    conn = connect()
    ch = conn.channel()
    q = name("tx")
    ch.queue_declare(q)
    ch.tx_select()
    ch.basic_publish("", q, b"rolled-back")
    ch.tx_rollback()
    ch.basic_publish("", q, b"committed")
    assert ch.queue_declare(q, passive=True).method.message_count == 0
    ch.tx_commit()
    assert [b for _, b in drain(ch, q, 1)] == [b"committed"]
    ch.queue_delete(q)
    conn.close()


@case("pika: deleting a queue cancels its consumers (consumer_cancel_notify)")
def cancel_notify():
    conn = connect()
    ch = conn.channel()
    q = name("doomed")
    ch.queue_declare(q)
    cancelled = []
    ch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
    tag = ch.basic_consume(q, lambda *a: None)
    other = connect()
    other.channel().queue_delete(q)
    other.close()
    deadline = time.time() + 5
    while not cancelled and time.time() < deadline:
        conn.process_data_events(time_limit=0.1)
    assert cancelled == [tag], cancelled
    conn.close()


@case("pika: RPC over direct reply-to (amq.rabbitmq.reply-to)")
def direct_reply_to():
    server_conn, client_conn = connect(), connect()
    sch, cch = server_conn.channel(), client_conn.channel()
    rpc = name("rpc")
    sch.queue_declare(rpc)
    replies = []
    cch.basic_consume("amq.rabbitmq.reply-to", lambda c, m, p, b: replies.append((p.correlation_id, b)), auto_ack=True)
    cch.basic_publish("", rpc, b"ping", pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id="c-1"))
    req = drain(sch, rpc, 1)
    assert req, "request did not arrive"
    props = req[0][0]
    assert props.reply_to.startswith("amq.rabbitmq.reply-to."), props.reply_to
    sch.basic_publish("", props.reply_to, b"pong", pika.BasicProperties(correlation_id=props.correlation_id))
    deadline = time.time() + 5
    while not replies and time.time() < deadline:
        client_conn.process_data_events(time_limit=0.1)
    assert replies == [("c-1", b"pong")], replies
    server_conn.close()
    client_conn.close()


finish()
