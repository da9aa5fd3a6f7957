# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154 # sets variables the sourcing script reads; $root and $work are its
# Shared by scripts/bench-amqp.sh and scripts/bench-persistence.sh: sourced, not run.
#
# What it gives: `bench_need_rabbitmq` (installs rabbitmq-server with apt-get when missing, as
# root, and stops the system service the package starts), `bench_build` (release build of `ferry`
# and `ferry-bench`; sets $ferry_bin and $bench_bin), `port_busy`, `wait_port`, `rss` (a process's
# peak RSS), `reset_peak_rss`, and a private RabbitMQ node: `rabbit_start` / `rabbit_wait` /
# `rabbit_stop`, everything of it (mnesia, logs, cookie, config, pid file) under "$work/rabbit",
# distribution and epmd on loopback only.
#
# The caller sets $root (the repository), $work (its temporary directory), RABBIT_PORT and
# RABBIT_DIST_PORT before calling the rabbit_* functions.

RABBIT_BIN=${RABBIT_BIN:-/usr/lib/rabbitmq/bin}
NODE=${NODE:-bench@localhost}
fpid=${fpid:-}
rpid=${rpid:-}
beam=${beam:-}
epmd_before=""
rabbit_version=""
rabbit_up_secs=""

bench_need_python() {
  command -v python3 >/dev/null 2>&1 || { echo "bench: python3 is needed for the tables"; exit 1; }
}

bench_need_rabbitmq() {
  [ -x "$RABBIT_BIN/rabbitmq-server" ] && return 0
  if [ "$(id -u)" = 0 ]; then
    echo "installing rabbitmq-server..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server) >/dev/null 2>&1 ||
      { echo "bench: could not install rabbitmq-server"; exit 1; }
    # The package starts (or tries to start) the system service on 5672: not ours, stop it.
    timeout 60 service rabbitmq-server stop >/dev/null 2>&1 || true
  else
    echo "bench: rabbitmq-server is missing (apt-get install -y rabbitmq-server)"; exit 1
  fi
}

# FERRY_BIN and BENCH_BIN, when both set, name binaries to use instead (no build): a copy keeps
# a long run safe from a rebuild of target/ by someone else.
bench_build() {
  if [ -n "${FERRY_BIN:-}" ] && [ -n "${BENCH_BIN:-}" ]; then
    ferry_bin=$FERRY_BIN
    bench_bin=$BENCH_BIN
    return
  fi
  echo "building (release)..."
  (cd "$root" && cargo build -q --release -p ferry-server -p ferry-bench) || { echo "bench: build failed"; exit 1; }
  ferry_bin="${CARGO_TARGET_DIR:-$root/target}/release/ferry"
  bench_bin="${CARGO_TARGET_DIR:-$root/target}/release/ferry-bench"
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_port PORT TRIES: polls every 0.5 s.
wait_port() {
  for _ in $(seq "$2"); do
    port_busy "$1" && return 0
    sleep 0.5
  done
  return 1
}

# Peak RSS (VmHWM) of a process, e.g. "24916 kB"; empty when it is gone.
rss() { [ -n "${1:-}" ] && grep -s VmHWM "/proc/$1/status" | awk '{print $2 " " $3}'; }
# Current RSS (VmRSS) in kB.
rss_now() { [ -n "${1:-}" ] && grep -s VmRSS "/proc/$1/status" | awk '{print $2}'; }
# "WRITE_BYTES CPU_TICKS": bytes a process had storage write for it (/proc/<pid>/io write_bytes)
# and its user + system time in clock ticks; empty when it is gone.
proc_io() {
  [ -n "${1:-}" ] || return 0
  local w c
  w=$(awk '/^write_bytes/ {print $2}' "/proc/$1/io" 2>/dev/null)
  c=$(awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null)
  [ -n "$w" ] && [ -n "$c" ] && echo "$w $c"
}
# Resets a process's peak RSS to its current RSS (Linux >= 4.0; needs to own the process or be
# root). Returns non-zero when it could not.
reset_peak_rss() { [ -n "${1:-}" ] && { echo 5 >"/proc/$1/clear_refs"; } 2>/dev/null; }

# The RabbitMQ tools, as root but with this run's own cookie ($HOME) and node.
rabbit_env() {
  env HOME="$work/rabbit/home" \
    RABBITMQ_NODENAME="$NODE" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$RABBIT_PORT" \
    RABBITMQ_DIST_PORT="$RABBIT_DIST_PORT" \
    RABBITMQ_MNESIA_BASE="$work/rabbit/mnesia" \
    RABBITMQ_LOG_BASE="$work/rabbit/log" \
    RABBITMQ_CONFIG_FILE="$work/rabbit/rabbitmq.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$work/rabbit/enabled_plugins" \
    RABBITMQ_PID_FILE="$work/rabbit/pid" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    ERL_EPMD_ADDRESS=127.0.0.1 \
    "$@"
}

# rabbit_start PLUGINS [CONFIG LINE...]: PLUGINS is an Erlang list ("[]", "[rabbitmq_mqtt]"),
# written to the node's own enabled_plugins file (what `rabbitmq-plugins enable` would write);
# the AMQP listener is 127.0.0.1:$RABBIT_PORT, other listeners come as config lines. Sets $rpid.
rabbit_start() {
  local plugins=$1
  shift
  mkdir -p "$work/rabbit/home" "$work/rabbit/mnesia" "$work/rabbit/log"
  epmd_before=$(pgrep -x epmd | tr '\n' ' ')
  {
    echo "listeners.tcp.1 = 127.0.0.1:$RABBIT_PORT"
    for line in "$@"; do echo "$line"; done
  } >"$work/rabbit/rabbitmq.conf"
  echo "$plugins." >"$work/rabbit/enabled_plugins"
  (cd "$work/rabbit" && rabbit_env "$RABBIT_BIN/rabbitmq-server" >"$work/rabbitmq.out" 2>&1) &
  rpid=$!
}

# rabbit_wait [EXTRA PORT...]: waits (at most 60 s each) for the node to answer ping, then for
# its AMQP port and the extra ports. Sets $beam (the beam.smp pid), $rabbit_version and
# $rabbit_up_secs. Returns 1 (with the node's last output) when it did not come up.
rabbit_wait() {
  local started p
  started=$(date +%s)
  # Erlang takes 5-20 s to boot RabbitMQ: the node first, then its listeners.
  while [ $(($(date +%s) - started)) -lt 60 ]; do
    rabbit_env timeout 10 "$RABBIT_BIN/rabbitmq-diagnostics" -q -n "$NODE" ping >/dev/null 2>&1 && break
    kill -0 "$rpid" 2>/dev/null || break
    sleep 1
  done
  for p in "$RABBIT_PORT" "$@"; do
    if ! wait_port "$p" 120; then
      echo "bench: rabbitmq did not open port $p within $(($(date +%s) - started)) s"
      tail -20 "$work/rabbitmq.out"
      return 1
    fi
  done
  beam=$(cat "$work/rabbit/pid" 2>/dev/null)
  [ -n "$beam" ] || beam=$(pgrep -f "beam.smp.*$NODE" | head -1)
  rabbit_version=$(rabbit_env timeout 20 "$RABBIT_BIN/rabbitmqctl" -q -n "$NODE" version 2>/dev/null)
  rabbit_up_secs=$(($(date +%s) - started))
}

# Stops the node (`rabbitmqctl stop`, then kill -9 after 10 s) and the epmd it started (only
# one that was not running before).
rabbit_stop() {
  [ -n "$rpid" ] || return 0
  rabbit_env timeout 30 "$RABBIT_BIN/rabbitmqctl" -q -n "$NODE" stop >/dev/null 2>&1
  # `stop` returns while the VM halts; give it 10 s before forcing it.
  for _ in $(seq 20); do
    if [ -z "$beam" ] || ! kill -0 "$beam" 2>/dev/null; then break; fi
    sleep 0.5
  done
  [ -n "$beam" ] && kill -9 "$beam" 2>/dev/null
  kill "$rpid" 2>/dev/null
  local p
  for p in $(pgrep -x epmd); do
    case " $epmd_before " in *" $p "*) ;; *) kill "$p" 2>/dev/null ;; esac
  done
  rpid=""
}

# An exit trap's cleanup: asks the given processes to stop (continuing any that a benchmark
# stopped with SIGSTOP, as they could not act on it otherwise), stops the RabbitMQ node if one
# was started, then kills what is left.
stop_all() {
  local p
  for p in "$@" ${beam:-}; do kill -CONT "$p" 2>/dev/null; done
  for p in "$@"; do kill "$p" 2>/dev/null; done
  rabbit_stop
  sleep 0.5
  for p in "$@"; do kill -9 "$p" 2>/dev/null; done
}

# --- added for scripts/bench-compare.sh ---------------------------------------------------------

# bench_need_mosquitto: installs mosquitto with apt-get when missing (as root); sets $mosquitto_bin.
# The Debian package may start a system service on 1883: not ours, stopped again.
bench_need_mosquitto() {
  if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    if [ "$(id -u)" = 0 ]; then
      echo "installing mosquitto..."
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto) >/dev/null 2>&1 ||
        { echo "bench: could not install mosquitto"; exit 1; }
      timeout 30 service mosquitto stop >/dev/null 2>&1 || true
    else
      echo "bench: mosquitto is missing (apt-get install -y mosquitto)"; exit 1
    fi
  fi
  mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
}

# free_port BASE [EXCLUDED...]: the first port from BASE up that nothing listens on 127.0.0.1 and
# is not one of EXCLUDED (ports already handed out by this script).
free_port() {
  local p=$1 x taken
  shift
  while [ "$p" -lt 65000 ]; do
    taken=0
    for x in "$@"; do [ "$x" = "$p" ] && taken=1; done
    if [ $taken = 0 ] && ! port_busy "$p"; then echo "$p"; return 0; fi
    p=$((p + 1))
  done
  return 1
}

# cpu_ticks PID: user + system time of a process (all its threads) in clock ticks
# (/proc/<pid>/stat utime + stime; getconf CLK_TCK per second); empty when it is gone.
cpu_ticks() {
  [ -n "${1:-}" ] || return 0
  # The fields after the command name, which is in parentheses and may hold spaces.
  sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $12 + $13}'
}

# rss_sampler PID FILE [INTERVAL]: run in the background; every INTERVAL seconds (0.2) reads the
# process's VmRSS and keeps the largest value seen, in kB, in FILE. Stop it with kill.
rss_sampler() {
  local pid=$1 file=$2 every=${3:-0.2} peak=0 v
  while kill -0 "$pid" 2>/dev/null; do
    v=$(rss_now "$pid")
    if [ -n "$v" ] && [ "$v" -gt "$peak" ]; then
      peak=$v
      echo "$peak" >"$file"
    fi
    sleep "$every"
  done
}

# --- added for scripts/bench-scrape.sh and scripts/bench-management.sh --------------------------

# machine_meta: the lines `date=`, `nproc=`, `cpu=`, `mem=`, `kernel=`, `load_start=` and
# `ferry_commit=` (the repository's HEAD, "with local changes" when dirty) for a run's meta.env.
machine_meta() {
  local commit
  commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo "?")
  [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ] && commit="$commit with local changes"
  echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "nproc=$(nproc)"
  echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "mem=$(awk '/MemTotal/ {printf "%.0f GB", $2 / 1048576}' /proc/meminfo)"
  echo "kernel=$(uname -sr)"
  echo "load_start=$(cut -d' ' -f1-3 /proc/loadavg)"
  echo "ferry_commit=$commit"
}

# write_section FILE NAME SECTION: replaces what is between `<!-- NAME:begin -->` and
# `<!-- NAME:end -->` in FILE with the text of the file SECTION (appends both markers when
# missing).
write_section() {
  python3 - "$1" "$2" "$3" <<'PY'
import sys
path, name, section = sys.argv[1], sys.argv[2], open(sys.argv[3]).read()
begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
doc = open(path).read()
if begin in doc and end in doc:
    doc = doc[: doc.index(begin) + len(begin)] + "\n" + section + doc[doc.index(end):]
else:
    doc = doc.rstrip("\n") + "\n\n" + begin + "\n" + section + end + "\n"
open(path, "w").write(doc)
PY
}

# make_queues PORT COUNT EVERY [USER:PASSWORD]: declares COUNT queues q.00000, q.00001, ...
# (non-durable) through the management API on 127.0.0.1:PORT (Ferry's or RabbitMQ's: the same
# requests) and publishes one message to every EVERY-th of them (0: none), over one kept-alive
# HTTP connection. Fails on the first answer that is not 2xx.
make_queues() {
  python3 - "$@" <<'PY'
import base64, http.client, json, sys
port, count, every = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cred = sys.argv[4] if len(sys.argv) > 4 else "guest:guest"
head = {"Authorization": "Basic " + base64.b64encode(cred.encode()).decode(), "Content-Type": "application/json"}
c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
def call(method, path, body):
    c.request(method, path, json.dumps(body), head)
    r = c.getresponse()
    data = r.read()
    if r.status >= 300:
        sys.exit(f"make_queues: {method} {path}: {r.status} {data[:200]!r}")
for i in range(count):
    name = f"q.{i:05d}"
    call("PUT", f"/api/queues/%2F/{name}", {"durable": False, "auto_delete": False, "arguments": {}})
    if every and i % every == 0:
        call("POST", "/api/exchanges/%2F/amq.default/publish",
             {"properties": {}, "routing_key": name, "payload": "x", "payload_encoding": "string"})
PY
}
