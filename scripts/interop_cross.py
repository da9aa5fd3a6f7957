"""Cross-protocol interop cases: paho-mqtt (2.x) and pika against ONE running Ferry serving MQTT
and AMQP 0-9-1 (MQTT publishes go to amq.topic; the mapping is docs/mapping.md).

Usage: python3 interop_cross.py HOST MQTT_PORT AMQP_PORT
Prints one line per case, "ok   <case>" or "FAIL <case>: <why>", and exits with the number of
failed cases. Every wait is bounded.
"""

import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pika
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from interop_case import case, finish

HOST = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
MQTT_PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 1883
AMQP_PORT = int(sys.argv[3]) if len(sys.argv) > 3 else 5672
WAIT = 10.0
QUIET = 0.5


class Mqtt:
    """A connected paho MQTT 5 client that records what it receives."""

    def __init__(self):
        self.got = []
        self.cond = threading.Condition()
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"cross-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.c.on_connect = lambda *a: self.connected.set()
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_message = self._on_message
        self.c.connect(HOST, MQTT_PORT, keepalive=30, clean_start=True)
        self.c.loop_start()
        if not self.connected.wait(WAIT):
            raise RuntimeError("no CONNACK")

    def _on_message(self, client, userdata, msg):
        with self.cond:
            self.got.append(msg)
            self.cond.notify_all()

    def subscribe(self, topic, qos=1):
        self.subscribed.clear()
        self.c.subscribe(topic, qos)
        if not self.subscribed.wait(WAIT):
            raise RuntimeError("no SUBACK")

    def wait_for(self, n):
        deadline = time.time() + WAIT
        with self.cond:
            while len(self.got) < n:
                left = deadline - time.time()
                if left <= 0:
                    raise RuntimeError(f"got {len(self.got)} of {n} messages")
                self.cond.wait(left)
        return self.got

    def publish(self, topic, payload, qos=1, retain=False, properties=None):
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(WAIT)
        if not info.is_published():
            raise RuntimeError("publish not acknowledged")

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def amqp():
    conn = pika.BlockingConnection(
        pika.ConnectionParameters(HOST, AMQP_PORT, heartbeat=30, blocked_connection_timeout=10, socket_timeout=10)
    )
    return conn, conn.channel()


def bound_queue(ch, key, exchange="amq.topic"):
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, exchange, routing_key=key)
    return q


def get(ch, queue, timeout=WAIT):
    """One message from `queue` (polled with basic.get, bounded)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is not None:
            return method, props, body
        time.sleep(0.02)
    raise RuntimeError(f"nothing arrived in {queue} within {timeout} s")


def props5(**kw):
    p = Properties(PacketTypes.PUBLISH)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def tag():
    return uuid.uuid4().hex[:8]


@case("cross: paho MQTT 5 publish -> pika consumer sees routing key, delivery mode and properties")
def mqtt_to_pika():
    t = tag()
    conn, ch = amqp()
    q = bound_queue(ch, f"cross.{t}.#")
    m = Mqtt()
    p = props5(
        ContentType="application/json",
        CorrelationData=b"req-1",
        ResponseTopic=f"replies/{t}.x",
        MessageExpiryInterval=60,
        PayloadFormatIndicator=1,
        UserProperty=[("site", "north"), ("tag", "a"), ("tag", "b")],
    )
    m.publish(f"cross/{t}/soil.temp", b'{"v":1}', qos=1, properties=p)
    method, props, body = get(ch, q)
    assert body == b'{"v":1}', body
    assert method.routing_key == f"cross.{t}.soil/temp", method.routing_key
    assert props.delivery_mode == 2, props.delivery_mode
    assert props.content_type == "application/json", props.content_type
    assert props.correlation_id == "req-1", props.correlation_id
    assert props.reply_to == f"replies.{t}/x", props.reply_to
    assert props.expiration == "60000", props.expiration
    h = props.headers or {}
    assert h.get("site") in ("north", b"north"), h
    assert [x if isinstance(x, str) else x.decode() for x in h.get("tag", [])] == ["a", "b"], h
    assert h.get("x-mqtt-payload-format") == 1, h
    m.publish(f"cross/{t}/q0", b"zero", qos=0)
    method, props, body = get(ch, q)
    assert body == b"zero" and props.delivery_mode == 1, (body, props.delivery_mode)
    m.close()
    conn.close()


@case("cross: pika publish -> paho MQTT 5 subscriber sees topic, QoS and properties")
def pika_to_mqtt():
    t = tag()
    m = Mqtt()
    m.subscribe(f"cross/{t}/#", qos=2)
    conn, ch = amqp()
    props = pika.BasicProperties(
        delivery_mode=2,
        content_type="text/plain",
        correlation_id="abc",
        reply_to=f"replies.{t}/x",
        expiration="60000",
        message_id="not-for-mqtt",
        headers={"str": "plain", "n": 5, "flag": True, "list": ["x", "y"], "table": {"k": "v"}},
    )
    ch.basic_publish("amq.topic", f"cross.{t}.a/b", b"hello", props)
    ch.basic_publish("amq.topic", f"cross.{t}.transient", b"t", pika.BasicProperties(delivery_mode=1))
    got = m.wait_for(2)
    msg = got[0]
    assert msg.topic == f"cross/{t}/a.b", msg.topic
    assert msg.payload == b"hello" and msg.qos == 1, (msg.payload, msg.qos)
    p = msg.properties
    assert p.ContentType == "text/plain", p.ContentType
    assert p.CorrelationData == b"abc", p.CorrelationData
    assert p.ResponseTopic == f"replies/{t}.x", p.ResponseTopic
    assert 0 < p.MessageExpiryInterval <= 60, p.MessageExpiryInterval
    ups = sorted(getattr(p, "UserProperty", []))
    assert ups == [("flag", "true"), ("list", "x"), ("list", "y"), ("n", "5"), ("str", "plain")], ups
    assert got[1].qos == 0, got[1].qos
    m.close()
    conn.close()


@case("cross: MQTT 5 request answered by a pika RPC service, correlation intact")
def mqtt_request_pika_rpc():
    t = tag()
    conn, ch = amqp()
    q = bound_queue(ch, f"rpc.{t}.add")
    requester = Mqtt()
    requester.subscribe(f"replies/{t}", qos=1)
    requester.publish(
        f"rpc/{t}/add", b"2+3", qos=1, properties=props5(ResponseTopic=f"replies/{t}", CorrelationData=b"\x00\x01\xff")
    )
    _, props, body = get(ch, q)
    total = sum(int(x) for x in body.decode().split("+"))
    # Binary correlation data travels in the x-correlation-data header: copy it with the headers.
    reply = pika.BasicProperties(correlation_id=props.correlation_id, headers=props.headers)
    ch.basic_publish("amq.topic", props.reply_to, str(total).encode(), reply)
    msg = requester.wait_for(1)[0]
    assert msg.topic == f"replies/{t}" and msg.payload == b"5", (msg.topic, msg.payload)
    assert msg.properties.CorrelationData == b"\x00\x01\xff", msg.properties.CorrelationData
    requester.close()
    conn.close()


@case("cross: pika direct reply-to request answered by an MQTT 5 responder")
def pika_direct_reply_to_mqtt_responder():
    t = tag()
    responder = Mqtt()
    responder.subscribe(f"svc/{t}/time", qos=1)

    def answer(client, userdata, msg):
        p = props5(CorrelationData=msg.properties.CorrelationData)
        client.publish(msg.properties.ResponseTopic, b"12:00", qos=1, properties=p)

    responder.c.on_message = answer
    conn, ch = amqp()
    replies = []
    ch.basic_consume("amq.rabbitmq.reply-to", lambda c, m, p, b: replies.append((p, b)), auto_ack=True)
    props = pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id="call-7")
    ch.basic_publish("amq.topic", f"svc.{t}.time", b"now?", props)
    deadline = time.time() + WAIT
    while not replies and time.time() < deadline:
        conn.process_data_events(time_limit=0.1)
    assert replies, "no reply"
    p, body = replies[0]
    assert body == b"12:00" and p.correlation_id == "call-7", (body, p.correlation_id)
    responder.close()
    conn.close()


@case("cross: a retained MQTT message reaches bound AMQP queues live only (x-mqtt-retain), not later binds")
def retained_is_mqtt_only():
    t = tag()
    conn, ch = amqp()
    early = bound_queue(ch, f"ret.{t}")
    m = Mqtt()
    m.publish(f"ret/{t}", b"kept", qos=1, retain=True)
    _, props, body = get(ch, early)
    assert body == b"kept" and (props.headers or {}).get("x-mqtt-retain") is True, (body, props.headers)
    late = bound_queue(ch, f"ret.{t}")
    time.sleep(QUIET)  # a bounded look: nothing is replayed to a queue bound after the publish
    method, _, _ = ch.basic_get(late, auto_ack=True)
    assert method is None, "retained message replayed to AMQP"
    m.publish(f"ret/{t}", b"", qos=1, retain=True)  # clear it
    m.close()
    conn.close()


finish()
