#!/bin/bash
# A/B of two ferry builds in one run: OLD and NEW (release binaries) alternate per round, each
# on a fresh data directory, driven by the same ferry-bench (BENCH) over loopback.
# Prints one line per run: label | scenario | delivery rate | broker CPU ms per 1000 messages
# (utime+stime from /proc/<pid>/stat around the run; 10 ms ticks, so small runs are coarse).
#   OLD=/path/to/old/ferry NEW=target/release/ferry ROUNDS=5 ONLY='mqtt qos1|amqp' scripts/bench-ab.sh
# Compare medians per scenario: the machine is shared and runs vary by ±15 %.
set -u
mkdir -p /tmp/fb
cat > /tmp/fb/f.toml <<'TOML'
[broker]
data_dir="data"
[[listeners]]
protocol="mqtt"
bind="127.0.0.1:21883"
[[listeners]]
protocol="amqp"
bind="127.0.0.1:25672"
TOML
ONLY=${ONLY:-}
B=${BENCH:-$PWD/target/release/ferry-bench}
NEW=${NEW:-$PWD/target/release/ferry}
ROUNDS=${ROUNDS:-3}
HZ=$(getconf CLK_TCK)
scen=(
 "mqtt --port 21883 --qos 0 --publishers 1 --subscribers 1 --messages 200000 --size 64|200000|mqtt qos0 1->1"
 "mqtt --port 21883 --qos 1 --publishers 1 --subscribers 1 --messages 50000 --inflight 100 --size 64|50000|mqtt qos1 1->1"
 "mqtt --port 21883 --qos 0 --publishers 50 --subscribers 1 --messages 4000 --size 64|200000|mqtt qos0 50->1"
 "mqtt --port 21883 --qos 0 --publishers 1 --subscribers 50 --messages 10000 --size 64|500000|mqtt qos0 1->50"
 "amqp --port 25672 --publishers 1 --consumers 1 --messages 200000 --size 64|200000|amqp autoack 1->1"
 "amqp --port 25672 --publishers 1 --consumers 1 --messages 50000 --size 64 --confirm --persistent --manual-ack|50000|amqp confirm+persist+ack"
 "cross --mqtt-port 21883 --amqp-port 25672 --qos 1 --messages 50000|50000|cross mqtt->amqp qos1"
)
run() { # bin label
  cd /tmp/fb && rm -rf data
  $1 --config f.toml --log-level warn > /tmp/fb/log-$2 2>&1 & local pid=$!; sleep 1
  for s in "${scen[@]}"; do
    IFS="|" read -r args n name <<< "$s"; [[ -n "$ONLY" && ! "$name" =~ $ONLY ]] && continue
    t0=$(awk '{print $14+$15}' /proc/$pid/stat)
    out=$($B $args 2>&1)
    t1=$(awk '{print $14+$15}' /proc/$pid/stat)
    d=$(echo "$out" | grep -i "delivery:" | head -1 | sed 's/.*= //')
    [ -z "$d" ] && d=$(echo "$out" | grep -iE "rate|msg/s" | head -1)
    cpu=$(echo "scale=3; ($t1-$t0)*1000/$HZ*1000/$n" | bc)
    echo "$2 | $name | $d | cpu ms/1k msgs $cpu"
  done
  kill $pid; wait $pid 2>/dev/null
}
OLD=${OLD:?OLD=<old ferry binary>}
out=$(mktemp)
for r in $(seq "$ROUNDS"); do run "$OLD" old; run "$NEW" new; done | tee "$out"
# Medians per scenario, and new/old.
python3 - "$out" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    p = [x.strip() for x in line.split('|')]
    if len(p) < 4 or not p[2].split() or not p[2].split()[0].replace('.', '').isdigit():
        continue
    rows.setdefault((p[1], p[0]), []).append((float(p[2].split()[0]), float(p[3].split()[-1])))
for sc in dict.fromkeys(k[0] for k in rows):
    o, n = rows.get((sc, 'old'), []), rows.get((sc, 'new'), [])
    if not o or not n:
        continue
    mo, mn = statistics.median(r for r, _ in o), statistics.median(r for r, _ in n)
    co, cn = statistics.median(c for _, c in o), statistics.median(c for _, c in n)
    print(f"{sc:28s} old {mo/1000:7.0f}k/s {co:.2f} ms/1k msgs | new {mn/1000:7.0f}k/s {cn:.2f} ms/1k msgs | new/old {mn/mo:.2f}")
PY
rm -f "$out"
