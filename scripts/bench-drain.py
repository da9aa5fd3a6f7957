#!/usr/bin/env python3
"""Drains N messages from an AMQP 0-9-1 queue (no-ack) over a raw socket and prints the rate,
and the broker's CPU and RSS (from /proc/PID) over the drain. Usage: bench-drain.py PORT QUEUE N PID (scripts/bench-paging.sh runs it)"""
import socket, struct, sys, time

port, queue, n, pid = int(sys.argv[1]), sys.argv[2].encode(), int(sys.argv[3]), int(sys.argv[4])

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / 100.0

def rss(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS:"):
            return int(l.split()[1]) * 1024

s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
buf = bytearray()

def read_frame():
    global buf
    while True:
        if len(buf) >= 7:
            t, ch, size = struct.unpack_from(">BHI", buf, 0)
            if len(buf) >= 8 + size:
                payload = bytes(buf[7:7 + size])
                del buf[:8 + size]
                return t, ch, payload
        d = s.recv(1 << 20)
        if not d:
            raise SystemExit("closed")
        buf += d

def method(ch, cls, mid, args=b""):
    p = struct.pack(">HH", cls, mid) + args
    s.sendall(struct.pack(">BHI", 1, ch, len(p)) + p + b"\xce")

def shortstr(b):
    return bytes([len(b)]) + b

def expect(cls, mid):
    while True:
        t, ch, p = read_frame()
        if t == 1:
            c, m = struct.unpack_from(">HH", p, 0)
            if (c, m) == (cls, mid):
                return p
            raise SystemExit(f"expected {cls}.{mid}, got {c}.{m}: {p[:80]!r}")

s.sendall(b"AMQP\x00\x00\x09\x01")
expect(10, 10)
resp = b"\x00guest\x00guest"
method(0, 10, 11, struct.pack(">I", 0) + shortstr(b"PLAIN") + struct.pack(">I", len(resp)) + resp + shortstr(b"en_US"))
p = expect(10, 30)
chmax, fmax, hb = struct.unpack_from(">HIH", p, 4)
method(0, 10, 31, struct.pack(">HIH", chmax, fmax, 0))
method(0, 10, 40, shortstr(b"/") + shortstr(b"") + b"\x00")
expect(10, 41)
method(1, 20, 10, shortstr(b""))
expect(20, 11)
method(1, 60, 10, struct.pack(">IHB", 0, 1000, 0))
expect(60, 11)
method(1, 60, 20, struct.pack(">H", 0) + shortstr(queue) + shortstr(b"") + b"\x02" + struct.pack(">I", 0))
expect(60, 21)

count = 0
rss_max = rss(pid)
c0 = cpu(pid)
t0 = None
last_rss = time.time()
view_start = 0
while count < n:
    d = s.recv(4 << 20)
    if not d:
        raise SystemExit("closed")
    buf += d
    i = 0
    L = len(buf)
    while L - i >= 7:
        t, ch, size = struct.unpack_from(">BHI", buf, i)
        if L - i < 8 + size:
            break
        if t == 1 and buf[i + 7:i + 11] == b"\x00\x3c\x00\x3c":
            count += 1
            if t0 is None:
                t0 = time.time()
                c0 = cpu(pid)
        i += 8 + size
    del buf[:i]
    now = time.time()
    if now - last_rss > 0.5:
        rss_max = max(rss_max, rss(pid))
        last_rss = now
t1 = time.time()
c1 = cpu(pid)
rss_max = max(rss_max, rss(pid))
secs = t1 - t0
print(f"drained {count} in {secs:.2f} s: {count / secs:,.0f} msgs/s; broker CPU {c1 - c0:.2f} s = "
      f"{(c1 - c0) / count * 1e6:.2f} us/msg; broker RSS max {rss_max / 1e6:.0f} MB")
