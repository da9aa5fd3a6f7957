#!/usr/bin/env bash
# Side-by-side MQTT benchmark: Ferry and Mosquitto on this machine, driven by `ferry-bench mqtt`
# over loopback. See docs/benchmarks.md for what each scenario means.
#
# Installs mosquitto when missing (apt-get, needs root), builds `ferry` and `ferry-bench` in
# release, starts Mosquitto on 127.0.0.1:18830 and Ferry on 127.0.0.1:18831, runs every scenario
# against both brokers alternately (ferry, mosquitto, ferry, mosquitto: ROUNDS rounds, to expose
# noise), prints a table with the Ferry/Mosquitto ratio of each round, and the brokers' peak RSS.
# Both brokers are killed on exit. Every run is bounded (`--timeout`, plus `timeout(1)` around it),
# so the script ends by itself: about a minute of runs when all goes well, 8 minutes at worst.
#
# Environment: ROUNDS (2), BENCH_THREADS (generator worker threads, default nproc),
# RUN_TIMEOUT (seconds per run, 20), KEEP=1 keeps the work directory (configs, logs, JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

ROUNDS=${ROUNDS:-2}
BENCH_THREADS=${BENCH_THREADS:-$(nproc)}
RUN_TIMEOUT=${RUN_TIMEOUT:-20}
MOSQ_PORT=18830
FERRY_PORT=18831

# name|ferry-bench arguments
scenarios=(
  "qos0 1->1|--qos 0 --publishers 1 --subscribers 1 --messages 200000 --size 64"
  "qos1 1->1|--qos 1 --publishers 1 --subscribers 1 --messages 50000 --size 64 --inflight 100"
  "fan-out qos0 1->50|--qos 0 --publishers 1 --subscribers 50 --messages 10000 --size 64"
)

# --- tools ------------------------------------------------------------------------------------
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing mosquitto..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto) >/dev/null 2>&1 ||
      { echo "bench: could not install mosquitto"; exit 1; }
  else
    echo "bench: mosquitto is missing (apt-get install -y mosquitto)"; exit 1
  fi
fi
mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
command -v python3 >/dev/null 2>&1 || { echo "bench: python3 is needed for the table"; exit 1; }

echo "building (release)..."
cargo build -q --release -p ferry-server -p ferry-bench || { echo "bench: build failed"; exit 1; }
ferry_bin="$root/target/release/ferry"
bench_bin="$root/target/release/ferry-bench"

# --- brokers ----------------------------------------------------------------------------------
work=$(mktemp -d)
mpid=""
fpid=""
cleanup() {
  for p in $fpid $mpid; do
    kill "$p" 2>/dev/null
  done
  sleep 0.5
  for p in $fpid $mpid; do
    kill -9 "$p" 2>/dev/null
  done
  if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cat >"$work/mosquitto.conf" <<EOF
listener $MOSQ_PORT 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 100000
max_inflight_messages 100
log_dest stderr
log_type error
log_type warning
EOF
cat >"$work/ferry.toml" <<EOF
[broker]
data_dir = "ferry-data"
log_level = "warn"

[[listeners]]
protocol = "mqtt"
bind = "127.0.0.1:$FERRY_PORT"
max_frame_size = 1048576
EOF

"$mosquitto_bin" -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
mpid=$!
"$ferry_bin" -c "$work/ferry.toml" >"$work/ferry.log" 2>&1 &
fpid=$!

wait_port() {
  for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}
wait_port $MOSQ_PORT || { echo "bench: mosquitto did not start"; cat "$work/mosquitto.log"; exit 1; }
wait_port $FERRY_PORT || { echo "bench: ferry did not start"; cat "$work/ferry.log"; exit 1; }

mosq_version=$("$mosquitto_bin" -h 2>/dev/null | head -1)
echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
echo "brokers: ferry $("$ferry_bin" --version | awk '{print $2}') on :$FERRY_PORT (pid $fpid), $mosq_version on :$MOSQ_PORT (pid $mpid)"
echo "generator: ferry-bench, $BENCH_THREADS thread(s), --timeout $RUN_TIMEOUT --settle 3"
echo

# --- runs -------------------------------------------------------------------------------------
mkdir -p "$work/results"
index=0
for entry in "${scenarios[@]}"; do
  name=${entry%%|*}
  args=${entry#*|}
  for round in $(seq "$ROUNDS"); do
    for broker in ferry mosquitto; do
      if [ $broker = ferry ]; then port=$FERRY_PORT pid=$fpid; else port=$MOSQ_PORT pid=$mpid; fi
      out="$work/results/$(printf %03d $index).json"
      index=$((index + 1))
      if ! kill -0 "$pid" 2>/dev/null; then
        printf '{"error": "broker process %s is gone"}\n' "$pid" >"$out"
      else
        # shellcheck disable=SC2086 # $args is a list of arguments
        timeout $((RUN_TIMEOUT + 30)) "$bench_bin" mqtt --port $port $args --threads "$BENCH_THREADS" \
          --timeout "$RUN_TIMEOUT" --settle 3 --json >"$out" 2>"$out.err"
        rc=$?
        [ -s "$out" ] || printf '{"error": "ferry-bench exited with %s: %s"}\n' "$rc" \
          "$(tr -d '"\\' <"$out.err" | tr '\n' ' ')" >"$out"
      fi
      printf '%s\t%s\t%s\t%s\n' "$name" "$round" "$broker" "$out" >>"$work/index.tsv"
      printf '  %-20s round %s %-9s %s\n' "$name" "$round" "$broker" \
        "$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r.get("error") or "%.0f deliveries/s, %d lost" % (r["delivery_rate"] or 0, r["lost"]))' "$out")"
    done
  done
done

# --- peak RSS (before the brokers are killed) ---------------------------------------------------
rss() { grep -s VmHWM "/proc/$1/status" | awk '{print $2 " " $3}'; }
ferry_rss=$(rss "$fpid")
mosq_rss=$(rss "$mpid")

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

print(f"{'scenario':<20} {'round':>5} {'broker':<10} {'deliveries/s':>13} {'lost':>8} {'p50 us':>9} {'p99 us':>9}  notes")
for name, rnd, broker, r in rows:
    if "error" in r:
        print(f"{name:<20} {rnd:>5} {broker:<10} {'-':>13} {'-':>8} {'-':>9} {'-':>9}  ERROR: {r['error']}")
        continue
    notes = []
    if r["lost"]:
        notes.append(f"lost {r['loss_pct']:.1f}%" + (" (QoS 0: allowed)" if r["qos"] == 0 else " (QoS 1: NOT allowed)"))
    if r["timed_out"]:
        notes.append("timed out")
    if r["duplicates"]:
        notes.append(f"{r['duplicates']} duplicates")
    notes += r["missing_sample"][:2] + r["errors"][:2]
    lat = r["latency_us"]
    print(f"{name:<20} {rnd:>5} {broker:<10} {fmt(r['delivery_rate']):>13} {r['lost']:>8} {fmt(lat['p50']):>9} {fmt(lat['p99']):>9}  {'; '.join(notes)}")

print()
print("Ferry/Mosquitto, same round (throughput: >1 = Ferry delivers more per second; latency: <1 = Ferry faster)")
print(f"{'scenario':<20} {'round':>5} {'deliveries/s':>13} {'p50':>7} {'p99':>7}  {'lost ferry':>10} {'lost mosq':>10}")
by = {(n, rnd, b): r for n, rnd, b, r in rows}
for name, rnd in dict.fromkeys((n, rnd) for n, rnd, _, _ in rows):
    f, m = by.get((name, rnd, "ferry"), {}), by.get((name, rnd, "mosquitto"), {})
    if "error" in f or "error" in m or not f or not m:
        print(f"{name:<20} {rnd:>5} {'n/a (a run failed)':>13}")
        continue
    def ratio(a, b):
        return "-" if not a or not b else f"{a / b:.2f}"
    print(f"{name:<20} {rnd:>5} {ratio(f['delivery_rate'], m['delivery_rate']):>13} "
          f"{ratio(f['latency_us']['p50'], m['latency_us']['p50']):>7} {ratio(f['latency_us']['p99'], m['latency_us']['p99']):>7}  "
          f"{f['lost']:>10} {m['lost']:>10}")
PY

echo
echo "peak RSS (VmHWM) after all runs: ferry ${ferry_rss:-unknown (process gone)}, mosquitto ${mosq_rss:-unknown (process gone)}"
if ! kill -0 "$fpid" 2>/dev/null; then echo "ferry died during the runs; last log lines:"; tail -20 "$work/ferry.log"; fi
if ! kill -0 "$mpid" 2>/dev/null; then echo "mosquitto died during the runs; last log lines:"; tail -20 "$work/mosquitto.log"; fi
