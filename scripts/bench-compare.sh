#!/usr/bin/env bash
# Ferry against its peers on this machine, one script, one table per protocol, written into
# docs/benchmarks.md (between <!-- bench-compare:begin --> and <!-- bench-compare:end -->):
#
#   MQTT vs Mosquitto, in steady state (below): QoS 0, 1 and 2 1->1; fan-out QoS 0 1->50; fan-in
#     QoS 0 50->1; 4 KiB QoS 1 1->1; QoS 0 1->1 with the publisher's socket buffer left to the
#     system's autotuning (what the old method did); the same as floods (a fixed number of messages
#     as fast as possible, timed from the first write to the last delivery: the old method);
#     latency at a fixed 10,000 msgs/s (QoS 1); 10,000 idle connections (RSS per connection); a
#     subscriber that never reads while 1,000,000 QoS 0 messages are published (the broker's RSS
#     ceiling, sampled every 200 ms).
#   AMQP 0-9-1 vs RabbitMQ, in steady state and as floods: auto-ack 1->1; manual ack + confirms +
#     persistent to a durable queue; fanout to 10 queues; and latency at a fixed 10,000 msgs/s.
#   Cross-protocol, Ferry only (MQTT publisher -> AMQP consumer, QoS 1): no peer does it without
#     a bridge (RabbitMQ's MQTT plugin is not enabled here).
#   And each broker's RSS right after start, without clients.
#
# Steady state (`ferry-bench --warmup WARMUP --measure MEASURE --pid <broker>`, issue 18):
# publishers send continuously over sockets with a 256 KiB SO_SNDBUF (the kernel doubles it);
# what counts is what was delivered during the MEASURE-second window after WARMUP seconds, the
# broker's CPU time over that window per delivered message, and the latencies of the messages
# received in it; then the publishers stop, the run drains, and every acknowledged QoS 1/2 or
# confirmed message is checked off at every subscriber (a loss is an anomaly under the table).
#
# Every scenario runs against Ferry and its peer alternately (ferry, peer, ferry, peer: ROUNDS
# rounds), each run bounded (the generator's --timeout plus timeout(1)), all runs sharing a time
# budget. Besides the generator's figures, each run records the broker's CPU time (utime + stime
# from /proc/<pid>/stat, before and after the run) next to the generator's own CPU time.
#
# The brokers, all on 127.0.0.1, on the first free ports from 28830 up:
#   - Mosquitto (Debian package): `listener PORT 127.0.0.1`, `allow_anonymous true`,
#     `persistence false`; everything else default (max_queued_messages 1000,
#     max_inflight_messages 20, no memory limit).
#   - RabbitMQ (Debian package): a private node `bench@localhost` with default settings, started
#     as scripts/bench-amqp.sh does (its own mnesia, logs and cookie in the work directory,
#     distribution on loopback); no plugins. Its RSS is the beam.smp process's.
#   - Ferry (release build): one process with an MQTT and an AMQP listener, both
#     `max_connection_rate = 0` (the idle-connections scenario would otherwise be held to 1000
#     new connections/s), a fresh data directory in the work directory, everything else default.
# Mosquitto runs during the MQTT part only, RabbitMQ during the AMQP part only. `ulimit -n` is
# raised (to the hard limit, at least 65536 when root) for the brokers and the generator.
#
# Installs mosquitto and rabbitmq-server when missing (apt-get, as root), builds `ferry` and
# `ferry-bench` in release (FERRY_BIN and BENCH_BIN, both set, use those binaries instead).
# Scenarios the generator does not support yet (checked with `ferry-bench <cmd> --help`) are
# skipped with a message. Everything started is stopped on exit. About 15 minutes with ROUNDS=2.
#
# Environment: ROUNDS (2), BENCH_THREADS (generator threads, nproc), RUN_TIMEOUT (seconds per run,
# 30), BUDGET (seconds for all runs, 1500), SETTLE (generator --settle, 2), WARMUP and MEASURE
# (steady state, 1 and 5 s), PARTS (which parts to
# run, "mqtt amqp cross"), SCENARIOS (keys of the scenarios to run, e.g. "qos1 idle"; all by
# default), DOCS (1: write the section into DOC_FILE, docs/benchmarks.md; 0: print only),
# KEEP=1 keeps the work directory (configs, logs, the per-run JSON and index.tsv).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
root=$(pwd)
cmdline="ROUNDS=${ROUNDS:-2} scripts/bench-compare.sh${*:+ $*}"

ROUNDS=${ROUNDS:-2}
BENCH_THREADS=${BENCH_THREADS:-$(nproc)}
RUN_TIMEOUT=${RUN_TIMEOUT:-30}
BUDGET=${BUDGET:-1500}
SETTLE=${SETTLE:-2}
WARMUP=${WARMUP:-1}
MEASURE=${MEASURE:-5}
PARTS=${PARTS:-mqtt amqp cross}
DOCS=${DOCS:-1}
DOC_FILE=${DOC_FILE:-$root/docs/benchmarks.md}
SCENARIOS=${SCENARIOS:-}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-10000}
CLK_TCK=$(getconf CLK_TCK)

# Scenarios: part|key|label|kind|arguments (plus --port/--threads/--timeout/--settle/--json).
# kind: steady (a steady-state run: --warmup/--measure/--pid added), run (a plain generator run:
# a flood, or paced), idle (idle connections, RSS per connection), stall (RSS sampled every
# 200 ms); "ferry-only" after the kind: no peer run.
scenarios=(
  "mqtt|qos0|QoS 0, 1→1, 64 B|steady|mqtt --qos 0 --publishers 1 --subscribers 1 --size 64"
  "mqtt|qos1|QoS 1, 1→1, 64 B|steady|mqtt --qos 1 --publishers 1 --subscribers 1 --size 64 --inflight 100"
  "mqtt|qos2|QoS 2, 1→1, 64 B|steady|mqtt --qos 2 --publishers 1 --subscribers 1 --size 64 --inflight 100"
  "mqtt|fanin|fan-in QoS 0, 50→1, 64 B|steady|mqtt --qos 0 --publishers 50 --subscribers 1 --size 64"
  "mqtt|fanout|fan-out QoS 0, 1→50, 64 B|steady|mqtt --qos 0 --publishers 1 --subscribers 50 --size 64"
  "mqtt|qos1-4k|QoS 1, 1→1, 4 KiB|steady|mqtt --qos 1 --publishers 1 --subscribers 1 --size 4096 --inflight 100"
  "mqtt|qos0-autobuf|QoS 0, 1→1, 64 B, publisher's SO_SNDBUF autotuned (--sndbuf 0, as the old method)|steady|mqtt --qos 0 --publishers 1 --subscribers 1 --size 64 --sndbuf 0"
  "mqtt|qos0-flood|QoS 0, 1→1, flood (200k × 64 B as fast as possible)|run|mqtt --qos 0 --publishers 1 --subscribers 1 --messages 200000 --size 64"
  "mqtt|qos1-flood|QoS 1, 1→1, flood (50k × 64 B as fast as possible)|run|mqtt --qos 1 --publishers 1 --subscribers 1 --messages 50000 --size 64 --inflight 100"
  "mqtt|qos2-flood|QoS 2, 1→1, flood (20k × 64 B as fast as possible)|run|mqtt --qos 2 --publishers 1 --subscribers 1 --messages 20000 --size 64 --inflight 100"
  "mqtt|fanin-flood|fan-in QoS 0, 50→1, flood (50 × 4k × 64 B as fast as possible)|run|mqtt --qos 0 --publishers 50 --subscribers 1 --messages 4000 --size 64"
  "mqtt|fanout-flood|fan-out QoS 0, 1→50, flood (10k × 64 B as fast as possible)|run|mqtt --qos 0 --publishers 1 --subscribers 50 --messages 10000 --size 64"
  "mqtt|qos1-4k-flood|QoS 1, 1→1, flood (20k × 4 KiB as fast as possible)|run|mqtt --qos 1 --publishers 1 --subscribers 1 --messages 20000 --size 4096 --inflight 100"
  "mqtt|latency|latency, QoS 1 at 10k msgs/s, 50k × 64 B|run|mqtt --qos 1 --publishers 1 --subscribers 1 --messages 50000 --size 64 --inflight 100 --rate 10000"
  "mqtt|stall|stalled subscriber, QoS 0, 1M × 64 B|stall|mqtt --qos 0 --publishers 1 --subscribers 1 --messages 1000000 --size 64 --stall-subscribers"
  "mqtt|idle|${IDLE_CONNECTIONS} idle connections, held 5 s|idle|idle --connections $IDLE_CONNECTIONS --hold 5"
  "amqp|autoack|auto-ack, 1→1, 64 B|steady|amqp --publishers 1 --consumers 1 --size 64"
  "amqp|persistent|manual ack + confirms + persistent (durable queue), 1→1, 64 B|steady|amqp --publishers 1 --consumers 1 --size 64 --manual-ack --confirm --persistent"
  "amqp|fanout|fanout to 10 queues, confirms, 64 B|steady|amqp --publishers 1 --size 64 --fanout-queues 10 --confirm"
  "amqp|autoack-flood|auto-ack, 1→1, flood (200k × 64 B as fast as possible)|run|amqp --publishers 1 --consumers 1 --messages 200000 --size 64"
  "amqp|persistent-flood|manual ack + confirms + persistent, 1→1, flood (50k × 64 B as fast as possible)|run|amqp --publishers 1 --consumers 1 --messages 50000 --size 64 --manual-ack --confirm --persistent"
  "amqp|fanout-flood|fanout to 10 queues, flood (20k × 64 B as fast as possible)|run|amqp --publishers 1 --messages 20000 --size 64 --fanout-queues 10"
  "amqp|latency|latency, auto-ack at 10k msgs/s, 50k × 64 B|run|amqp --publishers 1 --consumers 1 --messages 50000 --size 64 --rate 10000"
  "cross|cross|MQTT QoS 1 → AMQP consumer, 50k × 64 B (Ferry only)|run ferry-only|cross --qos 1 --messages 50000 --size 64"
)

# --- tools ------------------------------------------------------------------------------------
# shellcheck source=scripts/bench-lib.sh
. "$root/scripts/bench-lib.sh"
bench_need_python
case " $PARTS " in *" mqtt "*) bench_need_mosquitto ;; esac
case " $PARTS " in *" amqp "*) bench_need_rabbitmq ;; esac
bench_build
if [ ! -x "$ferry_bin" ] || [ ! -x "$bench_bin" ]; then echo "bench: no binaries ($ferry_bin, $bench_bin)"; exit 1; fi

# File descriptors: 10,000 idle connections need as many in the broker and in the generator.
if [ "$(id -u)" = 0 ] && [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt 65536 ]; then
  ulimit -Hn 65536 2>/dev/null
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null
nofile=$(ulimit -n)

# What the generator can do (features being added may be missing from an older build).
help_mqtt=$("$bench_bin" mqtt --help 2>/dev/null)
help_amqp=$("$bench_bin" amqp --help 2>/dev/null)
# missing_feature ARGS: why a scenario cannot run with this generator, or nothing.
missing_feature() {
  local cmd=${1%% *}
  case $cmd in
    idle | cross)
      "$bench_bin" "$cmd" --help >/dev/null 2>&1 || { echo "this ferry-bench has no '$cmd' command"; return; } ;;
  esac
  local opt
  for opt in $1; do
    case $opt in
      --rate | --stall-subscribers)
        [ "$cmd" = mqtt ] && ! grep -q -- "$opt" <<<"$help_mqtt" && { echo "this ferry-bench mqtt has no $opt"; return; } ;;
      --fanout-queues)
        grep -q -- "$opt" <<<"$help_amqp" || { echo "this ferry-bench amqp has no $opt"; return; } ;;
    esac
  done
  # Steady-state runs need --measure (and --sndbuf) in this generator.
  if [ "${2:-}" = steady ] || [[ " $1 " == *" --sndbuf "* ]]; then
    case $cmd in
      mqtt) grep -q -- --measure <<<"$help_mqtt" || echo "this ferry-bench mqtt has no --measure" ;;
      amqp) grep -q -- --measure <<<"$help_amqp" || echo "this ferry-bench amqp has no --measure" ;;
    esac
  fi
}

# --- work directory, clean-up -----------------------------------------------------------------
work=$(mktemp -d /tmp/bench-compare.XXXXXX)
mpid=""
gpid=""  # a generator in the background (idle)
spid=""  # an RSS sampler
cleanup() {
  # shellcheck disable=SC2086 # lists of pids, some empty
  stop_all $gpid $spid $mpid $fpid
  if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$work/results"

# --- ports ------------------------------------------------------------------------------------
MOSQ_PORT=$(free_port 28830)
FERRY_MQTT_PORT=$(free_port 28831 "$MOSQ_PORT")
FERRY_AMQP_PORT=$(free_port 28832 "$MOSQ_PORT" "$FERRY_MQTT_PORT")
RABBIT_PORT=$(free_port 28833 "$MOSQ_PORT" "$FERRY_MQTT_PORT" "$FERRY_AMQP_PORT")
RABBIT_DIST_PORT=$(free_port 28834 "$MOSQ_PORT" "$FERRY_MQTT_PORT" "$FERRY_AMQP_PORT" "$RABBIT_PORT")

# --- machine and versions ---------------------------------------------------------------------
ferry_commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo "?")
[ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ] && ferry_commit="$ferry_commit with local changes"
cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
mem=$(awk '/MemTotal/ {printf "%.0f GB", $2 / 1048576}' /proc/meminfo)
{
  echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "nproc=$(nproc)"
  echo "cpu=$cpu_model"
  echo "mem=$mem"
  echo "kernel=$(uname -sr)"
  echo "ferry=$("$ferry_bin" --version 2>/dev/null), commit $ferry_commit"
  echo "cmdline=$cmdline"
  echo "settings=ROUNDS=$ROUNDS, generator $BENCH_THREADS thread(s), --timeout $RUN_TIMEOUT --settle $SETTLE, steady state --warmup $WARMUP --measure $MEASURE, ulimit -n $nofile"
  echo "load_before=$(cut -d' ' -f1-3 /proc/loadavg)"
} >"$work/meta.env"
echo "machine: $(nproc) CPUs, $cpu_model, $mem RAM, $(uname -sr)"
echo "ferry: $("$ferry_bin" --version 2>/dev/null), commit $ferry_commit; ulimit -n $nofile"
busy=$(pgrep -f 'cargo |rustc ' | wc -l)
[ "$busy" -gt 0 ] && echo "warning: $busy cargo/rustc process(es) running: the machine is busy, figures will be noisy"

# --- brokers ----------------------------------------------------------------------------------
mkdir -p "$work/ferry-data"
cat >"$work/ferry.toml" <<EOF
# Defaults, except: loopback listeners without a connection-rate limit, a fresh data directory.
[broker]
data_dir = "$work/ferry-data"
log_level = "warn"

[[listeners]]
protocol = "mqtt"
bind = "127.0.0.1:$FERRY_MQTT_PORT"
max_connection_rate = 0

[[listeners]]
protocol = "amqp"
bind = "127.0.0.1:$FERRY_AMQP_PORT"
max_connection_rate = 0
EOF
cat >"$work/mosquitto.conf" <<EOF
# Defaults, except: a loopback listener, anonymous clients, no persistence.
listener $MOSQ_PORT 127.0.0.1
allow_anonymous true
persistence false
log_dest stderr
log_type error
log_type warning
EOF

# idle_rss PID: VmRSS in kB two seconds after the broker answered (allocations of start-up done).
idle_rss() { sleep 2; rss_now "$1"; }

ferry_launch() {
  "$ferry_bin" -c "$work/ferry.toml" >>"$work/ferry.log" 2>&1 &
  fpid=$!
  if ! wait_port "$FERRY_MQTT_PORT" 40 || ! wait_port "$FERRY_AMQP_PORT" 10; then
    echo "bench: ferry did not start"; tail -20 "$work/ferry.log"; exit 1
  fi
}
# stop_pid PID: SIGTERM, up to 10 s to exit, then SIGKILL.
stop_pid() {
  [ -n "$1" ] || return 0
  kill "$1" 2>/dev/null
  for _ in $(seq 40); do kill -0 "$1" 2>/dev/null || break; sleep 0.25; done
  kill -9 "$1" 2>/dev/null
  wait "$1" 2>/dev/null
}
ferry_launch
echo "ferry_idle_rss=$(idle_rss "$fpid")" >>"$work/meta.env"
echo "ferry: pid $fpid, MQTT :$FERRY_MQTT_PORT, AMQP :$FERRY_AMQP_PORT"

mosquitto_launch() {
  "$mosquitto_bin" -c "$work/mosquitto.conf" >>"$work/mosquitto.log" 2>&1 &
  mpid=$!
  wait_port "$MOSQ_PORT" 20 || { echo "bench: mosquitto did not start"; tail -20 "$work/mosquitto.log"; exit 1; }
}
# fresh_broker BROKER: restarts Ferry or Mosquitto, so that a memory figure is not hidden by
# memory the allocator kept from earlier runs (freed, not given back to the system).
fresh_broker() {
  case $1 in
    ferry) stop_pid "$fpid"; fpid=""; ferry_launch ;;
    mosquitto) stop_pid "$mpid"; mpid=""; mosquitto_launch ;;
  esac
  sleep 1
}
mosquitto_start() {
  mosquitto_launch
  {
    echo "mosquitto=$("$mosquitto_bin" -h 2>/dev/null | head -1)"
    echo "mosquitto_idle_rss=$(idle_rss "$mpid")"
  } >>"$work/meta.env"
  echo "mosquitto: pid $mpid, :$MOSQ_PORT, $("$mosquitto_bin" -h 2>/dev/null | head -1)"
}
mosquitto_stop() {
  stop_pid "$mpid"
  mpid=""
}
rabbitmq_start() {
  rabbit_start "[]"
  # shellcheck disable=SC2119 # rabbit_wait takes no arguments here
  rabbit_wait || exit 1
  {
    echo "rabbitmq=RabbitMQ ${rabbit_version:-?}, Erlang $(rabbit_env timeout 20 "$RABBIT_BIN/rabbitmqctl" -q -n "$NODE" eval 'erlang:system_info(otp_release).' 2>/dev/null | tr -d '"')"
    echo "rabbitmq_idle_rss=$(idle_rss "$beam")"
  } >>"$work/meta.env"
  echo "rabbitmq: beam.smp pid $beam, :$RABBIT_PORT, RabbitMQ ${rabbit_version:-?}, up in ${rabbit_up_secs:-?} s"
}

# --- runs -------------------------------------------------------------------------------------
runs_started=$(date +%s)
index=0
# run_one PART KEY KIND ROUND BROKER PORT_ARGS ARGS: one generator run, its JSON and what was
# sampled around it appended to index.tsv. The idle and stall kinds get a freshly started broker.
# One run, with the other brokers stopped (SIGSTOP) meanwhile and continued after it: both
# brokers of a part are up for the whole part, and on 2 CPUs an idle one's background work (an
# Erlang VM's schedulers spin for a while after each run) takes time from the one measured.
run_one() {
  local broker=$5 own others="" p
  case $broker in ferry) own=$fpid ;; mosquitto) own=$mpid ;; *) own=${beam:-} ;; esac
  for p in $fpid $mpid ${beam:-}; do
    [ "$p" != "$own" ] && kill -0 "$p" 2>/dev/null && others="$others $p"
  done
  # shellcheck disable=SC2086 # a list of pids
  [ -n "$others" ] && kill -STOP $others
  run_one_measured "$@"
  # shellcheck disable=SC2086
  [ -n "$others" ] && kill -CONT $others
  return 0
}

run_one_measured() {
  local part=$1 key=$2 kind=$3 round=$4 broker=$5 portargs=$6 args=$7 pid
  local out
  out="$work/results/$(printf %03d "$index")-$part-$key-$broker-$round.json"
  index=$((index + 1))
  local t0 t1 c0 c1 rss0="" rss1="" rss2="" peak="" rc
  local cmd=${args%% *} rest=${args#* }
  case $kind in idle | stall) [ $(($(date +%s) - runs_started + RUN_TIMEOUT + 15)) -gt "$BUDGET" ] || fresh_broker "$broker" ;; esac
  case $broker in ferry) pid=$fpid ;; mosquitto) pid=$mpid ;; *) pid=$beam ;; esac
  if [ $(($(date +%s) - runs_started + RUN_TIMEOUT + 15)) -gt "$BUDGET" ]; then
    printf '{"error": "skipped: the %s s time budget is spent"}\n' "$BUDGET" >"$out"
  elif ! kill -0 "$pid" 2>/dev/null; then
    # How it ended (a child of this shell: 128 + the signal when killed, e.g. 143 SIGTERM, 137 SIGKILL).
    local status=""
    [ "$pid" = "$fpid" ] && { wait "$pid" 2>/dev/null; status=", exit status $?"; }
    printf '{"error": "broker process %s is gone%s"}\n' "$pid" "$status" >"$out"
  else
    c0=$(cpu_ticks "$pid")
    t0=$(date +%s%N)
    case $kind in
      idle)
        rss0=$(rss_now "$pid")
        # shellcheck disable=SC2086 # $rest and $portargs are lists of arguments
        timeout $((RUN_TIMEOUT + 30)) "$bench_bin" $cmd $portargs $rest --threads "$BENCH_THREADS" --json \
          >"$out.raw" 2>"$out.err" &
        gpid=$!
        for _ in $(seq $((RUN_TIMEOUT * 10))); do
          grep -q '^ready ' "$out.raw" 2>/dev/null && break
          kill -0 "$gpid" 2>/dev/null || break
          sleep 0.1
        done
        grep -q '^ready ' "$out.raw" 2>/dev/null && { sleep 0.5; rss1=$(rss_now "$pid"); }
        wait "$gpid"
        rc=$?
        gpid=""
        # What the broker keeps once the connections are gone.
        sleep 1
        rss2=$(rss_now "$pid")
        grep '^{' "$out.raw" | tail -1 >"$out"
        ;;
      *)
        if [ "$kind" = stall ]; then
          rm -f "$out.peak"
          rss0=$(rss_now "$pid")
          rss_sampler "$pid" "$out.peak" 0.2 &
          spid=$!
        fi
        local steady=""
        [ "$kind" = steady ] && steady="--warmup $WARMUP --measure $MEASURE --pid $pid"
        # shellcheck disable=SC2086
        timeout $((RUN_TIMEOUT + 30)) "$bench_bin" $cmd $portargs $rest $steady --threads "$BENCH_THREADS" \
          --timeout "$RUN_TIMEOUT" --settle "$SETTLE" --json >"$out" 2>"$out.err"
        rc=$?
        if [ -n "$spid" ]; then
          kill "$spid" 2>/dev/null
          wait "$spid" 2>/dev/null
          spid=""
          peak=$(cat "$out.peak" 2>/dev/null)
          rss1=$(rss_now "$pid")
        fi
        ;;
    esac
    t1=$(date +%s%N)
    c1=$(cpu_ticks "$pid")
    # shellcheck disable=SC1003 # tr deletes double quotes and backslashes
    [ -s "$out" ] || printf '{"error": "ferry-bench exited with %s: %s"}\n' "$rc" \
      "$(tr -d '"\\' <"$out.err" | tr '\n' ' ' | cut -c1-300)" >"$out"
    # The broker's CPU time over the run, and the wall time it is divided by.
    python3 - "$out" "${c0:-}" "${c1:-}" "$CLK_TCK" "$t0" "$t1" "$rss0" "$rss1" "$rss2" "$peak" <<'PY'
import json, sys
path, c0, c1, tck, t0, t1, rss0, rss1, rss2, peak = sys.argv[1:]
r = json.load(open(path))
m = {"wall_secs": (int(t1) - int(t0)) / 1e9}
if c0 and c1:
    m["broker_cpu_secs"] = (float(c1) - float(c0)) / float(tck)
for k, v in (("rss_before_kb", rss0), ("rss_ready_kb", rss1), ("rss_after_kb", rss2), ("rss_peak_kb", peak)):
    if v:
        m[k] = int(v)
r["compare"] = m
json.dump(r, open(path, "w"))
PY
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$part" "$key" "$round" "$broker" "$out" >>"$work/index.tsv"
  printf '  %-6s %-10s round %s %-9s %s\n' "$part" "$key" "$round" "$broker" \
    "$(python3 - "$out" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
c = r.get("compare", {})
if "error" in r:
    print(r["error"][:200]); sys.exit()
parts = []
s = r.get("steady")
if s:
    parts.append("%.0f deliveries/s in the window" % s["delivery_rate"])
    if s.get("broker_cpu_us_per_msg") is not None:
        parts.append("broker %.2f us/msg" % s["broker_cpu_us_per_msg"])
elif r.get("delivery_rate") is not None:
    parts.append("%.0f deliveries/s" % r["delivery_rate"])
lat = r.get("latency_us") or {}
if lat.get("p50") is not None:
    parts.append("p50 %s us p99 %s us" % (lat["p50"], lat["p99"]))
if "connected" in r:
    parts.append("%s connected" % r["connected"])
if "lost" in r:
    parts.append("%s lost" % r["lost"])
if c.get("rss_ready_kb"):
    parts.append("RSS %s -> %s kB" % (c.get("rss_before_kb"), c["rss_ready_kb"]))
if c.get("rss_peak_kb"):
    parts.append("peak RSS %s kB" % c["rss_peak_kb"])
if "broker_cpu_secs" in c:
    parts.append("broker CPU %.1f s, generator %.1f s" % (c["broker_cpu_secs"], r.get("generator_cpu_secs") or 0))
if r.get("errors"):
    parts.append("errors: " + "; ".join(r["errors"][:2]))
print(", ".join(parts))
PY
)"
}

# run_part PART PEER PEER_PORT_ARGS FERRY_PORT_ARGS
run_part() {
  local part=$1 peer=$2 pports=$3 fports=$4 entry key label kind args why round
  for entry in "${scenarios[@]}"; do
    [ "${entry%%|*}" = "$part" ] || continue
    IFS='|' read -r _ key label kind args <<<"$entry"
    if [ -n "$SCENARIOS" ]; then case " $SCENARIOS " in *" $key "*) ;; *) continue ;; esac; fi
    printf '%s\t%s\t%s\n' "$key" "${kind%% *}" "$label" >>"$work/labels-$part.tsv"
    why=$(missing_feature "$args" "${kind%% *}")
    if [ -n "$why" ]; then
      echo "  $part $key: SKIPPED: $why"
      printf '%s\t%s\t%s\n' "$part" "$key" "$why" >>"$work/skipped.tsv"
      continue
    fi
    for round in $(seq "$ROUNDS"); do
      run_one "$part" "$key" "${kind%% *}" "$round" ferry "$fports" "$args"
      case $kind in *ferry-only*) continue ;; esac
      [ -n "$peer" ] && run_one "$part" "$key" "${kind%% *}" "$round" "$peer" "$pports" "$args"
    done
  done
}

echo
case " $PARTS " in
  *" mqtt "*)
    mosquitto_start
    echo "MQTT: Ferry vs Mosquitto"
    run_part mqtt mosquitto "--port $MOSQ_PORT" "--port $FERRY_MQTT_PORT"
    echo "mosquitto_peak_rss=$(rss "$mpid")" >>"$work/meta.env"
    mosquitto_stop
    ;;
esac
case " $PARTS " in
  *" amqp "*)
    rabbitmq_start
    echo "AMQP: Ferry vs RabbitMQ"
    run_part amqp rabbitmq "--port $RABBIT_PORT" "--port $FERRY_AMQP_PORT"
    echo "rabbitmq_peak_rss=$(rss "$beam")" >>"$work/meta.env"
    rabbit_stop
    ;;
esac
case " $PARTS " in
  *" cross "*)
    echo "cross-protocol: Ferry only"
    run_part cross "" "" "--mqtt-port $FERRY_MQTT_PORT --amqp-port $FERRY_AMQP_PORT"
    ;;
esac
echo "ferry_peak_rss=$(rss "$fpid")" >>"$work/meta.env"
ferry_alive=1
kill -0 "$fpid" 2>/dev/null || { ferry_alive=0; echo "ferry died during the runs; last log lines:"; tail -20 "$work/ferry.log"; }
echo "ferry_alive=$ferry_alive" >>"$work/meta.env"
echo "runs took $(($(date +%s) - runs_started)) s"
echo "load_after=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$work/meta.env"
echo "date_end=$(date -u '+%H:%M UTC')" >>"$work/meta.env"

# --- tables -----------------------------------------------------------------------------------
echo
touch "$work/index.tsv" "$work/skipped.tsv"
python3 - "$work" "$DOC_FILE" "$DOCS" <<'PY'
import json, os, statistics, sys

work, doc_path, write_docs = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
meta = {}
for line in open(os.path.join(work, "meta.env")):
    k, _, v = line.rstrip("\n").partition("=")
    meta[k] = v
runs = {}  # (part, key) -> {broker: {round: report}}
for line in open(os.path.join(work, "index.tsv")):
    part, key, rnd, broker, path = line.rstrip("\n").split("\t")
    try:
        r = json.load(open(path))
    except Exception as e:  # noqa: BLE001
        r = {"error": f"unreadable result: {e}"}
    runs.setdefault((part, key), {}).setdefault(broker, {})[int(rnd)] = r
labels = {}
kinds = {}
for part in ("mqtt", "amqp", "cross"):
    p = os.path.join(work, f"labels-{part}.tsv")
    if os.path.exists(p):
        for line in open(p):
            k, kind, label = line.rstrip("\n").split("\t", 2)
            labels[(part, k)] = label
            kinds[(part, k)] = kind
skipped = [line.rstrip("\n").split("\t") for line in open(os.path.join(work, "skipped.tsv")) if line.strip()]


def cpu_pct(r, who):
    """CPU % over the steady-state window; else over the generator's run (its CPU s / CPU %), else
    the run's wall time."""
    s = r.get("steady")
    if s:
        return s.get("generator_cpu_pct") if who == "generator" else s.get("broker_cpu_pct")
    c = r.get("compare", {})
    gs, gp = r.get("generator_cpu_secs"), r.get("generator_cpu_pct")
    window = gs * 100 / gp if gs and gp else c.get("wall_secs")
    if who == "generator":
        return gp if gp else None
    b = c.get("broker_cpu_secs")
    return b * 100 / window if b is not None and window else None


def lat(r, q):
    return (r.get("latency_us") or {}).get(q)


def cpu_per_msg(r):
    """Broker CPU µs per delivered message: over the window in steady state, else over the run."""
    s = r.get("steady")
    if s:
        return s.get("broker_cpu_us_per_msg")
    b, n = r.get("compare", {}).get("broker_cpu_secs"), r.get("deliveries")
    return b * 1e6 / n if b is not None and n else None


def fmt_us(v):
    return "–" if v is None else f"{v:.2f}"


def idle_rss_kb(r):
    return r.get("compare", {}).get("rss_ready_kb")


def per_conn(r):
    c = r.get("compare", {})
    n = r.get("connected")
    if c.get("rss_ready_kb") and c.get("rss_before_kb") is not None and n:
        return (c["rss_ready_kb"] - c["rss_before_kb"]) * 1024 / n
    return None


def stall_peak(r):
    return r.get("compare", {}).get("rss_peak_kb")


def stall_growth(r):
    c = r.get("compare", {})
    return c["rss_peak_kb"] - c["rss_before_kb"] if c.get("rss_peak_kb") and c.get("rss_before_kb") else None


def fmt_int(v):
    return "–" if v is None else f"{v:,.0f}"


def fmt_kb(v):
    return "–" if v is None else f"{v / 1024:,.1f} MB"


def fmt_pct(v):
    return "–" if v is None else f"{v:.0f} %"


# metric name, getter, formatter, "higher is better"
RATE = ("deliveries/s", lambda r: r.get("delivery_rate"), fmt_int)
WRATE = ("deliveries/s in the window", lambda r: (r.get("steady") or {}).get("delivery_rate"), fmt_int)
WPUB = ("publishes/s in the window", lambda r: (r.get("steady") or {}).get("publish_rate"), fmt_int)
FRATE = ("deliveries/s, first write → last delivery", lambda r: r.get("delivery_rate"), fmt_int)
CPUMSG = ("broker CPU µs / delivery", cpu_per_msg, fmt_us)
LOSS = ("lost, % (QoS 0: of sent; QoS 1/2, confirms: of acknowledged)", lambda r: r.get("loss_pct"),
        lambda v: "–" if v is None else f"{v:.2f}")
P50 = ("p50 latency, µs", lambda r: lat(r, "p50"), fmt_int)
P99 = ("p99 latency, µs", lambda r: lat(r, "p99"), fmt_int)
P999 = ("p99.9 latency, µs", lambda r: lat(r, "p999"), fmt_int)
GEN = ("generator CPU", lambda r: cpu_pct(r, "generator"), fmt_pct)
BRK = ("broker CPU", lambda r: cpu_pct(r, "broker"), fmt_pct)
metrics_for = {
    "steady": [WRATE, WPUB, CPUMSG, P50, P99, LOSS, GEN, BRK],
    "run": [FRATE, CPUMSG, P50, P99, LOSS, GEN, BRK],
    "latency": [P50, P99, P999, RATE, CPUMSG, GEN, BRK],
    "idle": [("RSS with the connections open", idle_rss_kb, fmt_kb),
             ("RSS per idle connection, bytes", per_conn, fmt_int),
             ("RSS 1 s after they closed", lambda r: r.get("compare", {}).get("rss_after_kb"), fmt_kb),
             ("connections/s while connecting", lambda r: r.get("connect_rate"), fmt_int),
             ("broker CPU", lambda r: cpu_pct(r, "broker"), fmt_pct)],
    "stall": [("peak RSS during the run (200 ms samples)", stall_peak, fmt_kb),
              ("peak RSS − RSS before the run", stall_growth, fmt_kb),
              ("messages published/s", lambda r: r.get("publish_rate"), fmt_int),
              GEN, BRK],
}


def notes_of(broker, r):
    out = []
    if "error" in r:
        return [f"{broker}: {r['error'][:160]}"]
    if r.get("lost") and r.get("qos", 1) != 0 and not r.get("stall_subscribers"):
        out.append(f"{broker}: {r['lost']} lost")
    elif r.get("lost") and not r.get("stall_subscribers"):
        out.append(f"{broker}: {r['lost']} lost ({r.get('loss_pct', 0):.1f} %, QoS 0)")
    if r.get("timed_out") and not r.get("stall_subscribers"):
        out.append(f"{broker}: timed out")
    if r.get("duplicates"):
        out.append(f"{broker}: {r['duplicates']} duplicates")
    if r.get("nacked") or r.get("unconfirmed"):
        out.append(f"{broker}: {r.get('nacked')} nacked, {r.get('unconfirmed')} unconfirmed")
    if r.get("refused") or r.get("errors") and isinstance(r["errors"], int):
        out.append(f"{broker}: {r.get('refused')} refused, {r.get('errors')} failed")
    if isinstance(r.get("errors"), list) and r["errors"]:
        out.append(f"{broker}: " + "; ".join(e[:120] for e in r["errors"][:2]))
    return out


def table(part, peer, peer_name):
    lines = []
    notes = []
    if peer:
        lines.append(f"| scenario | metric | Ferry | {peer_name} | Ferry/{peer_name} | per round |")
        lines.append("|---|---|---|---|---|---|")
    else:
        lines.append("| scenario | metric | Ferry | per round |")
        lines.append("|---|---|---|---|")
    if part in ("mqtt", "amqp"):
        fi, pi = meta.get("ferry_idle_rss"), meta.get(f"{peer}_idle_rss")
        fi, pi = (int(fi) if fi else None), (int(pi) if pi else None)
        ratio = f"{fi / pi:.2f}" if fi and pi else "–"
        lines.append(f"| broker just started, no clients | RSS | {fmt_kb(fi)} | {fmt_kb(pi)} | {ratio} | |")
    for (p, key), by in runs.items():
        if p != part:
            continue
        label = labels.get((p, key), key)
        kind = "latency" if key == "latency" else kinds.get((p, key), "run")
        rounds = sorted(set(by.get("ferry", {})) | set(by.get(peer, {}) if peer else set()))
        for broker, rs in by.items():
            for rnd in sorted(rs):
                for n in notes_of("Ferry" if broker == "ferry" else peer_name, rs[rnd]):
                    notes.append(f"{label}, round {rnd}: {n}")
        groups = [(label, metrics_for[kind])]
        if (p, key) == ("mqtt", "qos0"):
            groups.append(("QoS 0, 1→1, p99 latency while saturated (the same steady runs: unpaced, "
                           "latency of the messages received in the window)", [P99, P999]))
        for label, metrics in groups:
            rows(lines, label, metrics, by, rounds, peer)
    return lines, notes


def rows(lines, label, metrics, by, rounds, peer):
    first = True
    for name, get, fmt in metrics:
        fv = {rnd: get(r) for rnd, r in by.get("ferry", {}).items() if "error" not in r}
        fv = {k: v for k, v in fv.items() if v is not None}
        if peer:
            pv = {rnd: get(r) for rnd, r in by.get(peer, {}).items() if "error" not in r}
            pv = {k: v for k, v in pv.items() if v is not None}
        else:
            pv = {}
        if not fv and not pv:
            continue
        fm = statistics.median(fv.values()) if fv else None
        scen = label if first else ""
        first = False
        if peer:
            pm = statistics.median(pv.values()) if pv else None
            ratios = [fv[k] / pv[k] for k in rounds if k in fv and k in pv and pv[k]]
            rm = f"{statistics.median(ratios):.2f}" if ratios else "–"
            per = ", ".join(f"{x:.2f}" for x in ratios)
            lines.append(f"| {scen} | {name} | {fmt(fm)} | {fmt(pm)} | {rm} | {per} |")
        else:
            per = ", ".join(fmt(fv[k]) for k in sorted(fv))
            lines.append(f"| {scen} | {name} | {fmt(fm)} | {per} |")


def ratio(part, key, get, peer):
    """The median over rounds of Ferry/peer for one metric, or None."""
    by = runs.get((part, key), {})
    fv = {k: get(r) for k, r in by.get("ferry", {}).items() if "error" not in r}
    pv = {k: get(r) for k, r in by.get(peer, {}).items() if "error" not in r}
    rs = [fv[k] / pv[k] for k in fv if k in pv and fv[k] is not None and pv[k]]
    return statistics.median(rs) if rs else None


def targets():
    """Where issue 18's targets stand, from the steady-state rows of this run."""
    out = ["| target (issue 18) | measured, Ferry/peer (median of rounds) | met |", "|---|---|---|"]
    for part, key, peer, name, want in (
            ("mqtt", "qos0", "mosquitto", "MQTT QoS 0 1→1 ≥ 5× Mosquitto", 5),
            ("mqtt", "fanin", "mosquitto", "MQTT fan-in 50→1 ≥ 5× Mosquitto", 5),
            ("mqtt", "qos1", "mosquitto", "MQTT QoS 1 1→1 ≥ 5× Mosquitto", 5),
            ("mqtt", "fanout", "mosquitto", "MQTT fan-out 1→50 ≥ 15× Mosquitto", 15),
            ("amqp", "autoack", "rabbitmq", "AMQP auto-ack 1→1 ≥ 10× RabbitMQ", 10),
            ("amqp", "persistent", "rabbitmq", "AMQP confirms + persistent + manual ack ≥ 5× RabbitMQ", 5),
            ("amqp", "fanout", "rabbitmq", "AMQP fanout to 10 queues ≥ 15× RabbitMQ", 15)):
        if (part, key) not in runs:
            continue
        r = ratio(part, key, WRATE[1], peer)
        out.append(f"| {name} | {'–' if r is None else f'{r:.2f}×'} | {'–' if r is None else 'yes' if r >= want else 'no'} |")
    cpu = []
    for (part, key), kind in kinds.items():
        if kind != "steady" or (part, key) not in runs:
            continue
        peer = "mosquitto" if part == "mqtt" else "rabbitmq"
        r = ratio(part, key, cpu_per_msg, peer)
        if r is not None:
            cpu.append((part, key, r))
    if cpu:
        met = [f"{k} {r:.2f}" for _, k, r in cpu if r <= 0.5]
        missed = [f"{k} {r:.2f}" for _, k, r in cpu if r > 0.5]
        out.append("| broker CPU per delivery ≤ ½ the peer's, every steady row | "
                   + ("; ".join(f"{p}/{k}: {r:.2f}" for p, k, r in cpu)) + f" | {'yes' if not missed else 'no: ' + ', '.join(missed)} |")
    losses = []
    checked = 0
    for (part, key), by in runs.items():
        for rnd, r in by.get("ferry", {}).items():
            if "error" in r or r.get("stall_subscribers"):
                continue
            if r.get("qos", 0) > 0 or r.get("confirm_window"):
                checked += 1
                if r.get("lost") or r.get("nacked") or r.get("unconfirmed"):
                    losses.append(f"{part}/{key} round {rnd}: {r.get('lost')} lost")
    out.append(f"| no QoS 1/2 or confirmed message lost (Ferry, {checked} runs checked message by message) | "
               f"{'; '.join(losses) if losses else 'none lost'} | {'no' if losses else 'yes'} |")
    return out


out = []
out.append("## Ferry vs Mosquitto and RabbitMQ, all scenarios (generated)")
out.append("")
out.append(f"Written by `scripts/bench-compare.sh` on {meta.get('date')}; the script replaces everything between "
           "the `bench-compare` markers on each run (the sections further down are from the older, "
           "per-protocol scripts). Ferry and its peer ran alternately on the same machine, over loopback, "
           "driven by `ferry-bench`, the broker not measured stopped (SIGSTOP) during each run so that its "
           "background work does not take CPU from the other; each figure is the median over the rounds, and the ratio is the median of "
           "the per-round ratios Ferry/peer (above 1: Ferry higher, which is better for rates and worse for "
           "latency, memory and CPU). **Steady-state rows** (issue 18; see \"Steady state against floods\" "
           "below): the publishers send continuously, unpaced, over sockets with SO_SNDBUF 256 KiB (the kernel "
           "grants 512 KiB), and the figures are those of a measure window after a warm-up: deliveries and "
           "publishes completed in it, latencies of the messages received in it, the broker's CPU time over it "
           "(`/proc/<pid>/stat`) per delivery, CPU % over it; afterwards the publishers stop, the run drains "
           "and every acknowledged QoS 1/2 or confirmed message is checked off at every subscriber. **Flood "
           "rows** are the old method: N messages as fast as possible with the system's autotuned socket "
           "buffers, the rate is deliveries / (last delivery − first write), CPU % over the generator's whole "
           "run, settle time included, CPU per delivery over the run. 100 % CPU = one core busy; generator and "
           "broker share the machine. RSS is VmRSS from `/proc/<pid>/status`: per idle connection is (RSS with all connected, read "
           "0.5 s after the generator printed `ready N`, − RSS before connecting) / N; the stalled subscriber's "
           "figure is the largest of samples taken every 200 ms during the run. Losses, errors and time-outs "
           "are listed under the tables; at QoS 0 losses are allowed, and Mosquitto's default "
           "`max_queued_messages` (1000 per client) drops QoS 1/2 messages past it.")
out.append("")
out.append(f"- **Machine:** {meta.get('nproc')} CPUs (`nproc`), {meta.get('cpu')}, {meta.get('mem')} RAM, {meta.get('kernel')}.")
vers = [f"Ferry: {meta.get('ferry')}"]
if meta.get("mosquitto"):
    vers.append(meta["mosquitto"] + " (Debian package; `allow_anonymous true`, `persistence false`, other settings default: "
                "`max_queued_messages` 1000, `max_inflight_messages` 20)")
if meta.get("rabbitmq"):
    vers.append(meta["rabbitmq"] + " (Debian package; a private node with default settings, no plugins; RSS of beam.smp)")
out.append("- **Versions:** " + "; ".join(vers) + ".")
out.append("- **Ferry's configuration:** defaults, plus `max_connection_rate = 0` on its MQTT and AMQP listeners "
           "and a fresh data directory.")
out.append(f"- **Command:** `{meta.get('cmdline')}` ({meta.get('settings')}), from {meta.get('date')} to "
           f"{meta.get('date_end')}; load average (1, 5, 15 min) {meta.get('load_before')} before, "
           f"{meta.get('load_after')} after, on {meta.get('nproc')} CPUs: above about 1, other work on the machine took CPU "
           "from the runs and the figures are noisy.")
if meta.get("ferry_alive") == "0":
    out.append("- **Ferry died during the runs** (see the script's output).")
if any(k == "steady" for k in kinds.values()):
    out.append("")
    out.append("### Issue 18's targets, steady state")
    out.append("")
    out += targets()
all_notes = []
for part, peer, peer_name, title in (("mqtt", "mosquitto", "Mosquitto", "MQTT 3.1.1: Ferry vs Mosquitto"),
                                     ("amqp", "rabbitmq", "RabbitMQ", "AMQP 0-9-1: Ferry vs RabbitMQ"),
                                     ("cross", None, None, "Cross-protocol, Ferry only: MQTT publisher → AMQP consumer")):
    if not any(p == part for p, _ in runs) and not any(s[0] == part for s in skipped):
        continue
    out.append("")
    out.append(f"### {title}")
    out.append("")
    lines, notes = table(part, peer, peer_name)
    out += lines
    all_notes += notes
    sk = [s for s in skipped if s[0] == part]
    if sk:
        out.append("")
        out.append("Skipped: " + "; ".join(f"{labels.get((p, k), k)} ({why})" for p, k, why in sk) + ".")
if all_notes:
    out.append("")
    out.append("Anomalies reported by the generator:")
    out.append("")
    out += [f"- {n}" for n in all_notes]
section = "\n".join(out) + "\n"
print(section)

if write_docs:
    begin, end = "<!-- bench-compare:begin -->", "<!-- bench-compare:end -->"
    doc = open(doc_path).read()
    if begin in doc and end in doc and doc.index(begin) < doc.index(end):
        head = doc[: doc.index(begin) + len(begin)]
        tail = doc[doc.index(end):]
        doc = head + "\n" + section + tail
    else:
        # After the first paragraph: the first block of non-heading lines ended by a blank line.
        lines = doc.split("\n")
        i = 0
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith("#")):
            i += 1
        while i < len(lines) and lines[i].strip():
            i += 1
        lines[i:i] = ["", begin, section + end]
        doc = "\n".join(lines)
    open(doc_path, "w").write(doc)
    print(f"written to {doc_path}")
PY
