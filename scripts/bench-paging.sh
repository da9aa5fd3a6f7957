#!/bin/bash
# Queues larger than memory (docs/benchmarks.md, "Queues larger than memory"): fills one durable
# queue with N x 1 KiB persistent messages (confirms, nobody consuming), reads the broker's RSS,
# optionally kills it with SIGKILL and starts it again, then drains the queue with one no-ack
# consumer (scripts/bench-drain.py) and prints the rate, the broker's CPU per message and its RSS.
#
#   FERRY_BIN=target/release/ferry BENCH_BIN=target/release/ferry-bench scripts/bench-paging.sh LABEL PORT N [restart]
#
# HOGS=K makes the machine busy for the drain alone: K processes spinning on a CPU at the broker's
# priority, started after the fill and stopped after the drain (a reproducible "busy machine":
# on 2 CPUs, HOGS=3 puts the load average near 4-5). DISK_HOG=1 also keeps the disk busy from
# before the fill to after the drain: 1 GB files written with fsync, one after the other, in the
# data directory's file system (docs/benchmarks.md, "A reproducible busy machine").
#
# Loopback only; the data directory (DATA, default /tmp/ferry-paging-LABEL) is deleted at the end:
# N = 10,000,000 needs about 14 GB of disk.
set -u
label=$1; port=$2; n=$3; mode=${4:-}
bin=${FERRY_BIN:-target/release/ferry}; bench=${BENCH_BIN:-target/release/ferry-bench}
here=$(cd "$(dirname "$0")" && pwd)
dir=${DATA:-/tmp/ferry-paging-$label}
rm -rf "$dir"; mkdir -p "$dir"
printf '[broker]\ndata_dir = "%s/data"\n[[listeners]]\nprotocol = "amqp"\nbind = "127.0.0.1:%s"\n' "$dir" "$port" > "$dir/ferry.toml"
start() {
    "$bin" --config "$dir/ferry.toml" 2> "$dir/$1" &
    pid=$!
    for _ in $(seq 600); do grep -q "ferry ready" "$dir/$1" 2>/dev/null && break; sleep 0.1; done
}
rss() { awk '/VmRSS/ {print $2 / 1024 " MB"}' /proc/$pid/status; }
diskhog=""
hogs=()
# The hogs stop with the script, however it ends.
stop_hogs() {
    rm -f "$dir/hog.on"
    [ ${#hogs[@]} -gt 0 ] && kill "${hogs[@]}" 2>/dev/null && wait "${hogs[@]}" 2>/dev/null
    hogs=()
    [ -n "$diskhog" ] && wait "$diskhog" 2>/dev/null
    diskhog=""
}
trap stop_hogs EXIT
if [ "${DISK_HOG:-0}" = 1 ]; then
    touch "$dir/hog.on"
    (while [ -e "$dir/hog.on" ]; do dd if=/dev/zero of="$dir/hog" bs=1M count=1000 conv=fsync status=none; done) &
    diskhog=$!
fi
start log
echo "[$label] $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg) idle RSS $(rss)"
t0=$(date +%s.%N)
"$bench" amqp --port "$port" --publishers 1 --consumers 0 --messages "$n" --size 1024 --persistent --confirm \
    --queue big --timeout 3600 --json > "$dir/fill.json" 2>&1
t1=$(date +%s.%N)
echo "[$label] filled $n in $(echo "$t1 - $t0" | bc) s; RSS $(rss); store $(du -sh "$dir/data" | cut -f1)"
if [ "$mode" = restart ]; then
    kill -KILL $pid; wait $pid 2>/dev/null
    t0=$(date +%s.%N)
    start log2
    t1=$(date +%s.%N)
    echo "[$label] ready after SIGKILL in $(echo "$t1 - $t0" | bc) s; RSS $(rss); $(grep -o 'recovered the store.*' "$dir/log2" | head -1)"
fi
for _ in $(seq "${HOGS:-0}"); do
    timeout 3600 sh -c 'while :; do :; done' &
    hogs+=($!)
done
[ ${#hogs[@]} -gt 0 ] && sleep 2 && echo "[$label] ${#hogs[@]} CPU hogs running, load $(cut -d' ' -f1 /proc/loadavg)"
python3 "$here/bench-drain.py" "$port" big "$n" $pid | sed "s/^/[$label] /"
[ ${#hogs[@]} -gt 0 ] && kill "${hogs[@]}" 2>/dev/null && wait "${hogs[@]}" 2>/dev/null
hogs=()
echo "[$label] $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg) RSS after the drain $(rss)"
kill $pid; wait $pid 2>/dev/null
stop_hogs
rm -rf "$dir"
