#!/usr/bin/env bash
# Side-by-side AMQP 0-9-1 benchmark: Ferry and RabbitMQ on this machine, driven by
# `ferry-bench amqp` over loopback. See docs/benchmarks.md for what each scenario means.
#
# Installs rabbitmq-server when missing (apt-get, needs root; the Debian package starts a system
# service on 5672, which is stopped again right after the install), builds `ferry` and
# `ferry-bench` in release, starts a private RabbitMQ node `bench@localhost` on 127.0.0.1:25672
# (its own mnesia, logs, cookie and config in a temporary directory, distribution port 25680 on
# loopback) and Ferry on 127.0.0.1:25673, runs every scenario against both brokers alternately
# (ferry, rabbitmq, ferry, rabbitmq: ROUNDS rounds, to expose noise), prints a table with the
# Ferry/RabbitMQ ratio of each round, and the brokers' peak RSS. Everything it started is stopped
# on exit (Ferry, the RabbitMQ node with `rabbitmqctl stop`, epmd if it was not running before).
# Every run is bounded (`--timeout`, plus `timeout(1)` around it) and the runs share a time
# budget, so the script ends by itself: about a minute of runs when all goes well, under 10
# minutes at worst.
#
# Environment: ROUNDS (2), BENCH_THREADS (generator worker threads, default nproc),
# RUN_TIMEOUT (seconds per run, 25), BUDGET (seconds for all runs, 480), KEEP=1 keeps the work
# directory (configs, logs, JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

ROUNDS=${ROUNDS:-2}
BENCH_THREADS=${BENCH_THREADS:-$(nproc)}
RUN_TIMEOUT=${RUN_TIMEOUT:-25}
BUDGET=${BUDGET:-480}
RABBIT_PORT=25672
RABBIT_DIST_PORT=25680
FERRY_PORT=25673
NODE=bench@localhost
RABBIT_BIN=/usr/lib/rabbitmq/bin

# name|ferry-bench arguments
scenarios=(
  "auto-ack 1->1|--publishers 1 --consumers 1 --messages 200000 --size 64"
  "ack+confirm 1->1|--publishers 1 --consumers 1 --messages 50000 --size 64 --manual-ack --confirm"
  "persistent 1->1|--publishers 1 --consumers 1 --messages 50000 --size 64 --manual-ack --confirm --persistent"
)

# --- tools ------------------------------------------------------------------------------------
if [ ! -x "$RABBIT_BIN/rabbitmq-server" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing rabbitmq-server..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server) >/dev/null 2>&1 ||
      { echo "bench: could not install rabbitmq-server"; exit 1; }
    # The package starts (or tries to start) the system service on 5672: not ours, stop it.
    timeout 60 service rabbitmq-server stop >/dev/null 2>&1 || true
  else
    echo "bench: rabbitmq-server is missing (apt-get install -y rabbitmq-server)"; exit 1
  fi
fi
command -v python3 >/dev/null 2>&1 || { echo "bench: python3 is needed for the table"; exit 1; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in $RABBIT_PORT $RABBIT_DIST_PORT $FERRY_PORT; do
  if port_busy "$p"; then echo "bench: port $p on 127.0.0.1 is already in use"; exit 1; fi
done

echo "building (release)..."
cargo build -q --release -p ferry-server -p ferry-bench || { echo "bench: build failed"; exit 1; }
ferry_bin="$root/target/release/ferry"
bench_bin="$root/target/release/ferry-bench"

# --- brokers ----------------------------------------------------------------------------------
work=$(mktemp -d)
mkdir -p "$work/rabbit/home" "$work/rabbit/mnesia" "$work/rabbit/log"
epmd_before=$(pgrep -x epmd | tr '\n' ' ')
fpid=""
rpid=""
beam=""
# The RabbitMQ tools, as root but with this run's own cookie ($HOME) and node.
rabbit_env() {
  env HOME="$work/rabbit/home" \
    RABBITMQ_NODENAME=$NODE \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT=$RABBIT_PORT \
    RABBITMQ_DIST_PORT=$RABBIT_DIST_PORT \
    RABBITMQ_MNESIA_BASE="$work/rabbit/mnesia" \
    RABBITMQ_LOG_BASE="$work/rabbit/log" \
    RABBITMQ_CONFIG_FILE="$work/rabbit/rabbitmq.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$work/rabbit/enabled_plugins" \
    RABBITMQ_PID_FILE="$work/rabbit/pid" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    ERL_EPMD_ADDRESS=127.0.0.1 \
    "$@"
}
cleanup() {
  [ -n "$fpid" ] && kill "$fpid" 2>/dev/null
  if [ -n "$rpid" ]; then
    rabbit_env timeout 30 "$RABBIT_BIN/rabbitmqctl" -q -n $NODE stop >/dev/null 2>&1
    # `stop` returns while the VM halts; give it 10 s before forcing it.
    for _ in $(seq 20); do
      [ -n "$beam" ] && kill -0 "$beam" 2>/dev/null || break
      sleep 0.5
    done
    [ -n "$beam" ] && kill -9 "$beam" 2>/dev/null
    kill "$rpid" 2>/dev/null
  fi
  # epmd, when this run's node started it.
  for p in $(pgrep -x epmd); do
    case " $epmd_before " in *" $p "*) ;; *) kill "$p" 2>/dev/null ;; esac
  done
  sleep 0.5
  [ -n "$fpid" ] && kill -9 "$fpid" 2>/dev/null
  if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cat >"$work/rabbit/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$RABBIT_PORT
EOF
echo "[]." >"$work/rabbit/enabled_plugins"
cat >"$work/ferry.toml" <<EOF
[broker]
data_dir = "ferry-data"
log_level = "warn"

[[listeners]]
protocol = "amqp"
bind = "127.0.0.1:$FERRY_PORT"
EOF

(cd "$work/rabbit" && rabbit_env "$RABBIT_BIN/rabbitmq-server" >"$work/rabbitmq.out" 2>&1) &
rpid=$!
"$ferry_bin" -c "$work/ferry.toml" >"$work/ferry.log" 2>&1 &
fpid=$!

wait_port() {
  for _ in $(seq "$2"); do
    port_busy "$1" && return 0
    sleep 0.5
  done
  return 1
}
wait_port $FERRY_PORT 20 || { echo "bench: ferry did not start"; cat "$work/ferry.log"; exit 1; }
# Erlang takes 5-20 s to boot RabbitMQ: the node first, then its AMQP listener.
started=$(date +%s)
while [ $(($(date +%s) - started)) -lt 60 ]; do
  rabbit_env timeout 10 "$RABBIT_BIN/rabbitmq-diagnostics" -q -n $NODE ping >/dev/null 2>&1 && break
  kill -0 "$rpid" 2>/dev/null || break
  sleep 1
done
if ! wait_port $RABBIT_PORT 60; then
  echo "bench: rabbitmq did not start within $(($(date +%s) - started)) s"
  tail -20 "$work/rabbitmq.out"
  exit 1
fi
beam=$(cat "$work/rabbit/pid" 2>/dev/null)
[ -n "$beam" ] || beam=$(pgrep -f "beam.smp.*$NODE" | head -1)
rabbit_version=$(rabbit_env timeout 20 "$RABBIT_BIN/rabbitmqctl" -q -n $NODE version 2>/dev/null)

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
echo "brokers: ferry $("$ferry_bin" --version | awk '{print $2}') on :$FERRY_PORT (pid $fpid)," \
  "RabbitMQ ${rabbit_version:-?} on :$RABBIT_PORT (beam.smp pid ${beam:-?}, up in $(($(date +%s) - started)) s)"
echo "generator: ferry-bench, $BENCH_THREADS thread(s), --timeout $RUN_TIMEOUT --settle 3;" \
  "defaults: prefetch 200, confirm window 500, manual acks as basic.ack multiple=true every 50"
echo

# --- runs -------------------------------------------------------------------------------------
mkdir -p "$work/results"
runs_started=$(date +%s)
index=0
for entry in "${scenarios[@]}"; do
  name=${entry%%|*}
  args=${entry#*|}
  for round in $(seq "$ROUNDS"); do
    for broker in ferry rabbitmq; do
      if [ $broker = ferry ]; then port=$FERRY_PORT pid=$fpid; else port=$RABBIT_PORT pid=$beam; fi
      out="$work/results/$(printf %03d $index).json"
      index=$((index + 1))
      if [ $(($(date +%s) - runs_started + RUN_TIMEOUT + 20)) -gt "$BUDGET" ]; then
        printf '{"error": "skipped: the %s s time budget is spent"}\n' "$BUDGET" >"$out"
      elif ! kill -0 "$pid" 2>/dev/null; then
        printf '{"error": "broker process %s is gone"}\n' "$pid" >"$out"
      else
        # shellcheck disable=SC2086 # $args is a list of arguments
        timeout $((RUN_TIMEOUT + 20)) "$bench_bin" amqp --port $port $args --threads "$BENCH_THREADS" \
          --timeout "$RUN_TIMEOUT" --settle 3 --json >"$out" 2>"$out.err"
        rc=$?
        [ -s "$out" ] || printf '{"error": "ferry-bench exited with %s: %s"}\n' "$rc" \
          "$(tr -d '"\\' <"$out.err" | tr '\n' ' ')" >"$out"
      fi
      printf '%s\t%s\t%s\t%s\n' "$name" "$round" "$broker" "$out" >>"$work/index.tsv"
      printf '  %-18s round %s %-9s %s\n' "$name" "$round" "$broker" \
        "$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r.get("error") or "%.0f deliveries/s, %d lost%s" % (r["delivery_rate"] or 0, r["lost"], "; " + "; ".join(r["errors"]) if r["errors"] else ""))' "$out")"
    done
  done
done

# --- peak RSS (before the brokers are stopped) --------------------------------------------------
rss() { [ -n "$1" ] && grep -s VmHWM "/proc/$1/status" | awk '{print $2 " " $3}'; }
ferry_rss=$(rss "$fpid")
rabbit_rss=$(rss "$beam")

echo
python3 - "$work/index.tsv" <<'PY'
import json, sys

rows = []
for line in open(sys.argv[1]):
    name, rnd, broker, path = line.rstrip("\n").split("\t")
    try:
        r = json.load(open(path))
    except Exception as e:  # noqa: BLE001
        r = {"error": f"unreadable result: {e}"}
    rows.append((name, int(rnd), broker, r))

def fmt(v, spec="{:.0f}"):
    return "-" if v is None else spec.format(v)

print(f"{'scenario':<18} {'round':>5} {'broker':<9} {'deliveries/s':>13} {'publish/s':>10} {'lost':>7} {'p50 us':>9} {'p99 us':>9}  notes")
for name, rnd, broker, r in rows:
    if "error" in r:
        print(f"{name:<18} {rnd:>5} {broker:<9} {'-':>13} {'-':>10} {'-':>7} {'-':>9} {'-':>9}  ERROR: {r['error']}")
        continue
    notes = []
    if r["lost"]:
        notes.append(f"lost {r['loss_pct']:.1f}%")
    if r["confirm_window"] is not None and (r["nacked"] or r["unconfirmed"]):
        notes.append(f"{r['nacked']} nacked, {r['unconfirmed']} unconfirmed")
    if r["timed_out"]:
        notes.append("timed out")
    if r["duplicates"]:
        notes.append(f"{r['duplicates']} duplicates")
    if r["redelivered"]:
        notes.append(f"{r['redelivered']} redelivered")
    if broker == "ferry" and r["persistent"]:
        notes.append("Ferry: durable queue in memory (no redb store yet)")
    notes += r["missing_sample"][:2] + r["errors"][:2]
    lat = r["latency_us"]
    print(f"{name:<18} {rnd:>5} {broker:<9} {fmt(r['delivery_rate']):>13} {fmt(r['publish_rate']):>10} {r['lost']:>7} "
          f"{fmt(lat['p50']):>9} {fmt(lat['p99']):>9}  {'; '.join(notes)}")

print()
print("Ferry/RabbitMQ, same round (throughput: >1 = Ferry delivers more per second; latency: <1 = Ferry faster)")
print(f"{'scenario':<18} {'round':>5} {'deliveries/s':>13} {'p50':>7} {'p99':>7}  {'lost ferry':>10} {'lost rabbit':>11}")
by = {(n, rnd, b): r for n, rnd, b, r in rows}
for name, rnd in dict.fromkeys((n, rnd) for n, rnd, _, _ in rows):
    f, m = by.get((name, rnd, "ferry"), {}), by.get((name, rnd, "rabbitmq"), {})
    if "error" in f or "error" in m or not f or not m:
        print(f"{name:<18} {rnd:>5} {'n/a (a run failed)':>13}")
        continue
    def ratio(a, b):
        return "-" if not a or not b else f"{a / b:.2f}"
    print(f"{name:<18} {rnd:>5} {ratio(f['delivery_rate'], m['delivery_rate']):>13} "
          f"{ratio(f['latency_us']['p50'], m['latency_us']['p50']):>7} {ratio(f['latency_us']['p99'], m['latency_us']['p99']):>7}  "
          f"{f['lost']:>10} {m['lost']:>11}")
PY

echo
echo "peak RSS (VmHWM) after all runs: ferry ${ferry_rss:-unknown (process gone)}," \
  "rabbitmq beam.smp ${rabbit_rss:-unknown (process gone)}"
echo "note: in the persistent scenario Ferry keeps its durable queue in memory until the redb store lands;" \
  "RabbitMQ writes to disk and confirms after the write."
if ! kill -0 "$fpid" 2>/dev/null; then echo "ferry died during the runs; last log lines:"; tail -20 "$work/ferry.log"; fi
if [ -z "$beam" ] || ! kill -0 "$beam" 2>/dev/null; then
  echo "rabbitmq died during the runs; last lines:"; tail -20 "$work/rabbitmq.out"
fi
