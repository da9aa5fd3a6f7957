#!/bin/bash
# Latency while saturated (issue 18), A/B of Ferry builds and settings against Mosquitto, in one
# run, alternating per round. Each variant is a fresh broker; per variant and round:
#   sat   scripts/bench-saturation.py: a raw publisher (256 KiB SO_SNDBUF) floods QoS 0 64 B at
#         a raw Python subscriber slower than Ferry; deliveries/s and latency in a 5 s window
#         after a 1 s warm-up (the issue's generator, as far as it is described)
#   fb    ferry-bench mqtt QoS 0 1->1, 3M x 64 B: its subscriber keeps up, so the broker is the
#         bottleneck; deliveries/s and latency of every message
# (SIZE=64 payload bytes, MESSAGES=3000000 for ferry-bench), and broker CPU (utime+stime from /proc/<pid>/stat) per 1,000 messages the subscriber got.
#   VARIANTS='main=/path/old/ferry| new=target/release/ferry| new+buf=target/release/ferry|socket_send_buffer=65536;socket_recv_buffer=65536' \
#   BENCH=target/release/ferry-bench ROUNDS=3 scripts/bench-saturation.sh
# A variant is label=binary|listener keys (';' between keys); label "mosquitto" runs Mosquitto
# (`mosquitto -c`, listener on the same port, allow_anonymous true). Prints one line per run.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/ferry-sat.XXXXXX)
PORT=${PORT:-31883}
ROUNDS=${ROUNDS:-3}
MESSAGES=${MESSAGES:-3000000}
SIZE=${SIZE:-64}
B=${BENCH:-$root/target/release/ferry-bench}
HZ=$(getconf CLK_TCK)
IFS=' ' read -r -a variants <<< "${VARIANTS:?VARIANTS='label=binary|keys ...'} mosquitto=mosquitto|"
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
start() { # label binary keys
  cd "$work" && rm -rf data
  if [ "$1" = mosquitto ]; then
    printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$PORT" > m.conf
    mosquitto -c m.conf > m.log 2>&1 & pid=$!
  else
    { printf '[broker]\ndata_dir="data"\n[[listeners]]\nprotocol="mqtt"\nbind="127.0.0.1:%s"\n' "$PORT"
      echo "$3" | tr ';' '\n'; } > f.toml
    "$2" --config f.toml --log-level warn > f.log 2>&1 & pid=$!
  fi
  for _ in $(seq 40); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return; sleep 0.25; done
}
for r in $(seq "$ROUNDS"); do
  for v in "${variants[@]}"; do
    label=${v%%=*}; rest=${v#*=}; bin=${rest%%|*}; keys=${rest#*|}
    start "$label" "$bin" "$keys"
    t0=$(ticks $pid)
    sat=$(python3 "$root/scripts/bench-saturation.py" --port "$PORT" --size "$SIZE" --json)
    t1=$(ticks $pid)
    fb=$("$B" mqtt --port "$PORT" --qos 0 --publishers 1 --subscribers 1 --messages "$MESSAGES" --size "$SIZE" --json --timeout 60 --settle 2)
    t2=$(ticks $pid)
    kill $pid; wait $pid 2>/dev/null
    python3 - "$r" "$label" "$sat" "$fb" "$((t1 - t0))" "$((t2 - t1))" "$HZ" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import json, sys
r, label, sat, fb, c1, c2, hz, load = sys.argv[1:]
s, f = json.loads(sat), json.loads(fb)
hz = int(hz)
# The saturation run's broker CPU covers warm-up and window; per message sent by its publisher.
sat_cpu = int(c1) * 1000 / hz / max(1, s["sent"]) * 1000
fb_cpu = int(c2) * 1000 / hz / max(1, f["deliveries"]) * 1000
print(f"round {r} | {label:10} | sat {s['rate']:>9,.0f}/s p50 {s['p50_ms']:6.1f} p99 {s['p99_ms']:6.1f} max {s['max_ms']:6.1f} ms cpu {sat_cpu:5.2f} ms/1k "
      f"| fb {f['delivery_rate']:>9,.0f}/s p50 {f['latency_us']['p50']/1000:6.1f} p99 {f['latency_us']['p99']/1000:6.1f} ms lost {f['lost']} cpu {fb_cpu:5.2f} ms/1k | load {load}")
PY
  done
done
rm -rf "$work"
