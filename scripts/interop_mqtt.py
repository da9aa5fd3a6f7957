"""MQTT interop cases driven by paho-mqtt (2.x), against a running Ferry.

Usage: python3 interop_mqtt.py HOST PORT
Prints one line per case, "ok   <case>" or "FAIL <case>: <why>", and exits with the number of
failed cases. Every wait is bounded.
"""

import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from interop_case import case, finish

HOST = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 1883
# Optional: a WebSocket listener (path /mqtt) to run the WebSocket case against.
WS_PORT = int(sys.argv[3]) if len(sys.argv) > 3 else None
WAIT = 10.0


class Client:
    """A connected paho client that records what it receives."""

    def __init__(self, v5=True, client_id=None, clean=True, will=None, props=None, ws_port=None, v31=False):
        self.got = []
        self.cond = threading.Condition()
        proto = mqtt.MQTTv5 if v5 else (mqtt.MQTTv31 if v31 else mqtt.MQTTv311)
        cid = client_id or f"interop-{uuid.uuid4().hex[:8]}"
        transport = "websockets" if ws_port else "tcp"
        if v5:
            self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=proto, transport=transport)
        else:
            self.c = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=proto, clean_session=clean, transport=transport
            )
        if ws_port:
            self.c.ws_set_options(path="/mqtt")
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.session_present = None
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        if will:
            self.c.will_set(**will)
        port = ws_port or PORT
        if v5:
            self.c.connect(HOST, port, keepalive=30, clean_start=clean, properties=props)
        else:
            self.c.connect(HOST, port, keepalive=30)
        self.c.loop_start()
        if not self.connected.wait(WAIT):
            raise RuntimeError("no CONNACK")

    def _on_connect(self, client, userdata, flags, rc, properties=None):
        self.session_present = flags.session_present
        self.connected.set()

    def _on_message(self, client, userdata, msg):
        with self.cond:
            self.got.append(msg)
            self.cond.notify_all()

    def subscribe(self, topic, qos=0, **kw):
        self.subscribed.clear()
        self.c.subscribe(topic, qos, **kw)
        if not self.subscribed.wait(WAIT):
            raise RuntimeError("no SUBACK")

    def wait_for(self, n, timeout=WAIT):
        deadline = time.time() + timeout
        with self.cond:
            while len(self.got) < n:
                left = deadline - time.time()
                if left <= 0:
                    raise RuntimeError(f"got {len(self.got)} of {n} messages")
                self.cond.wait(left)
        return self.got

    def publish(self, topic, payload, qos=0, retain=False, properties=None):
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(WAIT)
        if not info.is_published():
            raise RuntimeError("publish not acknowledged")

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def unique(prefix):
    return f"interop/{prefix}/{uuid.uuid4().hex[:8]}"


@case("paho 3.1.1 and 5.0: QoS 0, 1 and 2 both ways")
def qos_both_ways():
    for v5 in (False, True):
        for qos in (0, 1, 2):
            t = unique(f"qos{qos}")
            sub = Client(v5=v5)
            sub.subscribe(t, qos)
            pub = Client(v5=v5)
            for i in range(5):
                pub.publish(t, f"m{i}", qos=qos)
            got = sub.wait_for(5)
            assert [m.payload for m in got] == [f"m{i}".encode() for i in range(5)], got
            assert all(m.qos == qos for m in got), [m.qos for m in got]
            sub.close()
            pub.close()


@case("paho: QoS 2 arrives exactly once")
def qos2_once():
    t = unique("once")
    sub = Client()
    sub.subscribe(t, 2)
    pub = Client()
    for i in range(50):
        pub.publish(t, str(i), qos=2)
    sub.wait_for(50)
    time.sleep(0.3)  # a bounded look for duplicates after the expected ones arrived
    assert len(sub.got) == 50, len(sub.got)
    sub.close()
    pub.close()


@case("paho: retained messages match wildcards, clear with an empty payload")
def retained():
    base = unique("retained")
    pub = Client()
    pub.publish(f"{base}/a/x", "1", qos=1, retain=True)
    pub.publish(f"{base}/b/x", "2", qos=1, retain=True)
    sub = Client()
    sub.subscribe(f"{base}/+/x", 1)
    got = sub.wait_for(2)
    assert sorted(m.payload for m in got) == [b"1", b"2"] and all(m.retain for m in got), got
    pub.publish(f"{base}/a/x", "", qos=1, retain=True)
    sub2 = Client()
    sub2.subscribe(f"{base}/#", 1)
    got = sub2.wait_for(1)
    assert [m.payload for m in got] == [b"2"], got
    for c in (pub, sub, sub2):
        c.close()


@case("paho: a will is published when the connection is lost, not on DISCONNECT")
def wills():
    t = unique("will")
    watcher = Client()
    watcher.subscribe(t, 1)
    polite = Client(will={"topic": t, "payload": "polite", "qos": 1})
    polite.close()
    rude = Client(will={"topic": t, "payload": "gone", "qos": 1})
    rude.c.loop_stop()
    rude.c.socket().close()  # no DISCONNECT
    got = watcher.wait_for(1)
    assert [m.payload for m in got] == [b"gone"], got
    watcher.close()


@case("paho: shared subscriptions share the messages between members")
def shared():
    t = unique("shared")
    a, b = Client(), Client()
    a.subscribe(f"$share/g/{t}", 1)
    b.subscribe(f"$share/g/{t}", 1)
    pub = Client()
    for i in range(20):
        pub.publish(t, str(i), qos=1)
    deadline = time.time() + WAIT
    while len(a.got) + len(b.got) < 20 and time.time() < deadline:
        time.sleep(0.05)
    assert len(a.got) + len(b.got) == 20, (len(a.got), len(b.got))
    assert a.got and b.got, (len(a.got), len(b.got))
    for c in (a, b, pub):
        c.close()


@case("paho 5.0: user properties, content type, response topic, correlation data pass through")
def v5_properties():
    t = unique("props")
    sub = Client()
    sub.subscribe(t, 1)
    pub = Client()
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("k", "v1"), ("k", "v2"), ("other", "x")]
    props.ContentType = "application/json"
    props.ResponseTopic = "reply/to.me"
    props.CorrelationData = b"\x00\x01corr"
    props.PayloadFormatIndicator = 1
    props.MessageExpiryInterval = 60
    pub.publish(t, '{"a":1}', qos=1, properties=props)
    m = sub.wait_for(1)[0]
    p = m.properties
    assert sorted(p.UserProperty) == sorted([("k", "v1"), ("k", "v2"), ("other", "x")]), p.UserProperty
    assert p.ContentType == "application/json", p.ContentType
    assert p.ResponseTopic == "reply/to.me", p.ResponseTopic
    assert p.CorrelationData == b"\x00\x01corr", p.CorrelationData
    assert p.PayloadFormatIndicator == 1
    assert 0 < p.MessageExpiryInterval <= 60, p.MessageExpiryInterval
    sub.close()
    pub.close()


@case("paho 3.1.1: a persistent session gets what was published while it was away")
def persistent_session():
    t = unique("offline")
    cid = f"interop-persist-{uuid.uuid4().hex[:6]}"
    s = Client(v5=False, client_id=cid, clean=False)
    s.subscribe(t, 1)
    s.close()
    pub = Client()
    for i in range(3):
        pub.publish(t, str(i), qos=1)
    s = Client(v5=False, client_id=cid, clean=False)
    assert s.session_present, "session present"
    got = s.wait_for(3)
    assert [m.payload for m in got] == [b"0", b"1", b"2"], got
    s.close()
    pub.close()


@case("paho 3.1 (MQIsdp): QoS 1 with a 3.1.1 and a 5.0 client, retained, persistent session")
def mqtt31():
    t = unique("v31")
    # A retained message first: the SUBACK and then the retained message.
    keeper = Client(v5=False)
    keeper.publish(f"{t}/kept", "kept", qos=1, retain=True)
    old = Client(v5=False, v31=True, client_id=f"v31-{uuid.uuid4().hex[:8]}", clean=False)
    assert old.session_present is False, old.session_present
    old.subscribe(f"{t}/#", 1)
    got = old.wait_for(1)
    assert got[0].payload == b"kept" and got[0].retain, got
    new = Client()
    new.subscribe(f"{t}/#", 1)
    new.publish(f"{t}/from5", "from5", qos=1)
    old.publish(f"{t}/from31", "from31", qos=1)
    got = old.wait_for(3)
    assert sorted(m.payload for m in got[1:]) == [b"from31", b"from5"], got
    got = new.wait_for(3)
    assert sorted(m.payload for m in got) == [b"from31", b"from5", b"kept"], got
    keeper.publish(f"{t}/kept", "", qos=1, retain=True)
    for c in (keeper, old, new):
        c.close()


if WS_PORT:

    @case("paho over WebSocket: a ws client and a tcp client talk through one broker")
    def websocket():
        t = unique("ws")
        ws = Client(ws_port=WS_PORT)
        ws.subscribe(t, 1)
        tcp = Client()
        tcp.publish(t, "over-tcp", qos=1)
        ws.publish(t, "over-ws", qos=1)
        got = ws.wait_for(2)
        assert sorted(m.payload for m in got) == [b"over-tcp", b"over-ws"], got
        ws.close()
        tcp.close()


finish()
