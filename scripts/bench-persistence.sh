#!/usr/bin/env bash
# Persistence benchmarks: Ferry on its redb store, against RabbitMQ where there is something to
# compare, over loopback, driven by `ferry-bench`. See docs/benchmarks.md ("Persistence").
#
#   scripts/bench-persistence.sh [compare]   Ferry and RabbitMQ alternately, ROUNDS rounds:
#       (a) AMQP persistent publish with confirms to a durable queue, manual-ack consumer,
#           1 publisher and 16 publishers;
#       (b) MQTT 3.1.1 QoS 1, one publisher, to one subscriber in a persistent session
#           (clean session off, fixed client id; RabbitMQ with its rabbitmq_mqtt plugin);
#       (c) AMQP as (a), 1 publisher paced at 5,000 messages/s, the consumer holding a backlog of
#           20,000: what steady, moderate load costs each broker;
#       deliveries/s, p50/p99 latency, losses, each run's peak RSS, and the bytes the broker
#       wrote to disk and the CPU time it used per message, with Ferry/RabbitMQ ratios.
#   scripts/bench-persistence.sh churn       Ferry alone: a paced persistent publisher and a
#       consumer holding a standing backlog in a durable queue for CHURN_SECS, the size of
#       <data_dir>/ferry.redb sampled every SAMPLE_SECS (and IDLE_SECS after), then a restart.
#   scripts/bench-persistence.sh startup     Ferry alone: fill a durable queue with
#       STARTUP_MESSAGES persistent messages, SIGTERM, restart and time the recovery; then SIGKILL
#       during another fill and time the restart (redb repair); then the STARTUP_LARGE fill.
#   scripts/bench-persistence.sh all         the three, one after the other.
#
# Builds `ferry` and `ferry-bench` in release; installs rabbitmq-server when missing (compare
# only; apt-get, as root). Listens on loopback only: RabbitMQ AMQP 127.0.0.1:25672, MQTT 25883,
# distribution 25680; Ferry AMQP 25673, MQTT 25884; it refuses to start when one is taken.
# Everything it starts is stopped on exit, and every step is bounded (generator --timeout plus
# timeout(1); the compare runs share BUDGET), so the script ends by itself: compare takes 2 to 4
# minutes, churn CHURN_SECS plus about 2 minutes, startup 3 to 6 minutes.
#
# Environment: ROUNDS (2), BENCH_THREADS (generator threads, nproc), RUN_TIMEOUT (60 s per compare
# run), BUDGET (900 s for the compare runs); CHURN_SECS (300), CHURN_RATE (messages/s, 2000),
# CHURN_BACKLOG (50000), CHURN_SIZE (64), SAMPLE_SECS (10), IDLE_SECS (60); STARTUP_MESSAGES
# (1000000), STARTUP_SIZE (64), STARTUP_PUBLISHERS (4), KILL_AFTER (seconds into the fill that is
# killed, 3), STARTUP_LARGE ("100000x4096"; empty to skip); KEEP=1 keeps the work directory.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

MODE=${1:-compare}
case $MODE in
  compare | churn | startup | all) ;;
  *) echo "usage: $0 [compare|churn|startup|all]"; exit 2 ;;
esac

ROUNDS=${ROUNDS:-2}
BENCH_THREADS=${BENCH_THREADS:-$(nproc)}
RUN_TIMEOUT=${RUN_TIMEOUT:-60}
BUDGET=${BUDGET:-900}
CHURN_SECS=${CHURN_SECS:-300}
CHURN_RATE=${CHURN_RATE:-2000}
CHURN_BACKLOG=${CHURN_BACKLOG:-50000}
CHURN_SIZE=${CHURN_SIZE:-64}
SAMPLE_SECS=${SAMPLE_SECS:-10}
IDLE_SECS=${IDLE_SECS:-60}
STARTUP_MESSAGES=${STARTUP_MESSAGES:-1000000}
STARTUP_SIZE=${STARTUP_SIZE:-64}
STARTUP_PUBLISHERS=${STARTUP_PUBLISHERS:-4}
KILL_AFTER=${KILL_AFTER:-3}
STARTUP_LARGE=${STARTUP_LARGE-100000x4096}
RABBIT_PORT=25672
RABBIT_DIST_PORT=25680
RABBIT_MQTT_PORT=25883
FERRY_PORT=25673
FERRY_MQTT_PORT=25884

# name|protocol|ferry-bench arguments (plus --port, --threads, --timeout, --settle 3, --json)
scenarios=(
  "amqp persistent 1 pub|amqp|--publishers 1 --consumers 1 --messages 50000 --size 64 --persistent --confirm --manual-ack"
  "amqp persistent 16 pubs|amqp|--publishers 16 --consumers 1 --messages 10000 --size 64 --persistent --confirm --manual-ack"
  "amqp paced 5k/s backlog|amqp|--publishers 1 --consumers 1 --messages 150000 --size 64 --persistent --confirm --manual-ack --rate 5000 --backlog 20000"
  "mqtt qos1 persistent sess|mqtt|--qos 1 --publishers 1 --subscribers 1 --messages 50000 --size 64 --inflight 100 --clean-session false --client-id-prefix fb-persist"
)

# --- tools ------------------------------------------------------------------------------------
# shellcheck source=scripts/bench-lib.sh
. "$root/scripts/bench-lib.sh"
bench_need_python
if [ "$MODE" = compare ] || [ "$MODE" = all ]; then bench_need_rabbitmq; fi
for p in $RABBIT_PORT $RABBIT_DIST_PORT $RABBIT_MQTT_PORT $FERRY_PORT $FERRY_MQTT_PORT; do
  if port_busy "$p"; then echo "bench: port $p on 127.0.0.1 is already in use"; exit 1; fi
done
# The interpreter itself, not a version manager's shim (which adds ~0.3 s to every start).
py=$(python3 -c 'import sys; print(sys.executable)')
"$py" -c 'import pika' 2>/dev/null && have_pika=1 || have_pika=0
bench_build

work=$(mktemp -d)
gpid=""  # a generator running in the background
spid=""  # the file-size sampler
probe_pid=""  # the start-up probe
cleanup() {
  # shellcheck disable=SC2086 # lists of pids, some empty
  stop_all $gpid $spid $probe_pid $fpid
  if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')," \
  "$(awk '/MemTotal/ {printf "%.0f GB RAM", $2 / 1048576}' /proc/meminfo);" \
  "work directory on $(df -T "$work" | awk 'NR == 2 {print $1 " (" $2 ")"}')"
echo "ferry: $("$ferry_bin" --version), commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo ?)$(
  [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ] && echo " with local changes")"
busy=$(pgrep -f 'cargo |rustc ' | wc -l)
[ "$busy" -gt 0 ] && echo "warning: $busy cargo/rustc process(es) running: the machine is busy, figures will be noisy"
echo

# --- Ferry ------------------------------------------------------------------------------------
# ferry_start DIR LOG_LEVEL: a Ferry with its data in DIR/data, AMQP (and MQTT) on loopback.
ferry_start() {
  mkdir -p "$1"
  cat >"$1/ferry.toml" <<EOF
[broker]
data_dir = "data"
log_level = "$2"

[[listeners]]
protocol = "amqp"
bind = "127.0.0.1:$FERRY_PORT"

[[listeners]]
protocol = "mqtt"
bind = "127.0.0.1:$FERRY_MQTT_PORT"
EOF
  ferry_started=$(date +%s.%N)
  "$ferry_bin" -c "$1/ferry.toml" >>"$1/ferry.log" 2>&1 &
  fpid=$!
}

# ferry_stop TERM|KILL: stops Ferry; with TERM waits up to 120 s (then kill -9) and sets
# $stop_ms, the time from the signal to the exit.
ferry_stop() {
  [ -n "$fpid" ] || return 0
  local t0
  t0=$(date +%s%N)
  kill -"$1" "$fpid" 2>/dev/null
  for _ in $(seq 2400); do
    kill -0 "$fpid" 2>/dev/null || break
    sleep 0.05
  done
  if kill -0 "$fpid" 2>/dev/null; then
    echo "  ferry did not exit within 120 s of SIG$1: killed"
    kill -9 "$fpid" 2>/dev/null
  fi
  { wait "$fpid"; } 2>/dev/null
  stop_ms=$((($(date +%s%N) - t0) / 1000000))
  fpid=""
}

# file_size DIR: the store's length in bytes (and, after a space, its allocated bytes).
file_size() { stat -c '%s %b %B' "$1/data/ferry.redb" 2>/dev/null | awk '{print $1, $2 * $3}'; }
mb() { awk -v b="${1:-0}" 'BEGIN {printf "%.1f MB", b / 1e6}'; }

# queue_depth PORT QUEUE: message count by a passive queue.declare (pika), or "?".
queue_depth() {
  [ "$have_pika" = 1 ] || { echo "?"; return; }
  timeout 60 "$py" - "$1" "$2" <<'PY' 2>/dev/null || echo "?"
import sys, pika
params = pika.ConnectionParameters("127.0.0.1", int(sys.argv[1]), blocked_connection_timeout=30, socket_timeout=30)
conn = pika.BlockingConnection(params)
print(conn.channel().queue_declare(sys.argv[2], passive=True).method.message_count)
conn.close()
PY
}

# The start-up probe: from the spawn time, when TCP connects, when the broker answers the AMQP
# protocol header (it serves), and what the log says about opening and recovering the store.
cat >"$work/probe.py" <<'PY'
import datetime, json, re, socket, sys, time

# Started before Ferry: says it is ready in READY, then reads the spawn time from T0 once the
# script has written it, so its own start-up is not counted.
ready_file, t0_file, port, log, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
open(ready_file, "w").close()
give_up = time.time() + 30
t0 = None
res = {}
sock = None
while sock is None and time.time() < (give_up if t0 is None else t0 + limit):
    if t0 is None:
        try:
            t0 = float(open(t0_file).read())
        except (OSError, ValueError):
            pass
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=0.5)
        res["tcp_connect_ms"] = round((time.time() - (t0 or time.time())) * 1000)
    except OSError:
        time.sleep(0.002)
if t0 is None:
    print(json.dumps({"error": "no start time"}))
    sys.exit()
deadline = t0 + limit
if sock is not None:
    sock.settimeout(max(1.0, deadline - time.time()))
    try:
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        if sock.recv(64):
            res["amqp_answer_ms"] = round((time.time() - t0) * 1000)
    except OSError as e:
        res["amqp_error"] = str(e)
    sock.close()

def stamp(line):
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z", line)
    if not m:
        return None
    d = datetime.datetime.strptime(m.group(1)[:26], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=datetime.timezone.utc)
    return round((d.timestamp() - t0) * 1000)

def current():
    # The log is appended to across restarts: this start's lines only.
    return [(at, l) for l in open(log, errors="replace") if (at := stamp(l)) is not None and at >= -50]

lines = current()
while not any("ferry ready" in l for _, l in lines) and time.time() < deadline:
    time.sleep(0.05)
    lines = current()
for at, l in lines:
    if "opened in" in l and "store " in l:
        m = re.search(r": (\d+) bytes \((\d+) stored, (\d+) free\), opened in (\d+) ms", l)
        if m:
            res.update(file_bytes=int(m[1]), stored_bytes=int(m[2]), free_bytes=int(m[3]), open_ms=int(m[4]))
        res["open_line_ms"] = at
    elif "recovered the store" in l:
        res["recovered_line_ms"] = at
        for k, v in re.findall(r"(\w+)=(\d+)", l):
            res["recovered_" + k] = int(v)
    elif "store compacted" in l:
        res["compacted"] = " ".join(re.findall(r"\w+=\S+", l))
    elif "ferry ready" in l:
        res["ready_line_ms"] = at
print(json.dumps(res))
PY

# Summaries of ferry-bench reports: `summary.py churn FILE` and `summary.py fill FILE`.
cat >"$work/summary.py" <<'PY'
import json, sys

kind, path = sys.argv[1], sys.argv[2]
try:
    r = json.load(open(path))
except Exception as e:  # noqa: BLE001
    print(f"no report ({e})")
    sys.exit()
if "error" in r:
    print("ERROR", r["error"])
    sys.exit()
errors = ("; " + "; ".join(r["errors"][:2])) if r["errors"] else ""
if kind == "churn":
    lat = r["latency_us"]
    print(f"{r['sent']} sent at {r['publish_rate']:.0f}/s, {r['confirmed']} confirmed, {r['deliveries']} received, "
          f"{r['lost']} lost, {r['duplicates']} duplicates, {r['redelivered']} redelivered; latency p50 {lat['p50']} us, "
          f"p99 {lat['p99']} us, max {lat['max']} us{errors}")
elif kind == "fill":
    print(f"{r['sent']} sent, {r['confirmed']} confirmed in {r['publish_secs']:.1f} s ({r['publish_rate']:.0f}/s){errors}")
elif kind == "confirmed":
    print(r["confirmed"])
PY

# ferry_restart_probed DIR: starts Ferry on DIR with the probe watching; prints the probe's JSON
# (times in ms from the spawn).
ferry_restart_probed() {
  rm -f "$work/probe.ready" "$work/probe.t0"
  "$py" "$work/probe.py" "$work/probe.ready" "$work/probe.t0" "$FERRY_PORT" "$1/ferry.log" 600 >"$work/probe.json" &
  probe_pid=$!
  for _ in $(seq 200); do
    [ -e "$work/probe.ready" ] && break
    sleep 0.05
  done
  ferry_start "$1" info
  echo "$ferry_started" >"$work/probe.t0"
  wait "$probe_pid"
  probe_pid=""
  echo "  restart: $(cat "$work/probe.json")"
}

# --- compare: Ferry and RabbitMQ ---------------------------------------------------------------
run_compare() {
  echo "== compare: Ferry and RabbitMQ, persistent messages, $ROUNDS round(s)"
  rabbit_start "[rabbitmq_mqtt]" "mqtt.listeners.tcp.1 = 127.0.0.1:$RABBIT_MQTT_PORT"
  ferry_start "$work/compare" warn
  wait_port $FERRY_PORT 40 || { echo "bench: ferry did not start"; cat "$work/compare/ferry.log"; exit 1; }
  rabbit_wait $RABBIT_MQTT_PORT || exit 1
  echo "brokers: ferry on :$FERRY_PORT/:$FERRY_MQTT_PORT (pid $fpid), RabbitMQ ${rabbit_version:-?} on" \
    ":$RABBIT_PORT/:$RABBIT_MQTT_PORT with rabbitmq_mqtt (beam.smp pid ${beam:-?}, up in ${rabbit_up_secs:-?} s)"
  echo "generator: ferry-bench, $BENCH_THREADS thread(s), --timeout $RUN_TIMEOUT --settle 3"
  mkdir -p "$work/results"
  : >"$work/index.tsv"
  local started index=0 entry name proto args round broker port pid out rc hwm io0 io1
  started=$(date +%s)
  for entry in "${scenarios[@]}"; do
    name=${entry%%|*}
    proto=${entry#*|}
    proto=${proto%%|*}
    args=${entry##*|}
    for round in $(seq "$ROUNDS"); do
      for broker in ferry rabbitmq; do
        case $broker/$proto in
          ferry/amqp) port=$FERRY_PORT pid=$fpid ;;
          ferry/mqtt) port=$FERRY_MQTT_PORT pid=$fpid ;;
          rabbitmq/amqp) port=$RABBIT_PORT pid=$beam ;;
          rabbitmq/mqtt) port=$RABBIT_MQTT_PORT pid=$beam ;;
        esac
        out="$work/results/$(printf %03d $index).json"
        index=$((index + 1))
        hwm=""
        if [ $(($(date +%s) - started + RUN_TIMEOUT + 20)) -gt "$BUDGET" ]; then
          printf '{"error": "skipped: the %s s time budget is spent"}\n' "$BUDGET" >"$out"
        elif ! kill -0 "$pid" 2>/dev/null; then
          printf '{"error": "broker process %s is gone"}\n' "$pid" >"$out"
        else
          # Each run's own peak RSS: reset the high-water mark first (Linux clear_refs 5).
          reset_peak_rss "$pid" || hwm="(cumulative) "
          io0=$(proc_io "$pid")
          # shellcheck disable=SC2086 # $args is a list of arguments
          timeout $((RUN_TIMEOUT + 30)) "$bench_bin" "$proto" --port $port $args --threads "$BENCH_THREADS" \
            --timeout "$RUN_TIMEOUT" --settle 3 --json >"$out" 2>"$out.err"
          rc=$?
          [ -s "$out" ] || printf '{"error": "ferry-bench exited with %s: %s"}\n' "$rc" \
            "$(tr -d '"\\' <"$out.err" | tr '\n' ' ')" >"$out"
          hwm="$hwm$(rss "$pid")"
          io1=$(proc_io "$pid")
        fi
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$round" "$broker" "$out" "$hwm" "${io0:-}" "${io1:-}" \
          >>"$work/index.tsv"
        printf '  %-26s round %s %-9s %s\n' "$name" "$round" "$broker" \
          "$("$py" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r.get("error") or "%.0f deliveries/s, %d lost%s" % (r["delivery_rate"] or 0, r["lost"], "; " + "; ".join(r["errors"]) if r["errors"] else ""))' "$out")"
      done
    done
  done
  local fsize
  fsize=$(file_size "$work/compare")
  echo
  "$py" - "$work/index.tsv" <<'PY'
import json, os, sys

TICK = os.sysconf("SC_CLK_TCK")
rows = []
for line in open(sys.argv[1]):
    name, rnd, broker, path, hwm, io0, io1 = line.rstrip("\n").split("\t")
    try:
        r = json.load(open(path))
    except Exception as e:  # noqa: BLE001
        r = {"error": f"unreadable result: {e}"}
    # Per message sent: bytes the broker wrote to disk (write_bytes) and its CPU time.
    try:
        (w0, c0), (w1, c1) = [map(int, x.split()) for x in (io0, io1)]
        n = max(1, r.get("sent") or 0)
        r["disk_kb_per_msg"] = (w1 - w0) / 1024 / n
        r["cpu_us_per_msg"] = (c1 - c0) * 1e6 / TICK / n
    except ValueError:
        pass
    rows.append((name, int(rnd), broker, r, hwm))

def fmt(v, spec="{:.0f}"):
    return "-" if v is None else spec.format(v)

def kb(h):
    try:
        return int(h.split()[-2])
    except (IndexError, ValueError):
        return None

print(f"{'scenario':<26} {'round':>5} {'broker':<9} {'deliveries/s':>13} {'publish/s':>10} {'lost':>7} {'p50 us':>9} {'p99 us':>9} {'peak RSS':>13} {'disk KB/msg':>11} {'CPU us/msg':>10}  notes")
for name, rnd, broker, r, hwm in rows:
    if "error" in r:
        print(f"{name:<26} {rnd:>5} {broker:<9} {'-':>13} {'-':>10} {'-':>7} {'-':>9} {'-':>9} {'-':>13} {'-':>11} {'-':>10}  ERROR: {r['error']}")
        continue
    notes = []
    if r["lost"]:
        notes.append(f"lost {r['loss_pct']:.1f}%")
    if r.get("nacked") or r.get("unconfirmed") or r.get("rejected") or r.get("unacked"):
        notes.append("not confirmed: " + ", ".join(f"{k} {r[k]}" for k in ("nacked", "unconfirmed", "rejected", "unacked") if r.get(k)))
    if r["timed_out"]:
        notes.append("timed out")
    if r["duplicates"]:
        notes.append(f"{r['duplicates']} duplicates")
    if r.get("redelivered"):
        notes.append(f"{r['redelivered']} redelivered")
    notes += r["missing_sample"][:2] + r["errors"][:2]
    lat = r["latency_us"]
    print(f"{name:<26} {rnd:>5} {broker:<9} {fmt(r['delivery_rate']):>13} {fmt(r['publish_rate']):>10} {r['lost']:>7} "
          f"{fmt(lat['p50']):>9} {fmt(lat['p99']):>9} {hwm:>13} {fmt(r.get('disk_kb_per_msg'), '{:.2f}'):>11} "
          f"{fmt(r.get('cpu_us_per_msg'), '{:.1f}'):>10}  {'; '.join(notes)}")

print()
print("Ferry/RabbitMQ, same round (throughput: >1 = Ferry delivers more per second; latency and RSS: <1 = Ferry lower)")
print(f"{'scenario':<26} {'round':>5} {'deliveries/s':>13} {'p50':>7} {'p99':>7} {'peak RSS':>9} {'disk/msg':>9} {'CPU/msg':>8}  {'lost ferry':>10} {'lost rabbit':>11}")
by = {(n, rnd, b): (r, h) for n, rnd, b, r, h in rows}
for name, rnd in dict.fromkeys((n, rnd) for n, rnd, _, _, _ in rows):
    (f, fh), (m, mh) = by.get((name, rnd, "ferry"), ({}, "")), by.get((name, rnd, "rabbitmq"), ({}, ""))
    if "error" in f or "error" in m or not f or not m:
        print(f"{name:<26} {rnd:>5} {'n/a (a run failed)':>13}")
        continue
    def ratio(a, b):
        if not a or not b:
            return "-"
        return f"{a / b:.2f}" if a / b >= 0.095 else f"{a / b:.2g}"
    print(f"{name:<26} {rnd:>5} {ratio(f['delivery_rate'], m['delivery_rate']):>13} "
          f"{ratio(f['latency_us']['p50'], m['latency_us']['p50']):>7} {ratio(f['latency_us']['p99'], m['latency_us']['p99']):>7} "
          f"{ratio(kb(fh), kb(mh)):>9} {ratio(f.get('disk_kb_per_msg'), m.get('disk_kb_per_msg')):>9} "
          f"{ratio(f.get('cpu_us_per_msg'), m.get('cpu_us_per_msg')):>8}  {f['lost']:>10} {m['lost']:>11}")
PY
  echo
  echo "peak RSS: each run's own (VmHWM reset before the run, so it starts from the RSS the run found);" \
    "RabbitMQ's is the whole beam.smp VM."
  echo "disk KB/msg: the broker's write_bytes (/proc/<pid>/io) over the run / messages sent;" \
    "CPU us/msg: its user+system time over the run / messages sent."
  echo "ferry.redb after the compare runs: $(mb "${fsize%% *}") (length), $(mb "${fsize##* }") allocated"
  if [ -n "$fpid" ] && ! kill -0 "$fpid" 2>/dev/null; then
    echo "ferry died during the runs; last log lines:"; tail -20 "$work/compare/ferry.log"
  fi
  if [ -z "$beam" ] || ! kill -0 "$beam" 2>/dev/null; then
    echo "rabbitmq died during the runs; last lines:"; tail -20 "$work/rabbitmq.out"
  fi
  grep -E ' (WARN|ERROR) ' "$work/compare/ferry.log" | head -5
  ferry_stop TERM
  rabbit_stop
  echo
}

# --- churn: the file under a steady backlog -------------------------------------------------------
run_churn() {
  local dir="$work/churn" messages=$((CHURN_RATE * CHURN_SECS)) run_secs
  run_secs=$((CHURN_SECS + CHURN_BACKLOG / CHURN_RATE + 120))
  echo "== churn: $CHURN_RATE persistent ${CHURN_SIZE}-byte messages/s for ${CHURN_SECS} s through a durable queue" \
    "holding ~$CHURN_BACKLOG, confirms and manual acks; ferry.redb every ${SAMPLE_SECS} s, then ${IDLE_SECS} s idle"
  ferry_start "$dir" info
  wait_port $FERRY_PORT 40 || { echo "bench: ferry did not start"; cat "$dir/ferry.log"; exit 1; }
  timeout $((run_secs + 60)) "$bench_bin" amqp --port $FERRY_PORT --publishers 1 --consumers 1 \
    --messages "$messages" --size "$CHURN_SIZE" --persistent --confirm --manual-ack --rate "$CHURN_RATE" \
    --backlog "$CHURN_BACKLOG" --queue churn.q --threads "$BENCH_THREADS" --timeout "$run_secs" --settle 5 \
    --json >"$dir/bench.json" 2>"$dir/bench.err" &
  gpid=$!
  # The sampler: seconds, file length, allocated bytes, queue depth, Ferry's RSS; until the
  # generator is done and IDLE_SECS more.
  "$py" - "$dir/data/ferry.redb" "$FERRY_PORT" churn.q "$fpid" "$gpid" "$SAMPLE_SECS" "$IDLE_SECS" \
    "$have_pika" >"$dir/samples.tsv" <<'PY' &
import os, sys, time
path, port, queue, fpid, gpid, every, idle, have_pika = sys.argv[1:]
every, idle = float(every), float(idle)
if have_pika == "1":
    import pika

def depth():
    if have_pika != "1":
        return "?"
    try:
        params = pika.ConnectionParameters("127.0.0.1", int(port), socket_timeout=5, blocked_connection_timeout=5)
        conn = pika.BlockingConnection(params)
        n = conn.channel().queue_declare(queue, passive=True).method.message_count
        conn.close()
        return n
    except Exception:  # noqa: BLE001 (not declared yet)
        return "?"

def rss():
    try:
        for line in open(f"/proc/{fpid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return "?"

def io():
    """(bytes written to storage, CPU seconds) of Ferry so far."""
    try:
        w = next(int(l.split()[1]) for l in open(f"/proc/{fpid}/io") if l.startswith("write_bytes"))
        f = open(f"/proc/{fpid}/stat").read().rsplit(")", 1)[1].split()
        return w, (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, IndexError, ValueError):
        return None

t0 = time.time()
done_at = None
last = (t0, io())
print("secs\tfile_bytes\talloc_bytes\tdepth\tferry_rss_kb\tdisk_write_MB_s\tcpu_pct\tphase", flush=True)
while True:
    now = time.time()
    cur = io()
    if cur and last[1]:
        dt = max(1e-3, now - last[0])
        rate = f"{(cur[0] - last[1][0]) / dt / 1e6:.1f}\t{(cur[1] - last[1][1]) / dt * 100:.0f}"
    else:
        rate = "?\t?"
    last = (now, cur)
    running = os.path.exists(f"/proc/{gpid}")
    if not running and done_at is None:
        done_at = now
    try:
        st = os.stat(path)
        size, alloc = st.st_size, st.st_blocks * 512
    except OSError:
        size, alloc = "?", "?"
    print(f"{now - t0:.0f}\t{size}\t{alloc}\t{depth()}\t{rss()}\t{rate}\t{'load' if running else 'idle'}", flush=True)
    if done_at is not None and now - done_at >= idle:
        break
    time.sleep(max(0.0, every - (time.time() - now)))
PY
  spid=$!
  wait "$gpid"
  gpid=""
  wait "$spid"
  spid=""
  echo "  generator: $("$py" "$work/summary.py" churn "$dir/bench.json")"
  [ -s "$dir/bench.err" ] && head -3 "$dir/bench.err" | sed 's/^/  generator stderr: /'
  echo "  samples (secs, file length, allocated, queue depth, ferry RSS kB, Ferry's disk writes MB/s and CPU % over" \
    "the interval, phase):"
  sed 's/^/    /' "$dir/samples.tsv"
  grep -E 'store compacted|compaction|WARN|ERROR' "$dir/ferry.log" | head -20 | sed 's/^/  log: /'
  ferry_stop TERM
  echo "  SIGTERM: exited in $stop_ms ms; file $(mb "$(file_size "$dir" | cut -d' ' -f1)")"
  ferry_restart_probed "$dir"
  echo "  after the restart: file $(mb "$(file_size "$dir" | cut -d' ' -f1)"), churn.q holds $(queue_depth $FERRY_PORT churn.q)"
  ferry_stop TERM
  echo
}

# --- startup: recovery time with a large store ---------------------------------------------------
# fill DIR QUEUE MESSAGES SIZE [background]: persistent messages with confirms, nobody consuming.
fill() {
  local per=$(($3 / STARTUP_PUBLISHERS))
  local cmd=(timeout 2000 "$bench_bin" amqp --port $FERRY_PORT --publishers "$STARTUP_PUBLISHERS" --consumers 0
    --messages "$per" --size "$4" --persistent --confirm --queue "$2" --threads "$BENCH_THREADS" --timeout 1800
    --json)
  if [ "${5:-}" = background ]; then
    "${cmd[@]}" >"$1/fill-$2.json" 2>"$1/fill-$2.err" &
    gpid=$!
  else
    "${cmd[@]}" >"$1/fill-$2.json" 2>"$1/fill-$2.err"
  fi
}

fill_summary() { "$py" "$work/summary.py" fill "$1"; }
confirmed_of() { "$py" "$work/summary.py" confirmed "$1"; }

# startup_case NAME MESSAGES SIZE: fill, SIGTERM, restart and time it.
startup_case() {
  local dir="$work/$1" size
  echo "-- $1: $2 persistent messages of $3 B in durable queue startup.q ($STARTUP_PUBLISHERS publishers)"
  ferry_start "$dir" info
  wait_port $FERRY_PORT 40 || { echo "bench: ferry did not start"; cat "$dir/ferry.log"; exit 1; }
  fill "$dir" startup.q "$2" "$3"
  echo "  fill: $(fill_summary "$dir/fill-startup.q.json")"
  size=$(file_size "$dir")
  echo "  store: $(mb "${size%% *}") (length), $(mb "${size##* }") allocated; startup.q holds" \
    "$(queue_depth $FERRY_PORT startup.q); ferry RSS $(rss_now "$fpid") kB"
  ferry_stop TERM
  echo "  SIGTERM: exited in $stop_ms ms"
  ferry_restart_probed "$dir"
  echo "  after the restart: startup.q holds $(queue_depth $FERRY_PORT startup.q); ferry RSS $(rss_now "$fpid") kB" \
    "(peak $(rss "$fpid"))"
}

run_startup() {
  echo "== startup: recovery with a large store"
  startup_case startup "$STARTUP_MESSAGES" "$STARTUP_SIZE"
  local dir="$work/startup" killed_confirmed
  # Ferry is running on that store: fill another queue and SIGKILL it mid-way.
  echo "-- SIGKILL ${KILL_AFTER} s into a fill of queue startup.k (the store holding startup.q as above)"
  fill "$dir" startup.k "$STARTUP_MESSAGES" "$STARTUP_SIZE" background
  sleep "$KILL_AFTER"
  echo "  before the kill: $(mb "$(file_size "$dir" | cut -d' ' -f1)")"
  ferry_stop KILL
  wait "$gpid" 2>/dev/null
  gpid=""
  killed_confirmed=$(confirmed_of "$dir/fill-startup.k.json")
  echo "  fill: $(fill_summary "$dir/fill-startup.k.json")"
  ferry_restart_probed "$dir"
  echo "  after the restart: startup.q holds $(queue_depth $FERRY_PORT startup.q), startup.k holds" \
    "$(queue_depth $FERRY_PORT startup.k) (confirmed before the kill: $killed_confirmed); file" \
    "$(mb "$(file_size "$dir" | cut -d' ' -f1)"); ferry RSS $(rss_now "$fpid") kB"
  ferry_stop TERM
  if [ -n "$STARTUP_LARGE" ]; then
    startup_case startup-large "${STARTUP_LARGE%x*}" "${STARTUP_LARGE#*x}"
    ferry_stop TERM
  fi
  echo
}

case $MODE in
  compare) run_compare ;;
  churn) run_churn ;;
  startup) run_startup ;;
  all)
    run_compare
    run_churn
    run_startup
    ;;
esac
