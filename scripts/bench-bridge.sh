#!/usr/bin/env bash
# Ferry's MQTT bridge against Mosquitto's, in one run (issue 16), written into docs/benchmarks.md
# (between <!-- bench-bridge:begin --> and <!-- bench-bridge:end -->).
#
# Two setups, each a bridging broker with one `out` rule (`bench/#`, QoS 1, MQTT 3.1.1) to a
# remote Mosquitto (the same binary and configuration for both, so that only the bridging
# broker differs):
#   ferry      Ferry (release build): defaults plus one [[bridges]] table (protocol_version
#              "3.1.1", the rule, max_inflight = BRIDGE_INFLIGHT when set); a fresh data directory.
#   mosquitto  a local Mosquitto: `persistence true` with its autosave defaults (every 1800 s,
#              and at a clean exit), `max_inflight_messages` MOSQ_INFLIGHT (default: the same
#              window as Ferry's bridge), `max_queued_messages` 1000 (its default), and
#              `connection` / `address` / `topic bench/# out 1`, bridge settings default
#              (cleansession false, try_private true, notifications true).
# Remote Mosquitto: `persistence false`, everything else default.
#
# Part 1, forwarding rate (ROUNDS rounds, ferry and mosquitto alternating, each round on freshly
# started brokers): `ferry-bench bridge --mode rate` publishes QoS 1 to the bridging broker and
# counts what arrives at a subscriber on the remote, closed loop: at most INFLIGHT PUBLISHes
# unacknowledged by the bridging broker and at most WINDOW messages sent and not yet arrived
# (below Mosquitto's 1000 queued + its in-flight window, so that neither side drops or drowns
# in a backlog). INFLIGHT defaults to WINDOW: a smaller one holds a broker that acknowledges
# only after its commit (Ferry: fsync'd) to INFLIGHT / commit latency, which measures the
# publisher's window rather than the bridge (with 100: Ferry at 0.57x Mosquitto's rate, median
# of 5 rounds, 2026-12-06; with 500 the same build reached 0.66x). WARMUP seconds, then the measure window (MEASURE seconds): rate = messages
# arrived in it / its length; CPU per message = the bridging broker's utime + stime
# (/proc/<pid>/stat) over the same window / messages arrived; the remote's too. Then the
# publisher stops and every PUBACKed message must arrive: lost, duplicates and reordering are
# counted by sequence number.
#
# Part 2, SIGKILL with a backlog (CRASH_ROUNDS rounds per setup): remote up (here a Mosquitto
# that keeps sessions across its restarts and queues without limit, so that the receiving side
# loses nothing), bridge up (a probe message goes through), a persistent session subscribed on
# the remote for the receiver, remote stopped (SIGTERM), CRASH_MESSAGES QoS 1 messages published to
# the bridging broker and PUBACKed by it, the bridging broker SIGKILLed, the remote started and
# the receiver back in its session, the bridging broker started again on the same data
# directory; what arrives is counted. A control round per setup does the same without the SIGKILL (a plain remote outage),
# so that a loss is seen to be the crash's and not the outage's.
#
# Environment: ROUNDS (5), WARMUP (3), MEASURE (10), INFLIGHT (500), WINDOW (500), SIZE (64),
# BRIDGE_INFLIGHT (Ferry's max_inflight; unset: Ferry's default), MOSQ_INFLIGHT (default: the
# window Ferry's bridge uses), CRASH_ROUNDS (2), CRASH_MESSAGES (1000), FERRY_REMOTE (1: also a
# Ferry -> Ferry round in part 1, for reference), PARTS ("rate crash"), DOCS (1: write the
# section into DOC_FILE, docs/benchmarks.md), KEEP (1: keep the work directory). FERRY_BIN and
# BENCH_BIN, both set, use those binaries instead of a release build.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
cmdline="scripts/bench-bridge.sh${*:+ $*}"
for v in ROUNDS WARMUP MEASURE INFLIGHT WINDOW SIZE BRIDGE_INFLIGHT MOSQ_INFLIGHT CRASH_ROUNDS CRASH_MESSAGES FERRY_REMOTE PARTS; do
  [ -n "${!v:-}" ] && cmdline="$v=${!v} $cmdline"
done

ROUNDS=${ROUNDS:-5}
WARMUP=${WARMUP:-3}
MEASURE=${MEASURE:-10}
INFLIGHT=${INFLIGHT:-500}
WINDOW=${WINDOW:-500}
SIZE=${SIZE:-64}
BRIDGE_INFLIGHT=${BRIDGE_INFLIGHT:-}
CRASH_ROUNDS=${CRASH_ROUNDS:-2}
CRASH_MESSAGES=${CRASH_MESSAGES:-1000}
FERRY_REMOTE=${FERRY_REMOTE:-0}
PARTS=${PARTS:-rate crash}
DOCS=${DOCS:-1}
DOC_FILE=${DOC_FILE:-$root/docs/benchmarks.md}

# shellcheck source=scripts/bench-lib.sh
. "$root/scripts/bench-lib.sh"
bench_need_python
bench_need_mosquitto
bench_build
[ -x "$ferry_bin" ] && [ -x "$bench_bin" ] || { echo "bench: no binaries ($ferry_bin, $bench_bin)"; exit 1; }
"$bench_bin" bridge --help >/dev/null 2>&1 || { echo "bench: this ferry-bench has no 'bridge' command"; exit 1; }
# Ferry's bridge window: the configured one, else the default from the docs' table.
ferry_window=${BRIDGE_INFLIGHT:-$(sed -n 's/^| `max_inflight` | \([0-9]*\) |.*/\1/p' "$root/docs/configuration.md" | head -1)}
MOSQ_INFLIGHT=${MOSQ_INFLIGHT:-${ferry_window:-20}}

work=$(mktemp -d /tmp/bench-bridge.XXXXXX)
rpid=""  # the remote
bpid=""  # the bridging broker
gpid=""  # a generator in the background
cleanup() {
  local p
  for p in $gpid $bpid $rpid; do kill -9 "$p" 2>/dev/null; done
  if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$work/results"
# Mosquitto started as root runs as the user `mosquitto`: its persistence directories must be
# reachable and writable for it.
chmod 755 "$work"
# mosquitto_dir DIR: creates DIR for Mosquitto's persistence file.
mosquitto_dir() {
  mkdir -p "$1"
  if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then chown mosquitto "$1"; fi
}

REMOTE_PORT=$(free_port 28930)
BRIDGE_PORT=$(free_port 28931 "$REMOTE_PORT")

# --- machine -----------------------------------------------------------------------------------
ferry_commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo "?")
[ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ] && ferry_commit="$ferry_commit with local changes"
{
  echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "nproc=$(nproc)"
  echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "mem=$(awk '/MemTotal/ {printf "%.0f GB", $2 / 1048576}' /proc/meminfo)"
  echo "kernel=$(uname -sr)"
  echo "load_start=$(cut -d' ' -f1-3 /proc/loadavg)"
  echo "ferry=$("$ferry_bin" --version 2>/dev/null), commit $ferry_commit"
  echo "mosquitto=$("$mosquitto_bin" -h 2>/dev/null | head -1)"
  echo "cmdline=$cmdline"
  echo "settings=ROUNDS=$ROUNDS WARMUP=$WARMUP MEASURE=$MEASURE INFLIGHT=$INFLIGHT WINDOW=$WINDOW SIZE=$SIZE, Ferry bridge max_inflight ${ferry_window:-default}, Mosquitto max_inflight_messages $MOSQ_INFLIGHT, CRASH_MESSAGES=$CRASH_MESSAGES"
} >"$work/meta.env"
echo "machine: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); ferry commit $ferry_commit"
busy=$(pgrep -f 'cargo |rustc ' | wc -l)
[ "$busy" -gt 0 ] && echo "warning: $busy cargo/rustc process(es) running: the machine is busy, figures will be noisy"

# --- brokers -------------------------------------------------------------------------------------
# stop_pid PID [SIGNAL]: the signal (TERM), up to 10 s to exit, then SIGKILL.
stop_pid() {
  [ -n "$1" ] || return 0
  kill "-${2:-TERM}" "$1" 2>/dev/null
  for _ in $(seq 40); do kill -0 "$1" 2>/dev/null || break; sleep 0.25; done
  kill -9 "$1" 2>/dev/null
  wait "$1" 2>/dev/null
}

# remote_start [ferry|keep DIR]: the remote on $REMOTE_PORT: Mosquitto (`persistence false`);
# "ferry": a Ferry; "keep DIR": Mosquitto keeping its sessions in DIR across restarts
# (`persistence true`, saved at a clean exit) and queueing without limit for an away session
# (`max_queued_messages 0`), so that nothing is lost on the receiving side. Sets $rpid.
remote_start() {
  if [ "${1:-}" = keep ]; then
    mosquitto_dir "$2"
    cat >"$work/remote-keep.conf" <<EOF
listener $REMOTE_PORT 127.0.0.1
allow_anonymous true
persistence true
persistence_location $2/
max_queued_messages 0
log_dest stderr
log_type error
log_type warning
EOF
    "$mosquitto_bin" -c "$work/remote-keep.conf" >>"$work/remote.log" 2>&1 &
  elif [ "${1:-}" = ferry ]; then
    mkdir -p "$work/remote-ferry"
    cat >"$work/remote-ferry.toml" <<EOF
[broker]
data_dir = "$work/remote-ferry"
log_level = "warn"
[[listeners]]
protocol = "mqtt"
bind = "127.0.0.1:$REMOTE_PORT"
max_connection_rate = 0
EOF
    "$ferry_bin" -c "$work/remote-ferry.toml" >>"$work/remote.log" 2>&1 &
  else
    cat >"$work/remote.conf" <<EOF
listener $REMOTE_PORT 127.0.0.1
allow_anonymous true
persistence false
log_dest stderr
log_type error
log_type warning
EOF
    "$mosquitto_bin" -c "$work/remote.conf" >>"$work/remote.log" 2>&1 &
  fi
  rpid=$!
  wait_port "$REMOTE_PORT" 40 || { echo "bench: the remote did not start"; tail -20 "$work/remote.log"; exit 1; }
}

# bridge_start SETUP DIR: the bridging broker on $BRIDGE_PORT with its data in DIR (kept
# across a restart). Sets $bpid.
bridge_start() {
  local setup=$1 dir=$2
  mkdir -p "$dir"
  case $setup in
    ferry)
      cat >"$dir/ferry.toml" <<EOF
[broker]
data_dir = "$dir/data"
log_level = "${FERRY_LOG:-warn}"

[[listeners]]
protocol = "mqtt"
bind = "127.0.0.1:$BRIDGE_PORT"
max_connection_rate = 0

[[bridges]]
name = "remote"
address = "127.0.0.1:$REMOTE_PORT"
protocol_version = "3.1.1"
topics = [{ pattern = "bench/#", direction = "out", qos = 1 }]
${BRIDGE_INFLIGHT:+max_inflight = $BRIDGE_INFLIGHT}
EOF
      "$ferry_bin" -c "$dir/ferry.toml" >>"$dir/broker.log" 2>&1 &
      ;;
    mosquitto)
      mosquitto_dir "$dir/data"
      cat >"$dir/mosquitto.conf" <<EOF
listener $BRIDGE_PORT 127.0.0.1
allow_anonymous true
persistence true
persistence_location $dir/data/
max_inflight_messages $MOSQ_INFLIGHT
log_dest stderr
log_type error
log_type warning

connection remote
address 127.0.0.1:$REMOTE_PORT
bridge_protocol_version mqttv311
topic bench/# out 1
EOF
      "$mosquitto_bin" -c "$dir/mosquitto.conf" >>"$dir/broker.log" 2>&1 &
      ;;
  esac
  bpid=$!
  wait_port "$BRIDGE_PORT" 40 || { echo "bench: $setup did not start"; tail -20 "$dir/broker.log"; exit 1; }
}

# receive_bg OUT ARGS...: a receiving generator in the background, waited for until it is
# subscribed (prints "ready"). Sets $gpid.
receive_bg() {
  local out=$1
  shift
  timeout 300 "$bench_bin" bridge --mode receive --sub-port "$REMOTE_PORT" --json "$@" >"$out" 2>"$out.err" &
  gpid=$!
  for _ in $(seq 100); do
    grep -q '^ready' "$out" 2>/dev/null && return 0
    kill -0 "$gpid" 2>/dev/null || break
    sleep 0.1
  done
  echo "bench: the receiver did not subscribe"; cat "$out.err"; return 1
}

# link_up: waits (at most 30 s) until a probe message goes through the bridge.
link_up() {
  local i
  for i in $(seq 6); do
    receive_bg "$work/probe.json" --messages 1 --settle 5 --tag $((900000 + i)) || return 1
    "$bench_bin" bridge --mode publish --pub-port "$BRIDGE_PORT" --messages 1 --tag $((900000 + i)) --json >/dev/null 2>&1
    wait "$gpid"
    gpid=""
    grep '^{' "$work/probe.json" | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["received"] == 1 else 1)' && return 0
  done
  return 1
}

# --- part 1: rate --------------------------------------------------------------------------------
index=0
rate_round() {
  local setup=$1 round=$2 remote=${3:-mosquitto}
  local out
  out="$work/results/$(printf %03d $index)-rate-$setup-$round.json"
  index=$((index + 1))
  local dir="$work/$setup-rate-$round"
  remote_start "$remote"
  bridge_start "$setup" "$dir"
  if ! link_up; then
    printf '{"error": "the bridge did not come up"}\n' >"$out"
  else
    local load
    load=$(cut -d' ' -f1 /proc/loadavg)
    timeout $((${WARMUP%.*} + ${MEASURE%.*} + 120)) "$bench_bin" bridge --mode rate \
      --pub-port "$BRIDGE_PORT" --sub-port "$REMOTE_PORT" --size "$SIZE" --inflight "$INFLIGHT" \
      --window "$WINDOW" --warmup "$WARMUP" --measure "$MEASURE" --settle 10 \
      --pid "$bpid" --pid "$rpid" --json >"$out.raw" 2>"$out.err"
    grep '^{' "$out.raw" | tail -1 | python3 -c "
import json, sys
r = json.load(sys.stdin); r['setup'] = '$setup'; r['remote'] = '$remote'; r['round'] = $round; r['load'] = $load
print(json.dumps(r))" >"$out" 2>/dev/null || printf '{"error": "no report: %s"}\n' "$(tail -1 "$out.err")" >"$out"
  fi
  echo "rate $setup round $round: $(python3 -c "
import json,sys; r=json.load(open('$out'))
print(r.get('error') or f\"{r['rate']:.0f} msgs/s, bridging broker {r['cpu'][0]['cpu_us_per_msg']:.1f} us/msg, lost {r['lost']}, dup {r['duplicates']}, out of order {r['out_of_order']}\")" 2>&1)"
  stop_pid "$bpid"; bpid=""
  stop_pid "$rpid"; rpid=""
}

case " $PARTS " in *" rate "*)
  for r in $(seq "$ROUNDS"); do
    rate_round ferry "$r"
    rate_round mosquitto "$r"
    [ "$FERRY_REMOTE" = 1 ] && rate_round ferry "$r" ferry
  done
  ;;
esac

# --- part 2: SIGKILL with a backlog ---------------------------------------------------------------
crash_round() {
  local setup=$1 round=$2 kill=$3
  local tag=$((700000 + index))
  local out
  out="$work/results/$(printf %03d $index)-crash-$setup-$kill-$round.json"
  index=$((index + 1))
  local dir="$work/$setup-crash-$kill-$round"
  local sub_id="bench-bridge-crash-$index"
  remote_start keep "$dir/remote"
  bridge_start "$setup" "$dir"
  if ! link_up || ! "$bench_bin" bridge --mode subscribe --sub-port "$REMOTE_PORT" --client-id "$sub_id" >/dev/null 2>&1; then
    printf '{"error": "the bridge did not come up"}\n' >"$out"
    stop_pid "$bpid"; bpid=""; stop_pid "$rpid"; rpid=""
    return
  fi
  # The remote keeps the receiver's session (and saves it at this clean exit).
  stop_pid "$rpid"; rpid=""
  "$bench_bin" bridge --mode publish --pub-port "$BRIDGE_PORT" --messages "$CRASH_MESSAGES" --tag "$tag" \
    --json >"$out.pub" 2>"$out.err"
  local acked
  acked=$(python3 -c "import json; print(json.load(open('$out.pub'))['acked'])" 2>/dev/null || echo 0)
  if [ "$kill" = kill ]; then
    kill -9 "$bpid"; wait "$bpid" 2>/dev/null; bpid=""
  fi
  remote_start keep "$dir/remote"
  # A restarted bridge connects at once; Mosquitto's bridge that lost its remote retries after
  # its back-off (5 to 30 s by default), Ferry's after 1 s doubling: 45 s of silence at most.
  receive_bg "$out.raw" --messages "$CRASH_MESSAGES" --tag "$tag" --settle 45 --client-id "$sub_id" \
    --clean-session false || true
  [ "$kill" = kill ] && bridge_start "$setup" "$dir"
  wait "$gpid"; gpid=""
  grep '^{' "$out.raw" | tail -1 | python3 -c "
import json, sys
r = json.load(sys.stdin); r['setup'] = '$setup'; r['kill'] = '$kill' == 'kill'; r['round'] = $round; r['acked'] = $acked
print(json.dumps(r))" >"$out" 2>/dev/null || printf '{"error": "no report"}\n' >"$out"
  echo "crash $setup ($kill) round $round: $(python3 -c "
import json; r=json.load(open('$out'))
print(r.get('error') or f\"{r['acked']} PUBACKed, {r['received']} arrived, lost {r['lost']}, dup {r['duplicates']}, out of order {r['out_of_order']}\")" 2>&1)"
  stop_pid "$bpid"; bpid=""
  stop_pid "$rpid"; rpid=""
}

case " $PARTS " in *" crash "*)
  crash_round ferry 1 outage
  crash_round mosquitto 1 outage
  for r in $(seq "$CRASH_ROUNDS"); do
    crash_round ferry "$r" kill
    crash_round mosquitto "$r" kill
  done
  ;;
esac
echo "load_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$work/meta.env"

# --- the table -----------------------------------------------------------------------------------
python3 - "$work" "$DOCS" "$DOC_FILE" <<'PY'
import glob, json, os, statistics, sys
work, write_docs, doc_path = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
meta = {}
for line in open(os.path.join(work, "meta.env")):
    k, _, v = line.rstrip("\n").partition("=")
    meta[k] = v
runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(work, "results", "*.json")))]
rate = [r for r in runs if r.get("mode") == "rate" and "error" not in r]
crash = [r for r in runs if r.get("mode") == "receive" and "error" not in r]
errors = [r["error"] for r in runs if "error" in r]

def med(xs):
    return statistics.median(xs) if xs else None

def spread(xs, fmt):
    return f"{fmt(min(xs))}–{fmt(max(xs))}" if xs else "–"

out = ["### Results (generated by `scripts/bench-bridge.sh`)", ""]
out.append(f"Made by `scripts/bench-bridge.sh` on {meta.get('date')}; machine: {meta.get('nproc')} CPUs "
           f"({meta.get('cpu')}), {meta.get('mem')} RAM, {meta.get('kernel')}; shared with other work "
           f"(load average {meta.get('load_start')} at the start, {meta.get('load_end')} at the end).")
out.append("")
out.append(f"- **Command:** `{meta.get('cmdline')}` ({meta.get('settings')}).")
out.append(f"- **Versions:** {meta.get('ferry')}; {meta.get('mosquitto')} (Debian package).")
out.append("- **Setups:** a publisher sends QoS 1 (64 B payloads with a sequence number) to the bridging "
           "broker, which bridges `bench/#` out at QoS 1 (MQTT 3.1.1) to a remote Mosquitto (`persistence false`, "
           "defaults), where a subscriber counts what arrives. *Ferry*: defaults plus one `[[bridges]]` table. "
           "*Mosquitto*: `persistence true` with the autosave defaults, `max_queued_messages` 1000 (default), "
           "`max_inflight_messages` as below, bridge settings default. Each round on freshly started brokers; "
           "Ferry and Mosquitto alternate.")
if rate:
    out += ["", "#### Forwarding rate, steady state", ""]
    out.append("Closed loop: at most `INFLIGHT` PUBLISHes unacknowledged by the bridging broker and at most `WINDOW` "
               "messages on their way end to end, so that neither bridge holds a growing backlog (Mosquitto would "
               "drop past 1000 queued). Rate: messages that arrived at the remote in the measure window / its "
               "length. CPU: utime + stime of the process over the same window, per message arrived.")
    out.append("")
    out.append("| bridging broker → remote | rounds | rate, median (min–max) | vs Mosquitto | bridging broker CPU µs/msg, median (min–max) | vs Mosquitto | remote CPU µs/msg | generator CPU µs/msg | lost | duplicates | out of order |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    base = [r for r in rate if r["setup"] == "mosquitto"]
    base_rate = med([r["rate"] for r in base])
    base_cpu = med([r["cpu"][0]["cpu_us_per_msg"] for r in base if r.get("cpu")])
    for setup, remote, label in (("ferry", "mosquitto", "Ferry → Mosquitto"), ("mosquitto", "mosquitto", "Mosquitto → Mosquitto"),
                                 ("ferry", "ferry", "Ferry → Ferry (reference)")):
        rs = [r for r in rate if r["setup"] == setup and r.get("remote", "mosquitto") == remote]
        if not rs:
            continue
        rates = [r["rate"] for r in rs]
        cpus = [r["cpu"][0]["cpu_us_per_msg"] for r in rs if len(r.get("cpu", [])) > 0 and r["cpu"][0]["cpu_us_per_msg"]]
        rcpus = [r["cpu"][1]["cpu_us_per_msg"] for r in rs if len(r.get("cpu", [])) > 1 and r["cpu"][1]["cpu_us_per_msg"]]
        gcpus = [r["generator_cpu_us_per_msg"] for r in rs if r.get("generator_cpu_us_per_msg")]
        k = lambda v: f"{v / 1000:.1f}k/s"
        u = lambda v: f"{v:.1f}"
        ratio = f"{med(rates) / base_rate:.2f}×" if base_rate else "–"
        cratio = f"{med(cpus) / base_cpu:.2f}×" if base_cpu and cpus else "–"
        out.append(f"| {label} | {len(rs)} | {k(med(rates))} ({spread(rates, k)}) | {ratio} | "
                   f"{u(med(cpus)) if cpus else '–'} ({spread(cpus, u)}) | {cratio} | {u(med(rcpus)) if rcpus else '–'} | "
                   f"{u(med(gcpus)) if gcpus else '–'} | "
                   f"{sum(r['lost'] for r in rs)} | {sum(r['duplicates'] for r in rs)} | {sum(r['out_of_order'] for r in rs)} |")
    # What the rest of the setup leaves for the bridging broker: the remote and the generator share
    # the same cores, so their CPU per message bounds the rate whatever the bridging broker does.
    others = [r["cpu"][1]["cpu_us_per_msg"] + r["generator_cpu_us_per_msg"] for r in base
              if len(r.get("cpu", [])) > 1 and r["cpu"][1]["cpu_us_per_msg"] and r.get("generator_cpu_us_per_msg")]
    if others and base_rate:
        ceiling = int(meta.get("nproc", "1")) * 1e6 / med(others)
        out.append("")
        out.append(f"The remote Mosquitto and the generator alone use {med(others):.1f} µs of CPU per message (median of "
                   f"the Mosquitto rounds), on the same {meta.get('nproc')} cores: even a bridging broker that cost "
                   f"nothing could not forward more than about {ceiling / 1000:.0f}k msgs/s here, "
                   f"{ceiling / base_rate:.1f}× Mosquitto's rate.")
    out.append("")
    out.append("Per round (rate, bridging broker µs/msg, load average at the start of the run): " + "; ".join(
        f"{r['setup']}→{r.get('remote', 'mosquitto')} #{r['round']}: {r['rate'] / 1000:.1f}k/s, "
        f"{r['cpu'][0]['cpu_us_per_msg']:.1f} µs, load {r.get('load')}" for r in rate if r.get("cpu")) + ".")
if crash:
    out += ["", "#### SIGKILL of the bridging broker with a backlog", ""]
    out.append("Remote up (a Mosquitto keeping sessions across its restarts and queueing without limit, so that "
               "the receiving side loses nothing), bridge up (a probe goes through), a persistent session subscribed "
               "on the remote for the receiver, remote stopped; N QoS 1 messages published to the bridging broker "
               "and PUBACKed by it; then *SIGKILL*: the bridging broker SIGKILLed, the remote started, the receiver "
               "back in its session, the bridging broker started again on its data directory; or *outage* "
               "(control): the remote started again, nothing killed. Counted at the receiver by sequence number; "
               "each figure is one round (rounds separated by /).")
    out.append("")
    out.append("| bridging broker | case | rounds | PUBACKed | arrived | lost | duplicates | out of order |")
    out.append("|---|---|---|---|---|---|---|---|")
    for setup, label in (("ferry", "Ferry"), ("mosquitto", "Mosquitto (`persistence true`, autosave defaults)")):
        for kill, case in ((False, "outage (control)"), (True, "SIGKILL")):
            rs = [r for r in crash if r["setup"] == setup and r["kill"] == kill]
            if not rs:
                continue
            j = lambda key: " / ".join(str(r[key]) for r in rs)
            out.append(f"| {label} | {case} | {len(rs)} | {j('acked')} | {j('received')} | {j('lost')} | {j('duplicates')} | {j('out_of_order')} |")
if errors:
    out += ["", "Runs that failed: " + "; ".join(errors) + "."]
section = "\n".join(out) + "\n"
print(section)
if write_docs:
    begin, end = "<!-- bench-bridge:begin -->", "<!-- bench-bridge:end -->"
    doc = open(doc_path).read()
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin) + len(begin)] + "\n" + section + doc[doc.index(end):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + begin + "\n" + section + end + "\n"
    open(doc_path, "w").write(doc)
    print(f"written to {doc_path}")
PY
