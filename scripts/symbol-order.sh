#!/usr/bin/env bash
# Writes server/symbol-order.txt, the order in which the linker lays out the `ferry` binary's
# functions (issue 18: the idle broker's RSS; server/build.rs passes the file to lld).
#
# Why: an idle broker's RSS is mostly its own code, and the kernel maps code in blocks of 64 KiB
# or more (fault-around, and the page cache's large folios) around each page it faults in. Left in
# the compiler's order, the 1.8 MB of functions that start-up and an idle broker run are spread
# over 105 of the 160 64 KiB blocks of the 10 MB of text, and 6.5-6.9 MB of code stay resident;
# laid out together, about 2 MB (docs/benchmarks.md, "The idle broker's code").
#
# How: a release `ferry` runs under callgrind (valgrind), which names every function that runs and
# counts its instructions.
#  1. start-up and idle: the embedded defaults (no config file, the README's command) when ports
#     1883, 5672 and 15672 are free, then a config file with the same three listeners on other
#     ports; each broker gets a connection opened and closed on each port (a health check), sits
#     idle IDLE seconds (default 12: the management API samples every 5 s) and its profile is
#     dumped (`callgrind_control --dump`);
#  2. idle devices: `ferry-bench idle` opens MQTT 3.1.1 and 5.0 connections to the second broker,
#     with one subscription each (they park) and without, pings and closes them;
#  3. the protocols' other paths: QoS 0/1/2 publishes, a persistent session, AMQP with and
#     without confirms, persistent, manual ack, fanout, MQTT to AMQP (`ferry-bench`), and the
#     management API and /metrics (curl);
#  4. shutdown (SIGINT).
# The file lists start-up's functions, then the devices', the workload's and shutdown's, each not
# in an earlier group and sorted by name (one crate's functions together), except the hot ones:
# the functions that ran 99 % of the instructions of runs 2 and 3 are kept together, hottest
# nearest each other, at the end of start-up's group (those start-up runs too) and right after it
# (the rest).
#
# Functions that no longer exist are skipped by the linker (--no-warn-symbol-ordering) and new ones
# are placed after the listed ones, so a stale file costs memory, never a failed build. Run this
# again when the idle RSS grows (the "RSS before" of scripts/bench-idle.sh) or `--check` finds
# listed functions missing, and after a toolchain or Cargo.lock change (symbol names carry each
# crate's build hash).
#
#   scripts/symbol-order.sh                     # builds, profiles, writes server/symbol-order.txt
#   FERRY_BIN=... BENCH_BIN=... scripts/symbol-order.sh
#   OUT=/tmp/order.txt IDLE=20 KEEP=1 scripts/symbol-order.sh   # KEEP=1: keep the profiles and logs
#   scripts/symbol-order.sh --check [BIN]       # how much of the file BIN (target/release/ferry) has
#
# Needs valgrind (apt-get install valgrind) and curl. Takes about 3 minutes after the build.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$root/server/symbol-order.txt}
IDLE=${IDLE:-12}

if [ "${1:-}" = --check ]; then
  bin=${2:-${CARGO_TARGET_DIR:-$root/target}/release/ferry}
  listed=$(grep -v '^#' "$OUT" | grep -c .)
  present=$(comm -12 <(grep -v '^#' "$OUT" | sort -u) <(nm --defined-only "$bin" | awk '{print $3}' | sort -u) | wc -l)
  echo "symbol-order: $present of $listed listed functions are in $bin"
  exit 0
fi

# shellcheck source=scripts/bench-lib.sh
. "$root/scripts/bench-lib.sh"
for tool in valgrind callgrind_control curl python3; do
  command -v "$tool" >/dev/null || { echo "symbol-order: $tool is missing (apt-get install valgrind curl python3)"; exit 1; }
done
bench_build
ferry_bin=$(realpath "$ferry_bin")   # the brokers run in directories of their own

work=$(mktemp -d /tmp/ferry-symbol-order.XXXXXX)
vpid=""
cleanup() {
  [ -n "$vpid" ] && kill -INT "$vpid" 2>/dev/null && wait "$vpid" 2>/dev/null
  if [ "${KEEP:-0}" = 1 ]; then echo "symbol-order: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

free_port() {
  local p=$1
  while port_busy "$p"; do p=$((p + 1)); done
  echo "$p"
}

# run_broker NAME [ARGS...]: starts ferry under callgrind in $work/NAME, sets $vpid.
run_broker() {
  local name=$1
  shift
  mkdir -p "$work/$name"
  (cd "$work/$name" && exec valgrind --tool=callgrind --demangle=no --dump-instr=no \
    --callgrind-out-file="$work/$name/cg.out" "$ferry_bin" "$@" >"$work/$name/ferry.log" 2>&1) &
  vpid=$!
}

# wait_broker PORT NAME: until PORT answers (valgrind starts slowly), or the broker is gone.
wait_broker() {
  for _ in $(seq 240); do
    port_busy "$1" && return 0
    kill -0 "$vpid" 2>/dev/null || break
    sleep 0.5
  done
  echo "symbol-order: ferry did not start"
  cat "$work/$2/ferry.log"
  exit 1
}

# probe PORT...: a connection opened and closed without a byte, as a health check or a script
# waiting for the port does (bench-lib.sh's wait_port): part of an idle broker's life.
probe() {
  local p
  for p in "$@"; do port_busy "$p"; done
  sleep 1
}

# dump NAME LABEL: writes the profile since the last dump to $work/NAME/LABEL.
dump() {
  callgrind_control --dump "$vpid" >/dev/null 2>&1 || { echo "symbol-order: dump failed"; exit 1; }
  sleep 2
  local f
  f=$(ls -t "$work/$1"/cg.out.* 2>/dev/null | head -1)
  [ -n "$f" ] || { echo "symbol-order: no profile dumped"; exit 1; }
  mv "$f" "$work/$1/$2"
}

stop_broker() {
  kill -INT "$vpid"
  wait "$vpid"
  vpid=""
  mv "$1/cg.out" "$1/shutdown"
}

# 1a. The embedded defaults, when their ports are free.
if ! port_busy 1883 && ! port_busy 5672 && ! port_busy 15672; then
  echo "symbol-order: start-up and idle, embedded defaults"
  run_broker defaults
  wait_broker 15672 defaults
  probe 1883 5672 15672
  sleep "$IDLE"
  dump defaults startup
  stop_broker "$work/defaults"
else
  echo "symbol-order: ports 1883/5672/15672 busy; the embedded defaults are not profiled"
fi

# 1b. A config file with the same listeners on free ports.
MQTT_PORT=$(free_port 28301)
AMQP_PORT=$(free_port $((MQTT_PORT + 1)))
HTTP_PORT=$(free_port $((AMQP_PORT + 1)))
mkdir -p "$work/config"
cat >"$work/config/ferry.toml" <<EOF
[broker]
data_dir = "$work/config/ferry-data"

[[listeners]]
protocol = "mqtt"
bind = "127.0.0.1:$MQTT_PORT"

[[listeners]]
protocol = "amqp"
bind = "127.0.0.1:$AMQP_PORT"

[[listeners]]
protocol = "http"
bind = "127.0.0.1:$HTTP_PORT"
EOF
echo "symbol-order: start-up and idle, config file (ports $MQTT_PORT, $AMQP_PORT, $HTTP_PORT)"
run_broker config -c "$work/config/ferry.toml"
wait_broker "$HTTP_PORT" config
probe "$MQTT_PORT" "$AMQP_PORT" "$HTTP_PORT"
sleep "$IDLE"
dump config startup

# 2. Idle devices: MQTT connections that subscribe to their command topic, park, ping and leave.
echo "symbol-order: idle devices"
b="$bench_bin"
run() { "$@" >>"$work/bench.log" 2>&1 || echo "symbol-order: warning: $* failed (see the profile anyway)"; }
for v in 3 5; do
  run "$b" idle --port "$MQTT_PORT" --connections 20 --hold 4 --keep-alive 2 --mqtt-version "$v" --subscribe
  run "$b" idle --port "$MQTT_PORT" --connections 20 --hold 2 --mqtt-version "$v"
done
sleep 2
dump config devices

# 3. The protocols' other paths.
echo "symbol-order: workload"
for v in 3 5; do
  for q in 0 1 2; do
    run "$b" mqtt --port "$MQTT_PORT" --qos "$q" --version "$v" --messages 2000 --subscribers 2 --settle 2
  done
done
run "$b" mqtt --port "$MQTT_PORT" --qos 1 --messages 1000 --clean-session false --client-id-prefix so --settle 2
run "$b" amqp --port "$AMQP_PORT" --messages 3000 --settle 2
run "$b" amqp --port "$AMQP_PORT" --messages 3000 --confirm --persistent --manual-ack --settle 2
run "$b" amqp --port "$AMQP_PORT" --messages 1000 --fanout-queues 3 --settle 2
run "$b" cross --mqtt-port "$MQTT_PORT" --amqp-port "$AMQP_PORT" --messages 1000 --settle 2
for path in /metrics /api/overview /api/queues /api/connections /api/exchanges /; do
  curl -s -u guest:guest -o /dev/null "http://127.0.0.1:$HTTP_PORT$path" || true
done
sleep 2
dump config workload
stop_broker "$work/config"

# Group the functions and write the file.
python3 - "$work" "$ferry_bin" "$OUT" <<'EOF'
import os, re, subprocess, sys
work, binary, out = sys.argv[1:4]

def functions(path):
    """The functions of the ferry binary that ran, from one callgrind profile, with the
    instructions each ran itself (not counting its calls)."""
    names, ran, ob, fn, call = {}, {}, None, None, False
    pat = re.compile(r'^(ob|fn|cfn|cob|fl|fi|fe|cfi|cfl)=(?:\((\d+)\))? ?(.*)$')
    for line in open(path, errors='replace'):
        line = line.rstrip('\n')
        if line[:1] in ('+', '-', '*') or line[:1].isdigit():
            # A cost line: "<position> <instructions>"; the one after `calls=` is the call's.
            if fn is not None and not call:
                parts = line.split()
                ran[fn] = ran.get(fn, 0) + (int(parts[-1]) if len(parts) > 1 else 0)
            call = False
            continue
        if line.startswith('calls='):
            call = True
            continue
        m = pat.match(line)
        if not m:
            continue
        kind, ident, name = m.groups()
        # Compressed names: "(id) name" defines id, "(id)" refers to it; objects, functions and
        # files number apart.
        space = {'ob': 'ob', 'cob': 'ob', 'fn': 'fn', 'cfn': 'fn'}.get(kind, 'fl')
        if ident is not None:
            if name:
                names[(space, ident)] = name
            name = names.get((space, ident), name)
        if kind == 'ob':
            ob = name
        elif kind == 'fn':
            fn = name if ob and os.path.basename(ob) == os.path.basename(binary) else None
            if fn is not None:
                ran.setdefault(fn, 0)
    return ran

def profile(label):
    ran = {}
    for d in ('defaults', 'config'):
        p = os.path.join(work, d, label)
        if os.path.exists(p):
            for n, c in functions(p).items():
                ran[n] = ran.get(n, 0) + c
    return ran

defined = set()
nm = subprocess.run(['nm', '--defined-only', binary], capture_output=True, text=True, check=True)
for line in nm.stdout.splitlines():
    parts = line.split()
    if len(parts) == 3 and parts[1] in 'tTwW':
        defined.add(parts[2])

runs = {label: {n: c for n, c in profile(label).items() if n in defined}
        for label in ('startup', 'devices', 'workload', 'shutdown')}
startup = set(runs['startup'])
# The messages' hot paths: the functions that ran 99 % of the instructions of the devices and
# workload runs, kept together so that they share as few pages (and TLB entries) as they can.
# Those start-up runs too end its group, hottest last; the others follow, hottest first. The idle
# broker pages in no more of them than it would anyway.
cost = {}
for label in ('devices', 'workload'):
    for n, c in runs[label].items():
        cost[n] = cost.get(n, 0) + c
total, covered, hot = sum(cost.values()), 0, []
for n in sorted(cost, key=lambda n: (-cost[n], n)):
    if covered >= 0.99 * total:
        break
    hot.append(n)
    covered += cost[n]
hot_set = set(hot)
groups = [
    ('startup', sorted(startup - hot_set)),
    ('startup, hot', [n for n in reversed(hot) if n in startup]),
    ('hot', [n for n in hot if n not in startup]),
]
seen = startup | hot_set
for label in ('devices', 'workload', 'shutdown'):
    group = sorted(set(runs[label]) - seen)
    seen |= set(group)
    groups.append((label, group))

sizes = {}
for line in subprocess.run(['nm', '-S', '--defined-only', binary], capture_output=True,
                           text=True, check=True).stdout.splitlines():
    parts = line.split()
    if len(parts) == 4:
        sizes[parts[3]] = int(parts[1], 16)

with open(out, 'w') as f:
    f.write('# The link order of the `ferry` binary\'s functions: written by scripts/symbol-order.sh,\n'
            '# read by server/build.rs (lld --symbol-ordering-file). Do not edit by hand.\n')
    for label, group in groups:
        kib = sum(sizes.get(n, 0) for n in group) / 1024
        f.write(f'# {label}: {len(group)} functions, {kib:.0f} KiB\n')
        for n in group:
            f.write(n + '\n')
        print(f'symbol-order: {label}: {len(group)} functions, {kib:.0f} KiB')
print(f'symbol-order: wrote {out}')
EOF
