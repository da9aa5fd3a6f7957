#!/usr/bin/env bash
# What a Prometheus scrape of /metrics every second costs the message path (issue 17: QoS 0
# throughput within 2 % of no scraping), A/B in one run, written into docs/benchmarks.md
# (between <!-- bench-scrape:begin --> and <!-- bench-scrape:end -->).
#
# One Ferry (release build; an MQTT and an HTTP listener on free loopback ports, defaults
# otherwise, the loopback guest, a fresh data directory) with QUEUES idle non-durable queues
# (declared through the API, one message in every tenth), so that each scrape has per-queue
# series to render (the default `metrics_max_queues` lists 1,000). Then ROUNDS rounds of two
# runs, alternating (off, on, on, off, off, on, ...): *off* (no scraper) and *on* (`curl` of /metrics every INTERVAL s in the
# background, from the start of the run to its end). Each run is `ferry-bench mqtt` QoS 0, one
# publisher, one subscriber, SIZE-byte payloads, unpaced, as many messages as it can send;
# WARMUP s after it starts, the measure window of MEASURE s: deliveries from the broker's own
# counter (`ferry_messages_delivered_total{protocol="mqtt"}`, read from /metrics at both ends
# of the window, in both arms) over the window's length, and the broker's CPU (utime + stime,
# /proc/<pid>/stat) over the window per delivery. Then the generator is stopped (it would stop
# by itself at its --timeout) and the next run starts once the broker is idle again. At the
# end, IDLE_SCRAPES scrapes back to back without load: the broker's CPU per scrape.
#
# Environment: ROUNDS (6: an even number balances the order), WARMUP (3), MEASURE (10), QUEUES (1000), INTERVAL (1), SIZE (64),
# BENCH_THREADS (generator threads, 1), IDLE_SCRAPES (200), DOCS (1: write the section into DOC_FILE,
# docs/benchmarks.md), KEEP (1: keep the work directory). FERRY_BIN and BENCH_BIN, both set, use
# those binaries instead of a release build.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
cmdline="scripts/bench-scrape.sh${*:+ $*}"
for v in ROUNDS WARMUP MEASURE QUEUES INTERVAL SIZE BENCH_THREADS; do
  [ -n "${!v:-}" ] && cmdline="$v=${!v} $cmdline"
done
ROUNDS=${ROUNDS:-6}
WARMUP=${WARMUP:-3}
MEASURE=${MEASURE:-10}
QUEUES=${QUEUES:-1000}
INTERVAL=${INTERVAL:-1}
SIZE=${SIZE:-64}
BENCH_THREADS=${BENCH_THREADS:-1}
IDLE_SCRAPES=${IDLE_SCRAPES:-200}
DOCS=${DOCS:-1}
DOC_FILE=${DOC_FILE:-$root/docs/benchmarks.md}
CLK_TCK=$(getconf CLK_TCK)

# shellcheck source=scripts/bench-lib.sh
. "$root/scripts/bench-lib.sh"
bench_need_python
bench_build
command -v curl >/dev/null || { echo "bench: curl is needed"; exit 1; }

work=$(mktemp -d /tmp/bench-scrape.XXXXXX)
fpid=""  # the broker
gpid=""  # the generator
spid=""  # the scraper
cleanup() {
  stop_all $spid $gpid $fpid
  if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

MQTT_PORT=$(free_port 28990)
HTTP_PORT=$(free_port 28991 "$MQTT_PORT")
metrics_url="http://127.0.0.1:$HTTP_PORT/metrics"

machine_meta >"$work/meta.env"
{
  echo "cmdline=$cmdline"
  echo "ferry=$("$ferry_bin" --version 2>/dev/null)"
  echo "ferry_bin_given=$([ -n "${FERRY_BIN:-}" ] && echo 1 || echo 0)"
  echo "settings=ROUNDS=$ROUNDS WARMUP=$WARMUP MEASURE=$MEASURE QUEUES=$QUEUES INTERVAL=$INTERVAL SIZE=$SIZE BENCH_THREADS=$BENCH_THREADS"
} >>"$work/meta.env"
echo "machine: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"

cat >"$work/ferry.toml" <<EOF
[broker]
data_dir = "$work/data"
log_level = "warn"

[[listeners]]
protocol = "mqtt"
bind = "127.0.0.1:$MQTT_PORT"

[[listeners]]
protocol = "http"
bind = "127.0.0.1:$HTTP_PORT"
EOF
"$ferry_bin" -c "$work/ferry.toml" >"$work/broker.log" 2>&1 &
fpid=$!
wait_port "$HTTP_PORT" 40 && wait_port "$MQTT_PORT" 10 || { echo "bench: ferry did not start"; tail "$work/broker.log"; exit 1; }
echo "$QUEUES queues..."
make_queues "$HTTP_PORT" "$QUEUES" 10 || exit 1

# delivered: the broker's count of MQTT deliveries.
delivered() {
  curl -s -u guest:guest "$metrics_url" | awk '/^ferry_messages_delivered_total\{protocol="mqtt"\}/ {print $2}'
}

# scraper FILE: /metrics every INTERVAL s, each request's time and size appended to FILE.
scraper() {
  while :; do
    curl -s -o /dev/null -u guest:guest -w '%{http_code} %{time_total} %{size_download}\n' "$metrics_url" >>"$1"
    sleep "$INTERVAL"
  done
}

# run ARM ROUND: one generator run, its window's figures into results/.
run() {
  local arm=$1 round=$2 out
  out="$work/results/$round-$arm"
  mkdir -p "$work/results"
  local load0 d0 d1 c0 c1 t0 t1
  load0=$(cut -d' ' -f1 /proc/loadavg)
  : >"$out.scrapes"
  if [ "$arm" = on ]; then
    scraper "$out.scrapes" &
    spid=$!
  fi
  timeout $((WARMUP + MEASURE + 60)) "$bench_bin" mqtt --port "$MQTT_PORT" --qos 0 --publishers 1 --subscribers 1 \
    --messages 100000000 --size "$SIZE" --threads "$BENCH_THREADS" --timeout $((WARMUP + MEASURE + 5)) --settle 1 \
    >"$out.bench" 2>&1 &
  gpid=$!
  sleep "$WARMUP"
  d0=$(delivered)
  c0=$(cpu_ticks "$fpid")
  t0=$(date +%s.%N)
  sleep "$MEASURE"
  d1=$(delivered)
  c1=$(cpu_ticks "$fpid")
  t1=$(date +%s.%N)
  local scrapes
  scrapes=$(wc -l <"$out.scrapes")
  [ -n "$spid" ] && { kill "$spid" 2>/dev/null; wait "$spid" 2>/dev/null; spid=""; }
  kill "$gpid" 2>/dev/null
  wait "$gpid" 2>/dev/null
  gpid=""
  local load1
  load1=$(cut -d' ' -f1 /proc/loadavg)
  python3 - "$arm" "$round" "$d0" "$d1" "$c0" "$c1" "$t0" "$t1" "$CLK_TCK" "$load0" "$load1" "$out.scrapes" "$scrapes" \
    >"$out.json" <<'PY'
import json, sys
arm, rnd, d0, d1, c0, c1, t0, t1, hz, l0, l1, sfile, nscr = sys.argv[1:]
d = float(d1) - float(d0)
secs = float(t1) - float(t0)
cpu = (float(c1) - float(c0)) / float(hz)
times = [float(l.split()[1]) * 1000 for l in open(sfile) if l.startswith("200 ")]
sizes = [int(l.split()[2]) for l in open(sfile) if l.startswith("200 ")]
print(json.dumps({"arm": arm, "round": int(rnd), "delivered": d, "secs": secs, "rate": d / secs,
                  "cpu_secs": cpu, "cpu_us_per_msg": cpu * 1e6 / d if d else None,
                  "load_start": l0, "load_end": l1, "scrapes_in_run": int(nscr),
                  "scrape_ms": times, "scrape_bytes": max(sizes) if sizes else None}))
PY
  echo "$arm round $round: $(python3 -c "import json; r=json.load(open('$out.json')); print(f\"{r['rate']/1000:.0f}k deliveries/s, broker {r['cpu_us_per_msg']:.3f} us/msg, {r['scrapes_in_run']} scrapes, load {r['load_start']}\")")"
  # Let the broker drain what the generator left before the next run.
  sleep 2
}

# ABBA: off first in odd rounds, on first in even ones, so that neither arm always follows the other.
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then
    run off "$r"
    run on "$r"
  else
    run on "$r"
    run off "$r"
  fi
done
# What one scrape costs the broker, without load: IDLE_SCRAPES requests one after the other,
# the broker's CPU over them (10 ms ticks: many requests for a fine figure).
c0=$(cpu_ticks "$fpid")
for _ in $(seq "$IDLE_SCRAPES"); do curl -s -o /dev/null -u guest:guest "$metrics_url"; done
c1=$(cpu_ticks "$fpid")
echo "idle_scrape_ms=$(python3 -c "print(($c1 - $c0) * 1000 / $CLK_TCK / $IDLE_SCRAPES)")" >>"$work/meta.env"
echo "load_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$work/meta.env"

python3 - "$work" >"$work/section.md" <<'PY'
import glob, json, os, statistics, sys
work = sys.argv[1]
meta = dict(l.rstrip("\n").split("=", 1) for l in open(os.path.join(work, "meta.env")) if "=" in l)
runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(work, "results", "*.json")))]
arm = {a: [r for r in runs if r["arm"] == a and r["delivered"] > 0] for a in ("off", "on")}
med = statistics.median
def spread(xs, f):
    return f"{f(med(xs))} ({f(min(xs))}–{f(max(xs))})"
k = lambda v: f"{v / 1000:,.0f}k/s"
u = lambda v: f"{v:.3f}"
out = ["## /metrics scraped every second against no scraping (generated)", ""]
out.append(f"Written by `scripts/bench-scrape.sh` on {meta['date']}; the script replaces everything between "
           f"the `bench-scrape` markers. Machine: {meta['nproc']} CPUs ({meta['cpu']}), {meta['mem']} RAM, "
           f"{meta['kernel']}, shared with other engineers' builds and tests: load average {meta['load_start']} "
           f"at the start, {meta['load_end']} at the end.")
out.append("")
out.append(f"- **Command:** `{meta['cmdline']}` ({meta['settings']}).")
built = ("the binary FERRY_BIN names, the repository at commit " if meta.get("ferry_bin_given") == "1" else "commit ") + meta["ferry_commit"]
out.append(f"- **Ferry:** {meta['ferry']}, release build ({built}); an MQTT and an HTTP "
           "listener, defaults otherwise; the queues exist and are idle (per-queue series for up to 1,000 of them "
           "in each scrape, the default `metrics_max_queues`).")
out.append("- **Runs:** `ferry-bench mqtt` QoS 0, 1 publisher → 1 subscriber, unpaced; *off* and *on* "
           "alternate (off, on, on, off, off, on, …) against the same broker. *On*: `curl` of `/metrics` every "
           "second in the background for the whole run. Rate: MQTT deliveries in the measure window (the "
           "broker's `ferry_messages_delivered_total`, read at both ends of the window in both arms) / its "
           "length; CPU: the broker's utime + stime over the window per delivery.")
out.append("")
if arm["off"] and arm["on"]:
    rate_off, rate_on = med([r["rate"] for r in arm["off"]]), med([r["rate"] for r in arm["on"]])
    cpu_off = med([r["cpu_us_per_msg"] for r in arm["off"]])
    cpu_on = med([r["cpu_us_per_msg"] for r in arm["on"]])
    pairs = {}
    for r in runs:
        pairs.setdefault(r["round"], {})[r["arm"]] = r
    ratios = [p["on"]["rate"] / p["off"]["rate"] for p in pairs.values() if "on" in p and "off" in p and p["off"]["rate"]]
    cratios = [p["on"]["cpu_us_per_msg"] / p["off"]["cpu_us_per_msg"] for p in pairs.values()
               if "on" in p and "off" in p and p["off"]["cpu_us_per_msg"] and p["on"]["cpu_us_per_msg"]]
    scr = [t for r in arm["on"] for t in r["scrape_ms"]]
    out.append("| scraping | runs | deliveries/s, median (min–max) | on / off | broker CPU µs per delivery, median (min–max) | on / off |")
    out.append("|---|---|---|---|---|---|")
    out.append(f"| off | {len(arm['off'])} | {spread([r['rate'] for r in arm['off']], k)} | 1 | "
               f"{spread([r['cpu_us_per_msg'] for r in arm['off']], u)} | 1 |")
    out.append(f"| on, every second | {len(arm['on'])} | {spread([r['rate'] for r in arm['on']], k)} | "
               f"{rate_on / rate_off:.3f} | {spread([r['cpu_us_per_msg'] for r in arm['on']], u)} | {cpu_on / cpu_off:.3f} |")
    out.append("")
    out.append(f"Per round, on / off: deliveries/s {', '.join(f'{x:.3f}' for x in ratios)} (median {med(ratios):.3f}); "
               f"broker CPU per delivery {', '.join(f'{x:.3f}' for x in cratios)} (median {med(cratios):.3f}).")
    if scr:
        size = max(r["scrape_bytes"] or 0 for r in arm["on"])
        out.append(f"Each scrape: {len(scr)} in all, {size / 1000:.0f} KB, answered in {med(scr):.1f} ms median "
                   f"({min(scr):.1f}–{max(scr):.1f} ms) while the load ran.")
    if meta.get("idle_scrape_ms"):
        per = float(meta["idle_scrape_ms"])
        busy = med([r["cpu_secs"] / r["secs"] for r in arm["off"]])
        out.append(f"The broker's CPU per scrape, without load (scrapes back to back): {per:.2f} ms; at one "
                   f"scrape a second that is {per / 10:.2f} % of a core, {per / 10 / busy:.2f} % of the "
                   f"{busy * 100:.0f} % of a core the broker spent on the QoS 0 load (median of the *off* runs): "
                   "the most a scrape can take from a CPU-bound message path.")
    out.append("")
    out.append("Per run (deliveries/s, broker µs per delivery, load average at its start): " + "; ".join(
        f"{r['arm']} #{r['round']}: {r['rate'] / 1000:.0f}k/s, {r['cpu_us_per_msg']:.3f} µs, load {r['load_start']}"
        for r in runs if r["delivered"] > 0) + ".")
failed = [f"{r['arm']} #{r['round']}" for r in runs if r["delivered"] <= 0]
if failed:
    out.append("")
    out.append("Runs without deliveries in the window: " + ", ".join(failed) + ".")
print("\n".join(out))
PY
cat "$work/section.md"
if [ "$DOCS" = 1 ]; then
  write_section "$DOC_FILE" bench-scrape "$work/section.md"
  echo "written to $DOC_FILE"
fi
