#!/usr/bin/env python3
"""QoS 0 latency while saturated, measured as an outside generator does (issue 18).

One raw MQTT 3.1.1 publisher sends 64 B (`--size`) QoS 0 messages to one topic as fast as its socket takes
them (its send buffer set to 256 KiB before connecting, as the issue's generator did); one raw
subscriber reads them. Each payload starts with the send time (CLOCK_MONOTONIC, ns, taken just
before the write of its batch). After a warm-up (default 1 s from the first delivery) the
subscriber records every delivery's latency for a window (default 5 s), then both stop.

The two clients are separate processes, so the subscriber is not slowed by the publisher's
interpreter. A Python subscriber reads fewer messages per second than Ferry can deliver: that is
the point (a broker that delivers faster than its subscriber reads must not let the backlog
grow without bound in front of it), and what makes the figure differ from `ferry-bench`, whose
subscriber keeps up with the broker.

    python3 scripts/bench-saturation.py --port 1883 [--warmup 1] [--window 5] [--json]

Standard library only. Prints deliveries/s in the window, latency p50/p90/p99/max (ms) and how
many messages the publisher sent.
"""

import argparse
import json
import multiprocessing as mp
import socket
import struct
import time

TOPIC = b"bench/sat"
SIZE = 64
BATCH = 256


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def s(b):
    return struct.pack(">H", len(b)) + b


def connect(port, client_id, sndbuf=None):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.connect(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = s(b"MQTT") + bytes([4, 0x02]) + struct.pack(">H", 60) + s(client_id.encode())
    sock.sendall(packet(0x10, body))
    got = b""
    while len(got) < 4:
        chunk = sock.recv(4 - len(got))
        if not chunk:
            raise SystemExit("connection closed before CONNACK")
        got += chunk
    assert got[0] == 0x20 and got[3] == 0, f"CONNACK {got!r}"
    return sock


def publisher(port, sndbuf, size, stop, sent):
    sock = connect(port, "sat-pub", sndbuf)
    header = packet(0x30, s(TOPIC) + bytes(size))[:-size]
    pad = bytes(size - 8)
    batch = max(1, BATCH * SIZE // size)
    n = 0
    try:
        while not stop.is_set():
            ts = struct.pack(">Q", time.monotonic_ns())
            one = header + ts + pad
            sock.sendall(one * batch)
            n += batch
    except OSError:
        pass
    sent.value = n
    sock.close()


def subscriber(port, warmup, window, ready, result, chunk_size=None):
    sock = connect(port, "sat-sub")
    sock.sendall(packet(0x82, struct.pack(">H", 1) + s(TOPIC) + bytes([0])))
    buf = b""
    while len(buf) < 5:
        buf += sock.recv(64)
    assert buf[0] == 0x90, f"SUBACK {buf[:5]!r}"
    buf = buf[5:]
    ready.set()
    unpack = struct.Struct(">Q").unpack_from
    if chunk_size is None:
        chunk_size = 1 << 18
    lat = []
    start = end = None
    count = 0
    while True:
        chunk = sock.recv(chunk_size)
        if not chunk:
            break
        now = time.monotonic_ns()
        buf += chunk
        i, n = 0, len(buf)
        times = []
        while i + 2 <= n:
            rl, h, mult = 0, 1, 1
            while i + h < n:
                b = buf[i + h]
                rl += (b & 0x7F) * mult
                mult <<= 7
                h += 1
                if not b & 0x80:
                    break
            else:
                break
            if i + h + rl > n:
                break
            if buf[i] >> 4 == 3:
                tl = (buf[i + h] << 8) | buf[i + h + 1]
                times.append(unpack(buf, i + h + 2 + tl)[0])
            i += h + rl
        buf = buf[i:]
        if start is None and times:
            start = now + int(warmup * 1e9)
            end = start + int(window * 1e9)
        if start is not None and now >= start:
            if now >= end:
                break
            count += len(times)
            lat.extend(now - t for t in times)
    sock.close()
    lat.sort()
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6 if lat else None
    result.update(
        deliveries=count,
        rate=count / window,
        p50_ms=pick(0.50),
        p90_ms=pick(0.90),
        p99_ms=pick(0.99),
        max_ms=lat[-1] / 1e6 if lat else None,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--window", type=float, default=5.0)
    ap.add_argument("--sndbuf", type=int, default=256 * 1024, help="publisher's SO_SNDBUF")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--size", type=int, default=SIZE, help="payload bytes (at least 8)")
    ap.add_argument(
        "--read-size",
        type=int,
        default=1 << 18,
        help="bytes the subscriber asks for per recv (smaller: a slower subscriber)",
    )
    a = ap.parse_args()
    manager = mp.Manager()
    result = manager.dict()
    ready, stop = mp.Event(), mp.Event()
    sent = mp.Value("q", 0)
    sub = mp.Process(target=subscriber, args=(a.port, a.warmup, a.window, ready, result, a.read_size))
    sub.start()
    if not ready.wait(10):
        raise SystemExit("subscriber not ready")
    pub = mp.Process(target=publisher, args=(a.port, a.sndbuf, max(8, a.size), stop, sent))
    pub.start()
    sub.join(a.warmup + a.window + 60)
    stop.set()
    pub.join(10)
    if pub.is_alive():
        pub.kill()
    out = dict(result)
    out["sent"] = sent.value
    if a.json:
        print(json.dumps(out))
    else:
        print(
            f"deliveries/s {out['rate']:,.0f}  p50 {out['p50_ms']:.1f} ms  p90 {out['p90_ms']:.1f} ms  "
            f"p99 {out['p99_ms']:.1f} ms  max {out['max_ms']:.1f} ms  (sent {out['sent']:,})"
        )


if __name__ == "__main__":
    main()
