"""Crash test for Ferry's durable storage (issue 6): the broker is a child process, AMQP publishers
with confirms and MQTT QoS 1 publishers write persistent messages, the broker is SIGKILLed at a
random moment, restarted on the same data directory, and everything is consumed: every message
whose confirm (AMQP basic.ack) or PUBACK (MQTT) arrived must be there.

Usage: python3 crash_test.py PATH/TO/ferry        (scripts/crash-test.sh builds it and runs this)

Environment:
  CRASH_ROUNDS=8     SIGKILL rounds; one SIGTERM (clean shutdown) round follows them
  CRASH_SEED=N       seed of the kill points (printed at start; set it to repeat a run)
  CRASH_NO_KILL=1    debug the harness itself: nothing is killed, publishers are stopped
                     gracefully and the same broker is drained (must report 0 missing)
  CRASH_TIMEOUT=300  watchdog for the whole run, seconds
  CRASH_KEEP=1       keep the work directory (config, data, one broker log per start)
  CRASH_ALLOW_RESURRECTED=1  report resurrected messages without failing

Setup (first round, on a fresh data directory):
  - durable queue `crash.amqp` (AMQP publishers: default exchange, routing key crash.amqp);
  - durable queue `crash.mqtt` bound to `amq.topic` with `crash.mqtt.#` (MQTT topic
    `crash/mqtt/<n>` is routing key `crash.mqtt.<n>`);
  - an MQTT 3.1.1 persistent session `crash-sub` (clean session 0) subscribed to `crash/mqtt/#`
    QoS 1, then disconnected: its session queue collects the MQTT messages while it is away.

Each round: 3 AMQP publishers (confirm mode, delivery mode 2; 1, 10 and 50 publishes in flight;
bodies `a<round>-<pub>-<n>`) and 2 MQTT 3.1.1 QoS 1 publishers (1 and 20 in flight; topic
`crash/mqtt/<pub>`, bodies `m<round>-<pub>-<n>`) publish concurrently; the broker is SIGKILLed at
a random point 0.5-3 s after publishing started (the rounds' kill points are spread over that
range, in random order); the broker is restarted on the same data directory; then `crash.amqp`
and `crash.mqtt` are consumed with acks until idle, and `crash-sub` reconnects with clean session
0 and WITHOUT subscribing (the subscription must come back from the stored session) and reads
until idle. Then the next round publishes on that same broker. The last round shuts the broker
down with SIGTERM instead (graceful: it must exit 0 and keep the same guarantees).

A round FAILS when:
  - a confirmed id is missing: an AMQP id from crash.amqp, an MQTT id from crash.mqtt or from
    crash-sub (up to 10 are printed per place; "missing" sums the three places);
  - a durable queue or the crash-sub session (CONNACK session present = 0) did not survive;
  - an id that was consumed and acknowledged in an earlier round comes back ("resurrected"): the
    acks were followed by a clean close and >= 0.5 s of confirmed publishing on the same broker,
    so a store that commits in order has made them durable;
  - an id that was never published shows up (corruption);
  - the SIGTERM round's broker does not exit 0; nothing at all was confirmed in a round;
  - the round cannot run: the broker does not (re)start, a publisher cannot connect, a drain
    errors out. The tail of the broker log is printed and the remaining rounds are skipped.
Allowed and only counted: duplicates (an id seen twice in one place), "unconfirmed present"
(published, confirm not received before the kill, yet stored), nacked publishes, and "late"
(an unconfirmed id of an earlier round first seen in a later round).

The bridge scenario (issue 16), in the same rounds: a second Ferry, the remote, runs on its own
ports and data directory and is never killed; the Ferry under test has a `[[bridges]]` entry
`crash-remote` with one `out` rule `crash/bridge/#` QoS 1 to it. Each round a third MQTT 3.1.1
QoS 1 publisher (10 in flight; topic `crash/bridge/0`, bodies `b<round>-0-<n>`) publishes with
the others and is killed with them (each PUBACKed id is "accepted"); a subscriber on the remote
(`crash/bridge/#`, QoS 1, connected for the whole run) records what arrives. So that the bridge
has a backlog when the Ferry under test is killed, the remote is frozen (SIGSTOP) for the second
half of each round's publishing and resumed (SIGCONT) right after the kill: what was accepted
then waits in the bridge's queue, up to `max_inflight` (32) of it sent and not acknowledged.
After the last round, once every accepted id has arrived (or after BRIDGE_WAIT s without that),
one line per round `bridge round <r>: accepted N; backlog at the kill B; missing M; duplicates D;
unaccepted present U` (B: accepted, not yet at the remote's subscriber at the kill), then
`crash-test bridge: ...`. FAILS when an accepted id never reached the remote, when an id that
was never published arrives, or when no bridged publish was accepted in a round. Allowed and only
counted: duplicates (the bridge resends what the remote had not acknowledged before the kill)
and unaccepted ids that arrived anyway.

Output: one line per round, then `crash-test: N rounds, X confirmed, M missing, D duplicates, ...`;
exit status 0 only when no round failed.
"""

import collections
import ctypes
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import paho.mqtt.client as mqtt
import pika

HOST = "127.0.0.1"
AMQP_Q = "crash.amqp"
MQTT_Q = "crash.mqtt"
MQTT_BINDING = "crash.mqtt.#"
SUB_ID = "crash-sub"
SUB_FILTER = "crash/mqtt/#"
AMQP_WINDOWS = (1, 10, 50)  # publishes in flight per AMQP publisher
MQTT_WINDOWS = (1, 20)  # per MQTT publisher
KILL_MIN, KILL_MAX = 0.5, 3.0
WAIT = 10.0  # any single network wait (connect, handshake, reply)
START_WAIT = 30.0  # broker start (recovery included)
IDLE = 1.5  # a drain ends after this long without a message
DRAIN_CAP = 60.0  # ... or after this long in all
GRACE = 5  # the broker's shutdown_grace_secs
BRIDGE_NAME = "crash-remote"
BRIDGE_FILTER = "crash/bridge/#"
BRIDGE_WINDOWS = (10,)  # the bridged MQTT publisher
BRIDGE_WAIT = 60.0  # after the last round: at most this long for the backlog to reach the remote
BRIDGE_RE = re.compile(r"^b(\d+)-(\d+)-(\d+)$")
ID_RE = re.compile(r"^([am])(\d+)-(\d+)-(\d+)$")

logging.getLogger("pika").setLevel(logging.CRITICAL + 10)  # connection losses are expected


class RoundError(Exception):
    """The round could not run (not a lost message: the harness could not do its job)."""


def env_int(name, default):
    v = os.environ.get(name, "").strip()
    return int(v) if v else default


def env_flag(name):
    return os.environ.get(name, "").strip() not in ("", "0", "false", "no")


# --- the broker ---------------------------------------------------------------------------------

try:
    _libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except OSError:
    _libc = None


def _die_with_parent():
    # PR_SET_PDEATHSIG = 1: the broker gets SIGKILL if this process dies without cleaning up.
    if _libc is not None:
        _libc.prctl(1, signal.SIGKILL, 0, 0, 0)


def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port):
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class Broker:
    def __init__(self, exe, work, bridge_to=None, name="ferry"):
        self.exe = exe
        self.work = work
        self.bridge_to = bridge_to  # a callable giving the remote's MQTT port, or None
        self.name = name
        self.data = os.path.join(work, "data")
        self.config = os.path.join(work, "ferry.toml")
        self.proc = None
        self.starts = 0
        self.log = None
        self.mqtt_port = self.amqp_port = None

    def start(self):
        """Starts the broker on the data directory (fresh ports each time) and waits for both ports."""
        self.mqtt_port, self.amqp_port = free_ports(2)
        with open(self.config, "w") as f:
            f.write(
                "[broker]\n"
                f"data_dir = {json.dumps(self.data)}\n"
                'log_level = "info"\n'
                f"shutdown_grace_secs = {GRACE}\n\n"
                # The away MQTT session takes thousands of messages per round: without this,
                # the per-session limit (1000 by default, as Mosquitto's) would drop the oldest
                # by design, which is not what this test is about.
                "[mqtt]\n"
                "max_queued_messages = 0\n\n"
                "[[listeners]]\n"
                'protocol = "mqtt"\n'
                f'bind = "{HOST}:{self.mqtt_port}"\n\n'
                "[[listeners]]\n"
                'protocol = "amqp"\n'
                f'bind = "{HOST}:{self.amqp_port}"\n'
            )
            if self.bridge_to is not None:
                # QoS 1 out rule to the remote; fast reconnects so that a restart resumes at once;
                # no queue limit, so that nothing is dropped by design.
                f.write(
                    "\n[[bridges]]\n"
                    f'name = "{BRIDGE_NAME}"\n'
                    f'address = "{HOST}:{self.bridge_to()}"\n'
                    "max_queued_messages = 0\n"
                    "reconnect_initial_ms = 100\n"
                    "reconnect_max_ms = 1000\n"
                    f'topics = [{{ pattern = "{BRIDGE_FILTER}", direction = "out", qos = 1 }}]\n'
                )
        self.starts += 1
        self.log = os.path.join(self.work, f"{self.name}-{self.starts}.log")
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(
                [self.exe, "--config", self.config],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.work,
                preexec_fn=_die_with_parent,
            )
        t0 = time.monotonic()
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self.proc = None
                raise RoundError(f"{self.name} exited with status {rc} while starting (start {self.starts})")
            if port_open(self.mqtt_port) and port_open(self.amqp_port):
                return time.monotonic() - t0
            if time.monotonic() - t0 > START_WAIT:
                raise RoundError(f"{self.name} did not open its ports within {START_WAIT:.0f} s (start {self.starts})")
            time.sleep(0.05)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def freeze(self):
        """SIGSTOP (the bridge's remote: it stops answering without closing anything)."""
        if self.alive():
            self.proc.send_signal(signal.SIGSTOP)

    def thaw(self):
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)

    def kill(self):
        if self.proc is None:
            return None
        try:
            self.proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            rc = self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            rc = None
        self.proc = None
        return rc

    def terminate(self):
        """SIGTERM; returns (exit status or None if it had to be killed, seconds taken)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(GRACE + 15)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = None
        self.proc = None
        return rc, time.monotonic() - t0

    def tail(self, n=40):
        if not self.log or not os.path.exists(self.log):
            return "(no broker log)"
        with open(self.log, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(f"    | {line}" for line in lines[-n:]) or "    | (empty)"


# --- what was published -------------------------------------------------------------------------


class Ledger:
    """The ids of one round: sent (publish written), confirmed (ack/PUBACK received), nacked."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sent = {"amqp": set(), "mqtt": set(), "bridge": set()}
        self.confirmed = {"amqp": set(), "mqtt": set(), "bridge": set()}
        self.nacked = {"amqp": set(), "mqtt": set(), "bridge": set()}

    def add(self, what, kind, mid):
        with self.lock:
            getattr(self, what)[kind].add(mid)

    def snapshot(self):
        with self.lock:
            return (
                {k: set(v) for k, v in self.sent.items()},
                {k: set(v) for k, v in self.confirmed.items()},
                {k: set(v) for k, v in self.nacked.items()},
            )


def amqp_params(port):
    return pika.ConnectionParameters(
        host=HOST,
        port=port,
        connection_attempts=1,
        socket_timeout=WAIT,
        stack_timeout=WAIT,
        blocked_connection_timeout=WAIT,
        heartbeat=30,
    )


class AmqpPublisher(threading.Thread):
    """pika SelectConnection in its own thread; up to `window` publishes awaiting their confirm."""

    kind = "amqp"

    def __init__(self, port, rnd, idx, window, ledger):
        super().__init__(name=f"amqp-pub-{idx}", daemon=True)
        self.port, self.rnd, self.idx, self.window, self.ledger = port, rnd, idx, window, ledger
        self.ready = threading.Event()
        self.error = None
        self.conn = self.ch = None
        self.stopping = False
        self.n = 0
        self.next_tag = 1
        self.pending = {}  # delivery tag -> id
        self.props = pika.BasicProperties(delivery_mode=2)

    def run(self):
        try:
            self.conn = pika.SelectConnection(
                amqp_params(self.port),
                on_open_callback=self._on_open,
                on_open_error_callback=self._on_open_error,
                on_close_callback=self._on_close,
            )
            self.conn.ioloop.start()
        except Exception as e:  # noqa: BLE001
            self.error = self.error or f"{type(e).__name__}: {e}"

    def _on_open(self, conn):
        conn.channel(on_open_callback=self._on_channel)

    def _on_open_error(self, conn, err):
        self.error = f"cannot connect: {err!r}"
        conn.ioloop.stop()

    def _on_close(self, conn, reason):
        if not self.stopping and self.error is None:
            self.error = f"connection closed: {reason!r}"
        conn.ioloop.stop()

    def _on_channel(self, ch):
        self.ch = ch
        ch.add_on_close_callback(self._on_channel_close)
        ch.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda _frame: self.ready.set())

    def _on_channel_close(self, ch, reason):
        if not self.stopping and self.error is None:
            self.error = f"channel closed: {reason!r}"
        self._close()

    def begin(self):
        self.conn.ioloop.add_callback_threadsafe(self._pump)

    def _pump(self):
        while not self.stopping and len(self.pending) < self.window and self.ch is not None and self.ch.is_open:
            self.n += 1
            mid = f"a{self.rnd}-{self.idx}-{self.n}"
            self.pending[self.next_tag] = mid
            self.next_tag += 1
            self.ledger.add("sent", "amqp", mid)
            try:
                self.ch.basic_publish("", AMQP_Q, mid.encode(), self.props)
            except Exception as e:  # noqa: BLE001 - the broker went away
                if self.error is None:
                    self.error = f"publish: {type(e).__name__}: {e}"
                return
        if self.stopping and not self.pending:
            self._close()

    def _on_confirm(self, frame):
        m = frame.method
        what = "confirmed" if isinstance(m, pika.spec.Basic.Ack) else "nacked"
        tags = [t for t in self.pending if t <= m.delivery_tag] if m.multiple else [m.delivery_tag]
        for t in tags:
            mid = self.pending.pop(t, None)
            if mid is not None:
                self.ledger.add(what, "amqp", mid)
        self._pump()

    def _close(self):
        try:
            if self.conn is not None and self.conn.is_open:
                self.conn.close()
            elif self.conn is not None and self.conn.is_closed:
                self.conn.ioloop.stop()
        except Exception:  # noqa: BLE001
            pass

    def stop(self, graceful):
        """Stops publishing; graceful: close once every outstanding confirm has arrived."""

        def do():
            self.stopping = True
            if not graceful or not self.pending:
                self._close()

        try:
            if self.conn is not None:
                self.conn.ioloop.add_callback_threadsafe(do)
        except Exception:  # noqa: BLE001 - the ioloop is already gone
            pass


class MqttPublisher(threading.Thread):
    """paho-mqtt 3.1.1 QoS 1, its network loop driven by this thread (no automatic reconnect)."""

    kind = "mqtt"
    topic_base = "crash/mqtt"
    prefix = "m"
    client_prefix = "crash-pub"

    def __init__(self, port, rnd, idx, window, ledger):
        super().__init__(name=f"{self.kind}-pub-{idx}", daemon=True)
        self.port, self.rnd, self.idx, self.window, self.ledger = port, rnd, idx, window, ledger
        self.ready = threading.Event()
        self.go = threading.Event()
        self.stop_evt = threading.Event()
        self.graceful = False
        self.error = None
        self.connack = None
        self.lost = False
        self.pending = {}  # packet id -> id

    def begin(self):
        self.go.set()

    def stop(self, graceful):
        self.graceful = graceful
        self.stop_evt.set()

    def _on_publish(self, client, userdata, packet_id, reason_code, properties):
        mid = self.pending.pop(packet_id, None)
        if mid is not None:
            self.ledger.add("confirmed", self.kind, mid)

    def run(self):
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"{self.client_prefix}-{self.rnd}-{self.idx}",
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        c.max_inflight_messages_set(self.window)
        c.on_connect = lambda cl, ud, flags, rc, props: setattr(self, "connack", rc)
        c.on_publish = self._on_publish
        c.on_disconnect = lambda *a: setattr(self, "lost", True)
        ok = mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        try:
            c.connect(HOST, self.port, keepalive=30)
            deadline = time.monotonic() + WAIT
            while self.connack is None:
                if c.loop(0.05) != ok or time.monotonic() > deadline:
                    self.error = "no CONNACK"
                    return
            if self.connack.is_failure:
                self.error = f"CONNACK {self.connack}"
                return
            self.ready.set()
            while not self.go.wait(0.05):
                if self.stop_evt.is_set():
                    return
            n = 0
            topic = f"{self.topic_base}/{self.idx}"
            while not self.stop_evt.is_set() and not self.lost:
                while len(self.pending) < self.window and not self.stop_evt.is_set():
                    n += 1
                    mid = f"{self.prefix}{self.rnd}-{self.idx}-{n}"
                    self.ledger.add("sent", self.kind, mid)
                    info = c.publish(topic, mid.encode(), qos=1)
                    if info.rc != ok:
                        self.lost = True
                        break
                    self.pending[info.mid] = mid
                if self.lost or c.loop(0.02) != ok:
                    self.lost = True
            if self.graceful and not self.lost:
                deadline = time.monotonic() + WAIT
                while self.pending and time.monotonic() < deadline:
                    if c.loop(0.05) != ok:
                        break
            if self.error is None and self.lost and not self.stop_evt.is_set():
                self.error = "connection lost"
        except Exception as e:  # noqa: BLE001 - the broker went away
            if self.error is None and not self.stop_evt.is_set():
                self.error = f"{type(e).__name__}: {e}"
        finally:
            try:
                c.disconnect()
                for _ in range(20):
                    if c.loop(0.05) != ok:
                        break
            except Exception:  # noqa: BLE001
                pass
            try:
                c.socket() and c.socket().close()
            except Exception:  # noqa: BLE001
                pass


class BridgePublisher(MqttPublisher):
    """The same QoS 1 publisher on the bridged topic: each PUBACKed id is "accepted"."""

    kind = "bridge"
    topic_base = "crash/bridge"
    prefix = "b"
    client_prefix = "crash-bridge-pub"


class RemoteSubscriber:
    """An MQTT 3.1.1 subscriber on the remote Ferry (never killed), connected for the whole run,
    subscribed to the bridged topics at QoS 1; records every body that arrives."""

    def __init__(self, port):
        self.port = port
        self.lock = threading.Lock()
        self.bodies = []
        self.last = time.monotonic()
        self.suback = threading.Event()
        self.granted = None
        self.disconnected = False
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="crash-remote-sub", protocol=mqtt.MQTTv311, clean_session=True
        )
        self.c.on_connect = lambda cl, ud, flags, rc, props: cl.subscribe(BRIDGE_FILTER, qos=1)
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.on_disconnect = lambda *a: setattr(self, "disconnected", True)

    def _on_subscribe(self, cl, ud, mid, rcs, props):
        self.granted = rcs[0]
        self.suback.set()

    def _on_message(self, cl, ud, msg):
        with self.lock:
            self.bodies.append(msg.payload.decode("utf-8", "replace"))
            self.last = time.monotonic()

    def start(self):
        self.c.connect(HOST, self.port, keepalive=30)
        self.c.loop_start()
        if not self.suback.wait(WAIT):
            raise RoundError("the subscriber on the remote Ferry got no SUBACK")
        if self.granted.is_failure or self.granted.value != 1:
            raise RoundError(f"the subscriber on the remote Ferry: subscription refused or downgraded: {self.granted}")

    def snapshot(self):
        with self.lock:
            return list(self.bodies), self.last

    def stop(self):
        try:
            self.c.disconnect()
            self.c.loop_stop()
        except Exception:  # noqa: BLE001
            pass


# --- setup and drains ----------------------------------------------------------------------------


def setup_queues(port):
    """Declares both durable queues and the binding (idempotent: also after a round lost them)."""
    conn = pika.BlockingConnection(amqp_params(port))
    try:
        ch = conn.channel()
        ch.queue_declare(AMQP_Q, durable=True)
        ch.queue_declare(MQTT_Q, durable=True)
        ch.queue_bind(MQTT_Q, "amq.topic", routing_key=MQTT_BINDING)
    finally:
        conn.close()


def drain_queue(port, queue, out):
    """Consumes `queue` with acks until IDLE passes without a message. Fills out[...]."""
    out.update(bodies=[], lost=False, left=None, error=None)
    conn = pika.BlockingConnection(amqp_params(port))
    try:
        ch = conn.channel()
        try:
            ch.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code == 404:
                out["lost"] = True
                return
            raise
        ch.basic_qos(prefetch_count=500)
        cap = time.monotonic() + DRAIN_CAP
        for method, _props, body in ch.consume(queue, auto_ack=False, inactivity_timeout=IDLE):
            if method is None:
                break
            out["bodies"].append(body.decode("utf-8", "replace"))
            ch.basic_ack(method.delivery_tag)
            if time.monotonic() > cap:
                out["error"] = f"still delivering after {DRAIN_CAP:.0f} s"
                break
        ch.cancel()
        out["left"] = ch.queue_declare(queue, passive=True).method.message_count
        ch.close()
    finally:
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass


def sub_session(port, out, subscribe_if_new):
    """Connects `crash-sub` with clean session 0, reads what the session holds until IDLE, and
    (subscribe_if_new) subscribes only when the broker had no session. Fills out[...]."""
    out.update(bodies=[], present=None, resubscribed=False, error=None)
    state = {}
    ok = mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=SUB_ID, protocol=mqtt.MQTTv311, clean_session=False)

    def on_connect(cl, ud, flags, rc, props):
        state["connack"] = rc
        state["present"] = bool(flags.session_present)
        state["last"] = time.monotonic()

    def on_message(cl, ud, msg):
        out["bodies"].append(msg.payload.decode("utf-8", "replace"))
        state["last"] = time.monotonic()

    c.on_connect = on_connect
    c.on_message = on_message
    c.on_subscribe = lambda cl, ud, mid, rcs, props: state.update(suback=rcs)
    c.on_disconnect = lambda *a: state.update(gone=True)
    c.connect(HOST, port, keepalive=30)
    try:
        deadline = time.monotonic() + WAIT
        while "connack" not in state:
            if c.loop(0.05) != ok or time.monotonic() > deadline:
                raise RoundError("crash-sub: no CONNACK")
        if state["connack"].is_failure:
            raise RoundError(f"crash-sub: CONNACK {state['connack']}")
        out["present"] = state["present"]
        cap = time.monotonic() + DRAIN_CAP
        while time.monotonic() - state["last"] < IDLE:
            if c.loop(0.05) != ok:
                raise RoundError("crash-sub: connection lost while reading")
            if time.monotonic() > cap:
                out["error"] = f"crash-sub still receiving after {DRAIN_CAP:.0f} s"
                break
        if subscribe_if_new and not out["present"]:
            c.subscribe(SUB_FILTER, qos=1)
            deadline = time.monotonic() + WAIT
            while "suback" not in state:
                if c.loop(0.05) != ok or time.monotonic() > deadline:
                    raise RoundError("crash-sub: no SUBACK")
            granted = state["suback"][0]
            if granted.is_failure or granted.value != 1:
                raise RoundError(f"crash-sub: subscription refused or downgraded: {granted}")
            out["resubscribed"] = True
        c.disconnect()  # after the PUBACKs of everything read, in order on the same connection
        deadline = time.monotonic() + WAIT
        while "gone" not in state and time.monotonic() < deadline:
            if c.loop(0.05) != ok:
                break
    finally:
        try:
            c.socket() and c.socket().close()
        except Exception:  # noqa: BLE001
            pass


def spawn(fn, *args, timeout=DRAIN_CAP + 3 * WAIT):
    """Starts fn(*args) in a thread; join_all() waits for it at most `timeout` seconds."""
    box = {}

    def body():
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001
            box["exc"] = e

    t = threading.Thread(target=body, daemon=True, name=getattr(fn, "__name__", "task"))
    t.start()
    return t, box, timeout


def join_all(tasks):
    """Joins spawned tasks; returns their errors (an exception, or not finishing in time)."""
    errors = []
    for t, box, timeout in tasks:
        t.join(timeout)
        if t.is_alive():
            errors.append(f"{t.name} did not finish within {timeout:.0f} s")
        elif "exc" in box:
            e = box["exc"]
            errors.append(f"{t.name}: {type(e).__name__}: {e}")
    return errors


# --- the test ------------------------------------------------------------------------------------


class CrashTest:
    def __init__(self, exe):
        self.exe = exe
        self.rounds = env_int("CRASH_ROUNDS", 8)
        self.no_kill = env_flag("CRASH_NO_KILL")
        self.allow_resurrected = env_flag("CRASH_ALLOW_RESURRECTED")
        seed = os.environ.get("CRASH_SEED", "").strip()
        self.seed = int(seed) if seed else random.SystemRandom().randrange(1, 2**31)
        rng = random.Random(self.seed)
        # Kill points spread over [KILL_MIN, KILL_MAX): one per stratum, strata in random order.
        n = self.rounds + 1
        width = (KILL_MAX - KILL_MIN) / n
        self.delays = [rng.uniform(KILL_MIN + i * width, KILL_MIN + (i + 1) * width) for i in range(n)]
        rng.shuffle(self.delays)
        self.work = tempfile.mkdtemp(prefix="ferry-crash-")
        # The bridge's remote: a second Ferry on its own ports and data directory, never killed.
        os.makedirs(os.path.join(self.work, "remote"))
        self.remote = Broker(exe, os.path.join(self.work, "remote"), name="remote")
        self.remote_sub = None
        self.broker = Broker(exe, self.work, bridge_to=lambda: self.remote.mqtt_port)
        self.bridge_rounds = []  # (round, sent, accepted) of the bridged publisher
        self.acked = {AMQP_Q: set(), MQTT_Q: set(), SUB_ID: set()}  # ids consumed and acked so far
        self.totals = collections.Counter()
        self.failed_rounds = []

    # one round ------------------------------------------------------------------------------
    def run_round(self, r, mode, delay):
        b = self.broker
        ledger = Ledger()
        setup_queues(b.amqp_port)
        pubs = [AmqpPublisher(b.amqp_port, r, i, w, ledger) for i, w in enumerate(AMQP_WINDOWS)]
        pubs += [MqttPublisher(b.mqtt_port, r, i, w, ledger) for i, w in enumerate(MQTT_WINDOWS)]
        pubs += [BridgePublisher(b.mqtt_port, r, i, w, ledger) for i, w in enumerate(BRIDGE_WINDOWS)]
        for p in pubs:
            p.start()
        for p in pubs:
            if not p.ready.wait(WAIT):
                for q in pubs:
                    q.stop(graceful=False)
                raise RoundError(f"{p.name} could not start publishing: {p.error or 'no reply within 10 s'}")

        t0 = time.monotonic()
        for p in pubs:
            p.begin()
        frozen = False
        while time.monotonic() - t0 < delay:
            if not frozen and time.monotonic() - t0 >= delay / 2:
                # The remote stops answering for the second half: the bridge has a backlog (and
                # up to max_inflight messages sent but not acknowledged) when ferry is killed.
                self.remote.freeze()
                frozen = True
            if not b.alive():
                self.remote.thaw()
                rc = b.proc.poll() if b.proc else None
                b.proc = None
                raise RoundError(f"ferry died on its own (status {rc}) {time.monotonic() - t0:.2f} s into publishing")
            time.sleep(min(0.02, max(0.0, delay - (time.monotonic() - t0))))
        elapsed = time.monotonic() - t0
        notes, fails = [], []
        # what the remote's subscriber had at the kill: the rest of what is accepted is the backlog
        at_kill = None

        if mode == "kill":
            b.kill()
            at_kill = set(self.remote_sub.snapshot()[0])
            self.remote.thaw()
            how = f"killed after {elapsed:.2f} s"
        elif mode == "term":
            at_kill = set(self.remote_sub.snapshot()[0])
            self.remote.thaw()
            rc, took = b.terminate()
            how = f"SIGTERM after {elapsed:.2f} s, exit {rc if rc is not None else 'none (killed)'} in {took:.2f} s"
            if rc != 0:
                fails.append(f"ferry did not shut down cleanly on SIGTERM (exit status {rc})")
        else:
            self.remote.thaw()
            how = f"publishers stopped after {elapsed:.2f} s (no kill)"

        for p in pubs:
            p.stop(graceful=(mode == "none"))
        deadline = time.monotonic() + WAIT
        for p in pubs:
            p.join(max(0.1, deadline - time.monotonic()))
        stuck = [p.name for p in pubs if p.is_alive()]
        if stuck:
            if mode == "none":
                raise RoundError(f"publishers did not stop: {', '.join(stuck)}")
            notes.append(f"publishers still stopping: {', '.join(stuck)}")
        if mode == "none":
            errs = [f"{p.name}: {p.error}" for p in pubs if p.error]
            if errs:
                raise RoundError("publisher errors without a kill: " + "; ".join(errs))
        sent, confirmed, nacked = ledger.snapshot()
        self.bridge_rounds.append((r, sent.pop("bridge"), confirmed.pop("bridge"), at_kill))
        nacked.pop("bridge")

        if mode != "none":
            b.start()

        outs = {AMQP_Q: {}, MQTT_Q: {}, SUB_ID: {}}
        tasks = [
            spawn(drain_queue, b.amqp_port, AMQP_Q, outs[AMQP_Q]),
            spawn(drain_queue, b.amqp_port, MQTT_Q, outs[MQTT_Q]),
            spawn(sub_session, b.mqtt_port, outs[SUB_ID], True),
        ]
        errs = join_all(tasks)
        if errs:
            raise RoundError("draining failed: " + "; ".join(errs))

        return self.check(r, how, sent, confirmed, nacked, outs, notes, fails)

    def check(self, r, how, sent, confirmed, nacked, outs, notes, fails):
        places = [(AMQP_Q, "amqp", "a"), (MQTT_Q, "mqtt", "m"), (SUB_ID, "mqtt", "m")]
        c = collections.Counter()
        for place, kind, prefix in places:
            out = outs[place]
            if out.get("error"):
                notes.append(f"{place}: {out['error']}")
            if out.get("lost"):
                fails.append(f"{place}: the durable queue is gone after the restart")
            if place == SUB_ID:
                if out["present"] is False:
                    fails.append("crash-sub: the persistent session is gone after the restart (session present = 0)")
                if out["resubscribed"]:
                    notes.append("crash-sub session re-created and re-subscribed for the next round")
            if out.get("left"):
                notes.append(f"{place}: {out['left']} messages still in the queue after the drain")
            counts = collections.Counter(out.get("bodies", []))
            dups = sum(n - 1 for n in counts.values() if n > 1)
            unconfirmed = resurrected = late = 0
            unknown = []
            res_examples = []
            for mid in counts:
                m = ID_RE.match(mid)
                if not m or m.group(1) != prefix:
                    unknown.append(mid)
                    continue
                rr = int(m.group(2))
                if rr == r:
                    if mid in confirmed[kind]:
                        pass
                    elif mid in sent[kind]:
                        unconfirmed += 1
                    else:
                        unknown.append(mid)
                elif rr < r:
                    if mid in self.acked[place]:
                        resurrected += 1
                        res_examples.append(mid)
                    else:
                        late += 1
                else:
                    unknown.append(mid)
            missing = sorted(confirmed[kind] - counts.keys(), key=id_order)
            self.acked[place] |= counts.keys()
            c["missing"] += len(missing)
            c["duplicates"] += dups
            c["unconfirmed"] += unconfirmed
            c["resurrected"] += resurrected
            c["late"] += late
            c["unknown"] += len(unknown)
            if missing:
                fails.append(
                    f"missing in {place}: {len(missing)} of {len(confirmed[kind])} confirmed {kind} ids,"
                    f" e.g. {', '.join(missing[:10])}"
                )
            if resurrected:
                msg = (
                    f"resurrected in {place}: {resurrected} ids consumed and acked in an earlier round came back,"
                    f" e.g. {', '.join(sorted(res_examples, key=id_order)[:10])}"
                )
                (notes if self.allow_resurrected else fails).append(msg)
            if unknown:
                fails.append(f"in {place} but never published there: {len(unknown)} ids, e.g. {', '.join(unknown[:10])}")
            if late:
                notes.append(f"{place}: {late} unconfirmed ids of earlier rounds seen only now")
        for kind in ("amqp", "mqtt"):
            if not confirmed[kind]:
                fails.append(f"no {kind} publish was confirmed in this round")
        n_nacked = len(nacked["amqp"]) + len(nacked["mqtt"])

        line = (
            f"round {r}: {how}; confirmed amqp {len(confirmed['amqp'])} mqtt {len(confirmed['mqtt'])};"
            f" missing {c['missing']}; duplicates {c['duplicates']}; unconfirmed present {c['unconfirmed']}"
        )
        if c["resurrected"]:
            line += f"; resurrected {c['resurrected']}"
        if c["late"]:
            line += f"; late {c['late']}"
        if n_nacked:
            line += f"; nacked {n_nacked}"
        if fails:
            line += "  <-- FAILED"
        print(line, flush=True)
        for f in fails:
            print(f"  FAIL {f}", flush=True)
        for nt in notes:
            print(f"  note {nt}", flush=True)

        self.totals["rounds"] += 1
        self.totals["confirmed"] += len(confirmed["amqp"]) + len(confirmed["mqtt"])
        self.totals.update(c)
        if fails:
            self.failed_rounds.append(r)

    # the run ----------------------------------------------------------------------------------
    def run(self):
        t_start = time.monotonic()
        modes = ["none"] * self.rounds if self.no_kill else ["kill"] * self.rounds + ["term"]
        print(
            f"crash-test: seed {self.seed} (CRASH_SEED={self.seed} repeats it); "
            + (
                f"{self.rounds} rounds without kills (CRASH_NO_KILL)"
                if self.no_kill
                else f"{self.rounds} SIGKILL rounds + 1 SIGTERM round"
            )
            + f"; work dir {self.work}",
            flush=True,
        )
        aborted = None
        try:
            self.remote.start()
            self.remote_sub = RemoteSubscriber(self.remote.mqtt_port)
            self.remote_sub.start()
            self.broker.start()
            setup_queues(self.broker.amqp_port)
            out = {}
            sub_session(self.broker.mqtt_port, out, True)
            if not out["resubscribed"]:
                raise RoundError("crash-sub: a fresh data directory already had a session")
        except (RoundError, OSError, pika.exceptions.AMQPError) as e:
            aborted = (0, f"setup: {type(e).__name__}: {e}")
        if aborted is None:
            for r, mode in enumerate(modes, start=1):
                try:
                    self.run_round(r, mode, self.delays[r - 1])
                except (RoundError, OSError, pika.exceptions.AMQPError) as e:
                    aborted = (r, f"{type(e).__name__}: {e}" if not isinstance(e, RoundError) else str(e))
                    break

        if aborted is not None:
            r, why = aborted
            what = "setup" if r == 0 else f"round {r}"
            print(f"{what}: COULD NOT RUN: {why}", flush=True)
            print(f"  tail of the broker log ({os.path.basename(self.broker.log or '-')}):", flush=True)
            print(self.broker.tail(), flush=True)
            if self.broker.starts > 1 and r > 0:
                prev = os.path.join(self.work, f"ferry-{self.broker.starts - 1}.log")
                if os.path.exists(prev):
                    with open(prev, "rb") as f:
                        lines = f.read().decode("utf-8", "replace").splitlines()[-15:]
                    print(f"  tail of the previous broker log ({os.path.basename(prev)}):", flush=True)
                    print("\n".join(f"    | {x}" for x in lines), flush=True)

        bridge_failed = False
        if aborted is None and self.bridge_rounds:
            bridge_failed = self.check_bridge()
        elif self.bridge_rounds:
            print("crash-test bridge: not checked (a round could not run)", flush=True)

        t = self.totals
        ok = aborted is None and not self.failed_rounds and not bridge_failed
        verdict = "ok" if ok else "FAILED"
        why = []
        if self.failed_rounds:
            why.append(f"rounds {', '.join(map(str, self.failed_rounds))} failed")
        if aborted is not None:
            why.append("setup could not run" if aborted[0] == 0 else f"round {aborted[0]} could not run")
        if bridge_failed:
            why.append("the bridge check failed")
        print(
            f"crash-test: {t['rounds']} rounds, {t['confirmed']} confirmed, {t['missing']} missing,"
            f" {t['duplicates']} duplicates, {t['unconfirmed']} unconfirmed present, {t['resurrected']} resurrected"
            f" ({time.monotonic() - t_start:.0f} s, seed {self.seed}): {verdict}"
            + (f" ({'; '.join(why)})" if why else ""),
            flush=True,
        )
        return 0 if ok else 1

    def check_bridge(self):
        """After the last round: waits (at most BRIDGE_WAIT s) until every accepted bridged id has
        reached the remote, then IDLE more for late duplicates; prints one line per round and a
        summary. Returns True when it failed."""
        accepted = set().union(*(a for _r, _s, a, _k in self.bridge_rounds))
        sent = set().union(*(s for _r, s, _a, _k in self.bridge_rounds))
        t0 = time.monotonic()
        while True:
            bodies, last = self.remote_sub.snapshot()
            seen = set(bodies)
            now = time.monotonic()
            if accepted <= seen and now - last >= IDLE:
                break
            if now - t0 > BRIDGE_WAIT:
                break
            time.sleep(0.1)
        waited = time.monotonic() - t0
        counts = collections.Counter(bodies)
        failed = False
        tot = collections.Counter()
        unknown = [mid for mid in counts if mid not in sent]
        for r, s, a, at_kill in self.bridge_rounds:
            mine = {mid: n for mid, n in counts.items() if mid in s}
            missing = sorted(a - mine.keys(), key=bridge_order)
            dups = sum(n - 1 for n in mine.values())
            unaccepted = sum(1 for mid in mine if mid not in a)
            fails = []
            if missing:
                fails.append(
                    f"missing at the remote: {len(missing)} of {len(a)} accepted ids, e.g. {', '.join(missing[:10])}"
                )
            if not a:
                fails.append("no bridged publish was accepted in this round")
            # accepted, not yet at the remote's subscriber when the broker was killed (or stopped)
            backlog = len(a - at_kill) if at_kill is not None else 0
            print(
                f"bridge round {r}: accepted {len(a)}; backlog at the kill {backlog}; missing {len(missing)};"
                f" duplicates {dups}; unaccepted present {unaccepted}" + ("  <-- FAILED" if fails else ""),
                flush=True,
            )
            for f in fails:
                print(f"  FAIL {f}", flush=True)
            failed = failed or bool(fails)
            tot.update(accepted=len(a), backlog=backlog, missing=len(missing), duplicates=dups, unaccepted=unaccepted)
        if unknown:
            print(f"  FAIL at the remote but never published: {len(unknown)} ids, e.g. {', '.join(unknown[:10])}")
            failed = True
        if self.remote_sub.disconnected:
            print("  note the subscriber on the remote was disconnected during the run", flush=True)
        print(
            f"crash-test bridge: {len(self.bridge_rounds)} rounds, {tot['accepted']} accepted,"
            f" {tot['backlog']} in the backlog at the kills, {tot['missing']} missing,"
            f" {tot['duplicates']} duplicates, {tot['unaccepted']} unaccepted present"
            + (
                f" (backlog drained {waited:.1f} s after the last round)"
                if accepted <= seen
                else f" (backlog not drained within {BRIDGE_WAIT:.0f} s)"
            )
            + f": {'FAILED' if failed else 'ok'}",
            flush=True,
        )
        return failed

    def cleanup(self):
        if self.remote_sub is not None:
            self.remote_sub.stop()
        if self.remote.alive():
            self.remote.thaw()
            self.remote.kill()
        if self.broker.alive():
            self.broker.kill()
        if env_flag("CRASH_KEEP"):
            print(f"crash-test: work directory kept: {self.work}", flush=True)
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def id_order(mid):
    m = ID_RE.match(mid)
    return (m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))) if m else (mid, 0, 0, 0)


def bridge_order(mid):
    m = BRIDGE_RE.match(mid)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else (0, 0, 0)


def main():
    if len(sys.argv) != 2:
        print("usage: crash_test.py PATH/TO/ferry", file=sys.stderr)
        return 2
    test = CrashTest(os.path.abspath(sys.argv[1]))

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    limit = env_int("CRASH_TIMEOUT", 300)

    def watchdog():
        print(f"crash-test: FAILED: the run took longer than {limit} s (CRASH_TIMEOUT); aborting", flush=True)
        print(test.broker.tail(), flush=True)
        try:
            test.cleanup()
        finally:
            os._exit(3)

    timer = threading.Timer(limit, watchdog)
    timer.daemon = True
    timer.start()
    try:
        return test.run()
    finally:
        timer.cancel()
        test.cleanup()


if __name__ == "__main__":
    sys.exit(main())
