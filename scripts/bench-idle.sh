#!/usr/bin/env bash
# Memory per idle MQTT connection, Ferry vs Mosquitto in the same run (issue 18).
#
# For each connection count in COUNTS and each MQTT version in VERSIONS, Ferry and Mosquitto are
# each started afresh (one after the other, the other one not running), and `ferry-bench idle`
# opens the connections (clean session, keep alive 60 s; with SUBSCRIBE=1, the default, each
# subscribes at QoS 1 to its own `devices/<client id>/cmd`), holds them HOLD seconds and closes
# them. RSS is VmRSS from /proc/<pid>/status: before connecting (2 s after the broker answered),
# then SETTLE seconds after the generator printed `ready N`; per connection = (after − before) / N.
# The anonymous part (RssAnon, the heap) is shown apart: the rest is mostly the code the first
# connections ran, paged in once (about 0.9 MB for Ferry). SETTLE is 5 s: Ferry's jemalloc gives
# freed pages back to the system after 1 s (its background threads; `.cargo/config.toml`), and
# 1 s after the last connection the handshakes' freed memory was still counted (110 B of each
# connection at 19,000). HOLD must exceed SETTLE, or the connections are gone when it is read.
#
# WARM=N (default 0) first opens N other connections (the same kind, client ids `warm-<i>`),
# held until the measurement is done, and reads "before" SETTLE seconds after they are up: the
# figure is then the cost of N more connections to a broker already serving some, without what
# the first connections cost once (Ferry: about 1 MB for its first 200, the code they run and
# its allocator's first slabs; Mosquitto grows linearly from the first). The broker and the
# generators need N + WARM open files.
#
# Ferry runs with its default listeners, MQTT and AMQP both on (LISTENERS=mqtt: MQTT only), no
# connection-rate limit and `max_connections` raised to 1,000,000 (the default, 65,536, would
# refuse the 100,000 run). Mosquitto 2.0.11 runs with `allow_anonymous true`, `persistence false`
# and otherwise its defaults.
#
#   scripts/bench-idle.sh                                    # COUNTS="10000 100000" VERSIONS="3 5"
#   COUNTS=10000 VERSIONS=3 BROKERS=ferry scripts/bench-idle.sh
#   FERRY_BIN=... BENCH_BIN=... scripts/bench-idle.sh        # binaries to use instead of building
#   PORT=32110 scripts/bench-idle.sh                         # first port to try (default 28931)
#   MALLOC_ARENA_MAX=2 scripts/bench-idle.sh                 # passed on to both brokers
#
# Connections per loopback source address are bounded by net.ipv4.ip_local_port_range; the
# generator spreads them over 127.0.0.1 … 127.0.0.K with K = ceil(N / 20000). Raises the
# open-file limit to 1,048,576 when run as root. Prints one Markdown table (TSV in $work/idle.tsv).
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
COUNTS=${COUNTS:-"10000 100000"}
VERSIONS=${VERSIONS:-"3 5"}
BROKERS=${BROKERS:-"ferry mosquitto"}
SUBSCRIBE=${SUBSCRIBE:-1}
LISTENERS=${LISTENERS:-both}
RATE=${RATE:-5000}
HOLD=${HOLD:-15}
SETTLE=${SETTLE:-5}
THREADS=${THREADS:-1}
WARM=${WARM:-0}

# shellcheck source=scripts/bench-lib.sh
. "$root/scripts/bench-lib.sh"
bench_build
mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
case " $BROKERS " in *" mosquitto "*)
  [ -x "$mosquitto_bin" ] || { echo "bench: mosquitto is missing (apt-get install -y mosquitto)"; exit 1; } ;;
esac

if [ "$(id -u)" = 0 ]; then ulimit -Hn 1048576 2>/dev/null; fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null

work=$(mktemp -d /tmp/bench-idle.XXXXXX)
bpid=""
gpid=""
wpid=""
# RssAnon in kB: the heap and the stacks, without the mapped code and files.
anon_now() { grep -s RssAnon "/proc/$1/status" | awk '{print $2}'; }
stop() {
  [ -n "$1" ] || return 0
  kill "$1" 2>/dev/null
  for _ in $(seq 40); do kill -0 "$1" 2>/dev/null || break; sleep 0.25; done
  kill -9 "$1" 2>/dev/null
  wait "$1" 2>/dev/null
}
cleanup() {
  stop "$wpid"
  stop "$gpid"
  stop "$bpid"
  if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  local p=$1
  while port_busy "$p"; do p=$((p + 1)); done
  echo "$p"
}
MQTT_PORT=$(free_port "${PORT:-28931}")
AMQP_PORT=$(free_port $((MQTT_PORT + 1)))

{
  echo "# Defaults, except: loopback listeners without a connection-rate limit, room for 1,000,000"
  echo "# connections, a fresh data directory."
  echo "[broker]"
  echo "data_dir = \"$work/ferry-data\""
  echo "log_level = \"warn\""
  echo "max_connections = 1000000"
  echo
  echo "[[listeners]]"
  echo "protocol = \"mqtt\""
  echo "bind = \"127.0.0.1:$MQTT_PORT\""
  echo "max_connection_rate = 0"
  echo "max_connections = 1000000"
  if [ "$LISTENERS" = both ]; then
    echo
    echo "[[listeners]]"
    echo "protocol = \"amqp\""
    echo "bind = \"127.0.0.1:$AMQP_PORT\""
    echo "max_connection_rate = 0"
  fi
} >"$work/ferry.toml"
cat >"$work/mosquitto.conf" <<EOF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
persistence false
log_dest stderr
log_type error
log_type warning
EOF

start_broker() {
  rm -rf "$work/ferry-data"
  case $1 in
    ferry) "$ferry_bin" -c "$work/ferry.toml" >>"$work/ferry.log" 2>&1 & ;;
    mosquitto) "$mosquitto_bin" -c "$work/mosquitto.conf" >>"$work/mosquitto.log" 2>&1 & ;;
  esac
  bpid=$!
  wait_port "$MQTT_PORT" 40 || { echo "bench: $1 did not start"; tail "$work/$1.log"; exit 1; }
}

sub_arg=""
[ "$SUBSCRIBE" = 1 ] && sub_arg="--subscribe"
echo "machine: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), ulimit -n $(ulimit -n), ports $(tr '\t' '-' </proc/sys/net/ipv4/ip_local_port_range)"
echo "ferry: $("$ferry_bin" --version), commit $(git -C "$root" rev-parse --short HEAD)$([ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ] && echo " with local changes"); $("$mosquitto_bin" -h 2>/dev/null | head -1)"
echo "listeners: $LISTENERS, subscribe: $SUBSCRIBE, rate $RATE/s, hold $HOLD s, settle $SETTLE s, warm $WARM, MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-unset}"
printf 'broker\tversion\tconnections\tconnected\tconnect_secs\trss_before_kb\trss_held_kb\tbytes_per_conn\tanon_bytes_per_conn\tload\n' >"$work/idle.tsv"
for n in $COUNTS; do
  sources=$(((n + 19999) / 20000))
  for v in $VERSIONS; do
    for b in $BROKERS; do
      start_broker "$b"
      sleep 2
      if [ "$WARM" -gt 0 ]; then
        # shellcheck disable=SC2086 # $sub_arg is empty or one argument
        "$bench_bin" idle --port "$MQTT_PORT" --connections "$WARM" --client-id-prefix warm- \
          --hold $((WARM / RATE + n / RATE + HOLD + SETTLE + 60)) --rate "$RATE" --keep-alive 60 \
          --mqtt-version "$v" $sub_arg --threads "$THREADS" --json >"$work/warm.out" 2>&1 &
        wpid=$!
        while ! grep -q '^ready ' "$work/warm.out" 2>/dev/null && kill -0 "$wpid" 2>/dev/null; do sleep 0.1; done
        sleep "$SETTLE"
      fi
      rss0=$(rss_now "$bpid")
      anon0=$(anon_now "$bpid")
      out="$work/$b-$v-$n.json"
      # shellcheck disable=SC2086 # $sub_arg is empty or one argument
      timeout $((n / RATE + HOLD + 120)) "$bench_bin" idle --port "$MQTT_PORT" --connections "$n" --hold "$HOLD" \
        --rate "$RATE" --keep-alive 60 --mqtt-version "$v" $sub_arg --sources "$sources" --threads "$THREADS" --json \
        >"$out" 2>"$out.err" &
      gpid=$!
      while ! grep -q '^ready ' "$out" 2>/dev/null && kill -0 "$gpid" 2>/dev/null; do sleep 0.1; done
      sleep "$SETTLE"
      rss1=$(rss_now "$bpid")
      anon1=$(anon_now "$bpid")
      load=$(cut -d' ' -f1 /proc/loadavg)
      wait "$gpid"
      gpid=""
      stop "$wpid"
      wpid=""
      ready=$(awk '/^ready / {print $2}' "$out")
      secs=$(grep '^{' "$out" | python3 -c 'import json,sys; print("%.1f" % json.load(sys.stdin)["connect_secs"])' 2>/dev/null)
      per=$(( (rss1 - rss0) * 1024 / ${ready:-1} ))
      anon=$(( (anon1 - anon0) * 1024 / ${ready:-1} ))
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$b" "$v" "$n" "${ready:-0}" "${secs:-?}" "$rss0" "$rss1" "$per" "$anon" "$load" >>"$work/idle.tsv"
      [ -s "$out.err" ] && sed 's/^/  generator: /' "$out.err" | head -5
      grep '^{' "$out" | python3 -c 'import json,sys; r=json.load(sys.stdin); [print("  error:", e) for e in r["error_sample"]]' 2>/dev/null
      stop "$bpid"
      bpid=""
    done
  done
done

python3 - "$work/idle.tsv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
print("| connections | MQTT | broker | connected | time to connect | RSS before | RSS held | per connection | of which anonymous | Ferry / Mosquitto | load |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
by = {(r["connections"], r["version"], r["broker"]): r for r in rows}
for r in rows:
    m = by.get((r["connections"], r["version"], "mosquitto"))
    ratio = "%.2f" % (int(r["bytes_per_conn"]) / int(m["bytes_per_conn"])) if r["broker"] == "ferry" and m and int(m["bytes_per_conn"]) > 0 else ""
    print("| {:,} | {} | {} | {:,} | {} s | {:.1f} MB | {:.1f} MB | {:,} B | {:,} B | {} | {} |".format(
        int(r["connections"]), "5.0" if r["version"] == "5" else "3.1.1", r["broker"].capitalize(), int(r["connected"]),
        r["connect_secs"], int(r["rss_before_kb"]) / 1000, int(r["rss_held_kb"]) / 1000, int(r["bytes_per_conn"]),
        int(r["anon_bytes_per_conn"]), ratio, r["load"]))
EOF
