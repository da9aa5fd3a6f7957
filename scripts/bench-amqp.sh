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

# name|ferry-bench arguments
scenarios=(
  "auto-ack 1->1|--publishers 1 --consumers 1 --messages 200000 --size 64"
  "ack+confirm 1->1|--publishers 1 --consumers 1 --messages 50000 --size 64 --manual-ack --confirm"
  "persistent 1->1|--publishers 1 --consumers 1 --messages 50000 --size 64 --manual-ack --confirm --persistent"
)

# --- tools ------------------------------------------------------------------------------------
# shellcheck source=scripts/bench-lib.sh
. "$root/scripts/bench-lib.sh"
bench_need_rabbitmq
bench_need_python
for p in $RABBIT_PORT $RABBIT_DIST_PORT $FERRY_PORT; do
  if port_busy "$p"; then echo "bench: port $p on 127.0.0.1 is already in use"; exit 1; fi
done
bench_build

# --- brokers ----------------------------------------------------------------------------------
work=$(mktemp -d)
cleanup() {
  [ -n "$fpid" ] && kill "$fpid" 2>/dev/null
  rabbit_stop
  sleep 0.5
  [ -n "$fpid" ] && kill -9 "$fpid" 2>/dev/null
  if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cat >"$work/ferry.toml" <<EOF
[broker]
data_dir = "ferry-data"
log_level = "warn"

[[listeners]]
protocol = "amqp"
bind = "127.0.0.1:$FERRY_PORT"
EOF

rabbit_start "[]"
"$ferry_bin" -c "$work/ferry.toml" >"$work/ferry.log" 2>&1 &
fpid=$!

wait_port $FERRY_PORT 20 || { echo "bench: ferry did not start"; cat "$work/ferry.log"; exit 1; }
rabbit_wait || exit 1

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
echo "brokers: ferry $("$ferry_bin" --version | awk '{print $2}') on :$FERRY_PORT (pid $fpid)," \
  "RabbitMQ ${rabbit_version:-?} on :$RABBIT_PORT (beam.smp pid ${beam:-?}, up in ${rabbit_up_secs:-?} s)"
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
echo "note: in the persistent scenario both brokers confirm a message after writing it to disk (Ferry: its redb" \
  "commit, fsync included); scripts/bench-persistence.sh has more persistent scenarios."
if ! kill -0 "$fpid" 2>/dev/null; then echo "ferry died during the runs; last log lines:"; tail -20 "$work/ferry.log"; fi
if [ -z "$beam" ] || ! kill -0 "$beam" 2>/dev/null; then
  echo "rabbitmq died during the runs; last lines:"; tail -20 "$work/rabbitmq.out"
fi
