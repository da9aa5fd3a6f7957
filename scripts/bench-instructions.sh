#!/bin/bash
# Instructions the broker executes per message, counted by valgrind's callgrind: usually
# repeatable to about ±0.5 % for one build whatever else the machine runs (now and then a run is
# 5 % off, from how the frames fell into reads: run it twice), so it tells small steps apart
# where timing cannot (this VM has no hardware counters; timed runs of one build differ by
# ±5 %). It counts instructions, not cycles: atomics, cache misses and stalls cost nothing
# here, so confirm a step with a timed A/B (scripts/bench-ab.sh) as well.
#
#   scripts/bench-instructions.sh FERRY_BIN [amqp|mqtt] [N]
#
# Starts FERRY_BIN under callgrind on a fresh data directory (port 29913), warms it with
# 20,000 messages, zeroes the counters, sends N (100,000) messages of 64 B one publisher -> one
# consumer (AMQP auto-ack, or MQTT QoS 0) with ferry-bench (BENCH, default
# target/release/ferry-bench), dumps the counters and prints the instructions per message and
# the ten functions with the most instructions of their own. The dump stays in OUT
# (default /tmp/ferry-callgrind) for `callgrind_annotate`. Needs valgrind (apt-get install
# valgrind). About 10 s per 100,000 messages.
set -eu
BIN=${1:?usage: bench-instructions.sh FERRY_BIN [amqp|mqtt] [N]}
PROTO=${2:-amqp}
N=${3:-100000}
BENCH=${BENCH:-$PWD/target/release/ferry-bench}
OUT=${OUT:-/tmp/ferry-callgrind}
PORT=29913
case $PROTO in
  amqp) args=(amqp --port $PORT --size 64) ;;
  mqtt) args=(mqtt --port $PORT --qos 0 --publishers 1 --subscribers 1 --size 64) ;;
  *) echo "protocol: amqp or mqtt" >&2; exit 2 ;;
esac
rm -rf "$OUT"; mkdir -p "$OUT"
printf '[broker]\ndata_dir = "%s/data"\nlog_level = "warn"\n[[listeners]]\nprotocol = "%s"\nbind = "127.0.0.1:%s"\nmax_connection_rate = 0\n' \
  "$OUT" "$PROTO" "$PORT" > "$OUT/ferry.toml"
valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" "$BIN" -c "$OUT/ferry.toml" \
  > "$OUT/ferry.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 300); do (echo > /dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.2; done
"$BENCH" "${args[@]}" --messages 20000 --timeout 120 > /dev/null
callgrind_control -z "$pid" > /dev/null
"$BENCH" "${args[@]}" --messages "$N" --timeout 300 > "$OUT/bench.txt"
callgrind_control -d "$pid" > /dev/null
sleep 1
kill "$pid"; wait "$pid" 2>/dev/null || true
trap - EXIT
dump=$(ls "$OUT"/callgrind.out.* | head -1)
total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
grep -E "lost" "$OUT/bench.txt" | head -1
echo "instructions per message: $((total / N)) ($total for $N messages; dump $dump)"
callgrind_annotate --inclusive=no --threshold=100 "$dump" 2>/dev/null \
  | sed -n '/file:function/,$p' | grep -E '^ *[0-9,]+ ' | grep -v -E 'clone|start_thread|thread_start|call_once|backtrace|runtime/task' \
  | head -10
