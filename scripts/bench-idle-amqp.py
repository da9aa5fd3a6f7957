#!/usr/bin/env python3
"""Idle AMQP 0-9-1 connections: the broker's RSS per connection.

    scripts/bench-idle-amqp.py N PORT PID [HOLD]

Opens N connections to 127.0.0.1:PORT (raw sockets, no AMQP library: protocol header,
start-ok as guest/guest with PLAIN, tune-ok without heartbeats, connection.open of "/", one
channel.open), in batches of 200, waits 6 s, prints the VmRSS of process PID before the first
and with all of them open and the difference per connection, holds them HOLD more seconds (0),
then closes them. PID is the broker's process (for RabbitMQ, beam.smp). Used for
docs/benchmarks.md, "Idle AMQP connections".
"""
import asyncio
import struct
import sys


def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def frame(kind, channel, payload):
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


def method(channel, class_id, method_id, args):
    return frame(1, channel, struct.pack(">HH", class_id, method_id) + args)


def short_str(s):
    return bytes([len(s)]) + s


def long_str(s):
    return struct.pack(">I", len(s)) + s


async def read_frame(reader):
    kind, channel, size = struct.unpack(">BHI", await reader.readexactly(7))
    payload = await reader.readexactly(size + 1)
    return kind, payload[:-1]


async def connection(port, hold):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"AMQP\x00\x00\x09\x01")
    await read_frame(reader)  # connection.start
    start_ok = struct.pack(">I", 0) + short_str(b"PLAIN") + long_str(b"\x00guest\x00guest") + short_str(b"en_US")
    writer.write(method(0, 10, 11, start_ok))
    _, tune = await read_frame(reader)  # connection.tune
    channel_max, frame_max, _heartbeat = struct.unpack(">HIH", tune[4:12])
    writer.write(method(0, 10, 31, struct.pack(">HIH", channel_max, frame_max, 0)))
    writer.write(method(0, 10, 40, short_str(b"/") + short_str(b"") + b"\x00"))
    await read_frame(reader)  # connection.open-ok
    writer.write(method(1, 20, 10, short_str(b"")))
    await read_frame(reader)  # channel.open-ok
    await hold.wait()
    writer.close()


async def main():
    n, port, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    extra = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    hold = asyncio.Event()
    before = rss_kb(pid)
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(connection(port, hold)))
        if i % 200 == 199:
            await asyncio.sleep(0.05)
    await asyncio.sleep(6)
    failed = [t for t in tasks if t.done() and t.exception() is not None]
    after = rss_kb(pid)
    print(f"rss before {before} kB, with {n} connections {after} kB, "
          f"per connection {(after - before) * 1024 / n:.0f} B, {len(failed)} failed", flush=True)
    await asyncio.sleep(extra)
    hold.set()
    await asyncio.gather(*tasks, return_exceptions=True)


asyncio.run(main())
