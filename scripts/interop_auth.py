"""Users, AMQP permissions and client certificates as identities: pika and paho-mqtt (2.x) against
a running Ferry started by interop.sh from a config file with

- [[users]] alice, bob and sensor-7 (each with the password "<name>-pw");
- [[permissions]] for alice (configure "^alice\\.", write "^(alice\\.|amq\\.default$)",
  read "^alice\\.") and sensor-7 (the same with sensor-7), none for bob;
- [[acl]] user sensor-7, topic "sensors/%u/#", readwrite;
- a plain AMQP listener, and an AMQPS and an MQTTS listener with
  tls = { ..., client_ca, require_client_cert = true } and cert_login = "common_name";
- in CERT_DIR: ca.pem, and client.pem / client.key, a client certificate with CN=sensor-7.

Usage: python3 interop_auth.py HOST AMQP_PORT AMQPS_PORT MQTTS_PORT CERT_DIR
Prints one line per case, "ok   <case>" or "FAIL <case>: <why>", and exits with the number of
failed cases. Every wait is bounded.
"""

import os
import ssl
import sys
import threading
import uuid

import paho.mqtt.client as mqtt
import pika
from pika.exceptions import AMQPConnectionError, ChannelClosedByBroker, ConnectionClosedByBroker

from interop_case import case, finish

HOST = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
AMQP_PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 5672
AMQPS_PORT = int(sys.argv[3]) if len(sys.argv) > 3 else 5671
MQTTS_PORT = int(sys.argv[4]) if len(sys.argv) > 4 else 8883
CERTS = sys.argv[5] if len(sys.argv) > 5 else "."
CA = os.path.join(CERTS, "ca.pem")
CLIENT_CERT = os.path.join(CERTS, "client.pem")
CLIENT_KEY = os.path.join(CERTS, "client.key")
WAIT = 10.0


def params(port, credentials, ssl_options=None):
    return pika.ConnectionParameters(
        HOST,
        port,
        credentials=credentials,
        ssl_options=ssl_options,
        heartbeat=30,
        blocked_connection_timeout=10,
        socket_timeout=10,
        connection_attempts=1,
    )


def login(user):
    return pika.BlockingConnection(params(AMQP_PORT, pika.PlainCredentials(user, f"{user}-pw")))


def tls_context(with_client_cert=True):
    ctx = ssl.create_default_context(cafile=CA)
    if with_client_cert:
        ctx.load_cert_chain(CLIENT_CERT, CLIENT_KEY)
    return ctx


def external_login(with_client_cert=True):
    """An AMQPS connection logging in with SASL EXTERNAL (the certificate is the identity)."""
    return pika.BlockingConnection(
        params(
            AMQPS_PORT,
            pika.credentials.ExternalCredentials(),
            pika.SSLOptions(tls_context(with_client_cert), "localhost"),
        )
    )


def declare_publish_consume(conn, queue):
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare(queue)
    for i in range(3):
        ch.basic_publish("", queue, f"m{i}".encode())  # the default exchange: write on amq.default
    got = []
    for method, _props, body in ch.consume(queue, inactivity_timeout=5):
        if method is None:
            break
        got.append(body)
        ch.basic_ack(method.delivery_tag)
        if len(got) == 3:
            break
    ch.cancel()
    assert got == [b"m0", b"m1", b"m2"], got
    ch.queue_delete(queue)
    ch.close()


def refused(conn, op, code, text):
    """Runs op(channel) on a new channel of conn: it must be closed by the broker with code and a
    reply text containing text; the connection carries on."""
    ch = conn.channel()
    try:
        op(ch)
        raise AssertionError("not refused")
    except ChannelClosedByBroker as e:
        assert e.reply_code == code and text in e.reply_text, (e.reply_code, e.reply_text)
    assert conn.is_open, "the connection was closed too"


# --- AMQP permissions ([[permissions]]) through pika -------------------------------------------


@case("pika permissions: alice declares alice.q, publishes to it via the default exchange, consumes it")
def alice_own_queue():
    conn = login("alice")
    declare_publish_consume(conn, "alice.q")
    conn.close()


@case("pika permissions: alice declaring bob.q is refused 403 (configure access), the connection carries on")
def alice_configure_refused():
    conn = login("alice")
    refused(
        conn,
        lambda ch: ch.queue_declare("bob.q"),
        403,
        "configure access to queue 'bob.q' in vhost '/' refused for user 'alice'",
    )
    ch = conn.channel()  # the other channels and new ones still work
    ch.queue_declare("alice.after")
    ch.queue_delete("alice.after")
    conn.close()


@case("pika permissions: alice publishing to amq.direct is refused 403 (write access)")
def alice_write_refused():
    conn = login("alice")

    def publish(ch):
        ch.confirm_delivery()
        ch.basic_publish("amq.direct", "alice.x", b"x")

    refused(conn, publish, 403, "write access to exchange 'amq.direct' in vhost '/' refused for user 'alice'")
    conn.close()


@case("pika permissions: alice basic.get on bob.q is refused 403 (read access, checked before the queue exists)")
def alice_read_refused():
    conn = login("alice")
    refused(
        conn,
        lambda ch: ch.basic_get("bob.q", auto_ack=True),
        403,
        "read access to queue 'bob.q' in vhost '/' refused for user 'alice'",
    )
    conn.close()


@case("pika permissions: bob (no [[permissions]] entry) is refused at connection.open (530)")
def bob_no_vhost_access():
    try:
        login("bob").close()
        raise AssertionError("bob could open vhost /")
    except (ConnectionClosedByBroker, AMQPConnectionError) as e:
        # pika reports a close during the open handshake as ProbableAccessDeniedError wrapping
        # ConnectionClosedByBroker: (530) '...' (as it does against RabbitMQ).
        why = str(e)
        assert "530" in why and "access to vhost '/' refused for user 'bob'" in why, repr(e)


# --- client certificates as identities (cert_login = "common_name") ------------------------------


@case("pika EXTERNAL over TLS: the client certificate (CN=sensor-7) logs in and declares/publishes/consumes")
def external_ok():
    conn = external_login()
    declare_publish_consume(conn, "sensor-7.q")
    # The identity is sensor-7: its refusals name it.
    refused(
        conn,
        lambda ch: ch.queue_declare("alice.q"),
        403,
        "configure access to queue 'alice.q' in vhost '/' refused for user 'sensor-7'",
    )
    conn.close()


@case("pika over TLS to a require_client_cert listener without a client certificate is refused")
def external_without_cert():
    try:
        external_login(with_client_cert=False).close()
        raise AssertionError("connected without a client certificate")
    except AMQPConnectionError as e:
        assert "CERTIFICATE_VERIFY_FAILED" not in repr(e), repr(e)  # not our CA failing the server


class TlsMqtt:
    """A paho MQTT 5 client over TLS with the client certificate and a bogus user name and
    password in its CONNECT (ignored on a cert_login listener)."""

    def __init__(self):
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"auth-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        self.c.tls_set(ca_certs=CA, certfile=CLIENT_CERT, keyfile=CLIENT_KEY)
        self.c.username_pw_set("mallory", "not-the-password")
        self.connack = None
        self.connected = threading.Event()
        self.acks = {}
        self.cond = threading.Condition()
        self.c.on_connect = self._on_connect
        self.c.on_publish = self._on_publish
        self.c.connect(HOST, MQTTS_PORT, keepalive=30)
        self.c.loop_start()
        if not self.connected.wait(WAIT):
            raise RuntimeError("no CONNACK")
        assert self.connack == 0, f"CONNACK {self.connack}"

    def _on_connect(self, client, userdata, flags, rc, properties=None):
        self.connack = rc.value
        self.connected.set()

    def _on_publish(self, client, userdata, mid, rc, properties=None):
        with self.cond:
            self.acks[mid] = rc.value
            self.cond.notify_all()

    def puback(self, topic):
        """Publishes at QoS 1 and returns the PUBACK's reason code."""
        mid = self.c.publish(topic, b"x", qos=1).mid
        with self.cond:
            if not self.cond.wait_for(lambda: mid in self.acks, WAIT):
                raise RuntimeError(f"no PUBACK for {topic}")
            return self.acks[mid]

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@case("paho 5.0 over TLS, cert_login (bogus user/password in CONNECT ignored): other/t PUBACK 0x87, own topic allowed")
def mqtt_cert_identity():
    c = TlsMqtt()
    denied = c.puback("other/t")
    allowed = c.puback("sensors/sensor-7/t")
    c.close()
    # 0x10 (no matching subscribers) is a success code too, as Mosquitto sends it.
    assert denied == 0x87 and allowed in (0x00, 0x10), f"other/t: {denied:#x}, sensors/sensor-7/t: {allowed:#x}"


finish()
