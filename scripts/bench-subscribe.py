#!/usr/bin/env python3
"""One huge SUBSCRIBE against a running broker, and what another client sees meanwhile.

An attacker (MQTT 5.0) sends one SUBSCRIBE with N distinct filters (`atk/<i>/x`) and waits for
its SUBACK, then DISCONNECTs and waits for the broker to close the socket (the session's
teardown). A victim (MQTT 3.1.1) publishes QoS 1 to a topic it subscribes to, one message at a
time, throughout: each round trip is PUBLISH -> PUBACK + its own message back. Reported per N:
the SUBACK time, the teardown time, and the victim's round trips (count, median, max) while each
ran.

    python3 scripts/bench-subscribe.py --port 1883 10000 20000 40000 60000

Standard library only. The broker must accept a SUBSCRIBE of that size (`max_frame_size`) and,
to measure the subscribing itself rather than the limits, have the `[mqtt]` subscription limits
off (`max_subscriptions_per_client = 0`, `max_subscriptions_per_packet = 0`).
"""

import argparse
import socket
import statistics
import struct
import threading
import time


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s(text):
    b = text.encode()
    return struct.pack(">H", len(b)) + b


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def connect(client_id, v5):
    level = 5 if v5 else 4
    body = s("MQTT") + bytes([level, 0x02]) + struct.pack(">H", 60)
    if v5:
        body += varint(0)
    body += s(client_id)
    return packet(0x10, body)


class Conn:
    def __init__(self, port, client_id, v5):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.v5 = v5
        self.sock.sendall(connect(client_id, v5))
        t, body = self.read()
        assert t >> 4 == 2 and body[1] == 0, f"CONNACK {body!r}"

    def read(self):
        """One packet: (first byte, body); None at EOF."""
        while True:
            if len(self.buf) >= 2:
                n, mult, i = 0, 1, 1
                while i < len(self.buf):
                    b = self.buf[i]
                    n += (b & 0x7F) * mult
                    mult *= 128
                    i += 1
                    if not b & 0x80:
                        break
                else:
                    i = None
                if i is not None and len(self.buf) >= i + n:
                    first, body = self.buf[0], self.buf[i : i + n]
                    self.buf = self.buf[i + n :]
                    return first, body
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return None
            self.buf += chunk


def victim(port, stop, samples):
    c = Conn(port, "victim", False)
    c.sock.sendall(packet(0x82, struct.pack(">H", 1) + s("victim/echo") + bytes([1])))
    t, _ = c.read()
    assert t >> 4 == 9
    pid = 1
    while not stop.is_set():
        pid = pid % 65000 + 1
        start = time.monotonic()
        c.sock.sendall(packet(0x32, s("victim/echo") + struct.pack(">H", pid) + b"ping"))
        acked = echoed = False
        while not (acked and echoed):
            t, body = c.read()
            kind = t >> 4
            if kind == 4:
                acked = True
            elif kind == 3:
                echoed = True
                qos = (t >> 1) & 3
                if qos:
                    tlen = struct.unpack(">H", body[:2])[0]
                    c.sock.sendall(packet(0x40, body[2 + tlen : 4 + tlen]))
        end = time.monotonic()
        samples.append((start, end))


def during(samples, t0, t1):
    """Round trips that overlap [t0, t1], in ms."""
    rtts = [(e - s) * 1000 for s, e in samples if e >= t0 and s <= t1]
    if not rtts:
        return "no round trip completed"
    return f"{len(rtts)} round trips, median {statistics.median(rtts):.2f} ms, max {max(rtts):.1f} ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("sizes", type=int, nargs="+")
    a = ap.parse_args()
    stop = threading.Event()
    samples = []
    th = threading.Thread(target=victim, args=(a.port, stop, samples), daemon=True)
    th.start()
    time.sleep(0.5)
    for n in a.sizes:
        atk = Conn(a.port, f"attacker-{n}", True)
        body = struct.pack(">H", 7) + varint(0)
        body += b"".join(s(f"atk/{i}/x") + b"\x01" for i in range(n))
        sub = packet(0x82, body)
        t0 = time.monotonic()
        atk.sock.sendall(sub)
        while True:
            t, ack = atk.read()
            if t >> 4 == 9:
                break
        t1 = time.monotonic()
        codes = ack[3:]
        granted = sum(1 for c in codes if c < 0x80)
        time.sleep(0.3)
        t2 = time.monotonic()
        atk.sock.sendall(packet(0xE0, b"\x00\x00"))
        while atk.read() is not None:
            pass
        t3 = time.monotonic()
        print(
            f"N={n} ({len(sub)} B): SUBACK after {(t1 - t0) * 1000:.0f} ms ({granted} granted); "
            f"victim meanwhile: {during(samples, t0, t1)}"
        )
        print(f"    teardown {(t3 - t2) * 1000:.0f} ms; victim meanwhile: {during(samples, t2, t3)}")
        time.sleep(0.3)
    stop.set()
    th.join(timeout=5)
    rtts = [(e - s) * 1000 for s, e in samples]
    print(f"victim overall: {len(rtts)} round trips, median {statistics.median(rtts):.2f} ms, max {max(rtts):.1f} ms")


if __name__ == "__main__":
    main()
