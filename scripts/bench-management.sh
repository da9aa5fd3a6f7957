#!/usr/bin/env bash
# The management API and /metrics with many queues (issue 17: answered in under 200 ms with
# 10,000 queues), timed with `curl -w '%{time_total}'`, written into docs/management.md (between
# <!-- bench-management:begin --> and <!-- bench-management:end -->).
#
# Ferry (release build) with an MQTT listener and two HTTP listeners (one with the default
# `metrics_max_queues`, one with 20000 so that /metrics lists every queue), a fresh data
# directory; QUEUES non-durable queues `q.00000`... declared through the API (PUT
# /api/queues/%2F/...), one message published to every EVERY-th; CONNECTIONS idle MQTT
# connections held open by `ferry-bench idle` meanwhile. Then each request of the table,
# REQUESTS rounds, each round asking every target in turn (alternating, so that the machine's
# load falls on all alike):
#   - OLD_FERRY=<an older ferry binary>: the same setup on a second Ferry, for a before/after
#     ratio from the same run;
#   - RABBIT=1: a private RabbitMQ node (Debian's rabbitmq-server, its management plugin,
#     started as scripts/bench-lib.sh's rabbit_start does, loopback only) with the same queues
#     and messages, declared through its API; the /api requests only (no connections, no
#     Prometheus plugin).
#
# Environment: QUEUES (10000), EVERY (10), REQUESTS (3), CONNECTIONS (1000; 0: none), OLD_FERRY,
# RABBIT (0), DOCS (1: write the section into DOC_FILE, docs/management.md), KEEP (1: keep the
# work directory). FERRY_BIN and BENCH_BIN, both set, use those binaries instead of a build.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
cmdline="scripts/bench-management.sh${*:+ $*}"
for v in QUEUES EVERY REQUESTS CONNECTIONS OLD_FERRY RABBIT; do
  [ -n "${!v:-}" ] && cmdline="$v=${!v} $cmdline"
done
QUEUES=${QUEUES:-10000}
EVERY=${EVERY:-10}
REQUESTS=${REQUESTS:-3}
CONNECTIONS=${CONNECTIONS:-1000}
OLD_FERRY=${OLD_FERRY:-}
RABBIT=${RABBIT:-0}
DOCS=${DOCS:-1}
DOC_FILE=${DOC_FILE:-$root/docs/management.md}

# shellcheck source=scripts/bench-lib.sh
. "$root/scripts/bench-lib.sh"
bench_need_python
[ "$RABBIT" = 1 ] && bench_need_rabbitmq
bench_build
command -v curl >/dev/null || { echo "bench: curl is needed"; exit 1; }

work=$(mktemp -d /tmp/bench-management.XXXXXX)
pids=""
cleanup() {
  # shellcheck disable=SC2086
  stop_all $pids
  if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ulimit -n "$(ulimit -Hn)" 2>/dev/null

taken=""
# port VAR BASE: the first free port from BASE up not handed out yet, into VAR.
port() {
  # shellcheck disable=SC2086
  printf -v "$1" '%s' "$(free_port "$2" $taken)"
  taken="$taken ${!1}"
}

machine_meta >"$work/meta.env"
echo "cmdline=$cmdline" >>"$work/meta.env"
if [ -n "${FERRY_BIN:-}" ]; then
  echo "built=FERRY_BIN, the repository at commit $(sed -n 's/^ferry_commit=//p' "$work/meta.env")" >>"$work/meta.env"
else
  echo "built=commit $(sed -n 's/^ferry_commit=//p' "$work/meta.env")" >>"$work/meta.env"
fi
echo "machine: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"

# targets: lines "name api_port all_metrics_port capped_metrics_port" (ports empty: not served).
: >"$work/targets"
# ferry_up NAME BIN: a Ferry with its queues and connections; adds it to the targets.
ferry_up() {
  local name=$1 bin=$2 mqtt http all pid
  port mqtt 28950
  port http 28950
  port all 28950
  mkdir -p "$work/$name"
  cat >"$work/$name/ferry.toml" <<EOF
[broker]
data_dir = "$work/$name/data"
log_level = "warn"

[[listeners]]
protocol = "mqtt"
bind = "127.0.0.1:$mqtt"
max_connection_rate = 0

[[listeners]]
protocol = "http"
bind = "127.0.0.1:$http"

[[listeners]]
protocol = "http"
bind = "127.0.0.1:$all"
metrics_max_queues = 20000
EOF
  "$bin" -c "$work/$name/ferry.toml" >"$work/$name/broker.log" 2>&1 &
  pid=$!
  pids="$pids $pid"
  wait_port "$http" 40 && wait_port "$mqtt" 10 || { echo "bench: $name did not start"; tail "$work/$name/broker.log"; exit 1; }
  echo "$name: $QUEUES queues..."
  make_queues "$http" "$QUEUES" "$EVERY" || exit 1
  if [ "$CONNECTIONS" -gt 0 ]; then
    "$bench_bin" idle --port "$mqtt" --connections "$CONNECTIONS" --hold 3600 --rate 0 >"$work/$name/idle.out" 2>&1 &
    pids="$pids $!"
    for _ in $(seq 300); do grep -q '^ready ' "$work/$name/idle.out" && break; sleep 0.2; done
    grep '^ready ' "$work/$name/idle.out" || { echo "bench: the idle connections did not come up"; cat "$work/$name/idle.out"; exit 1; }
  fi
  echo "$name $http $all $http" >>"$work/targets"
  echo "$name=$("$bin" --version 2>/dev/null)" >>"$work/meta.env"
}

ferry_up ferry "$ferry_bin"
[ -n "$OLD_FERRY" ] && ferry_up before "$OLD_FERRY"
if [ "$RABBIT" = 1 ]; then
  port RABBIT_PORT 28970
  port RABBIT_DIST_PORT 28970
  port rabbit_http 28970
  rabbit_start "[rabbitmq_management]" "management.tcp.port = $rabbit_http" "management.tcp.ip = 127.0.0.1"
  rabbit_wait "$rabbit_http" || exit 1
  echo "rabbitmq: $QUEUES queues (this takes a while)..."
  started=$(date +%s)
  make_queues "$rabbit_http" "$QUEUES" "$EVERY" || exit 1
  echo "rabbit_declare_secs=$(($(date +%s) - started))" >>"$work/meta.env"
  # The management plugin's statistics come every 5 s: wait until the queues' depths are in.
  sleep 6
  echo "rabbitmq $rabbit_http" >>"$work/targets"
  echo "rabbitmq=RabbitMQ $rabbit_version" >>"$work/meta.env"
fi

# Requests: label|path|listener (api, all: the uncapped /metrics listener, capped)|Ferry only.
requests=(
  "\`GET /metrics\` (default cap: 1,000 queues listed, the others counted in \`ferry_queues_omitted\`)|/metrics|capped|1"
  "\`GET /metrics\` with \`metrics_max_queues = 20000\` (all queues)|/metrics|all|1"
  "\`GET /metrics?prefix=rabbitmq\` (all queues)|/metrics?prefix=rabbitmq|all|1"
  "\`GET /api/queues\` (all)|/api/queues|api|0"
  "\`GET /api/queues?page=1&page_size=100\`|/api/queues?page=1&page_size=100|api|0"
  "\`GET /api/queues?columns=name,messages\` (all)|/api/queues?columns=name,messages|api|0"
  "\`GET /api/queues?sort=messages\` (all)|/api/queues?sort=messages|api|0"
  "\`GET /api/queues?page=1&page_size=100&sort=messages\`|/api/queues?page=1&page_size=100&sort=messages|api|0"
  "\`GET /api/queues/%2F/q.05000\`|/api/queues/%2F/q.05000|api|0"
  "\`GET /api/exchanges\`|/api/exchanges|api|0"
  "\`GET /api/bindings\` (each queue's default binding)|/api/bindings|api|0"
  "\`GET /api/connections\` ($CONNECTIONS MQTT connections)|/api/connections|api|1"
)
echo "load_timing_start=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$work/meta.env"
: >"$work/times.tsv"
for round in $(seq "$REQUESTS"); do
  for i in "${!requests[@]}"; do
    IFS='|' read -r label path listener ferry_only <<<"${requests[$i]}"
    while read -r name api all capped; do
      [ "$name" = rabbitmq ] && [ "$ferry_only" = 1 ] && continue
      case $listener in api) p=$api ;; all) p=${all:-} ;; capped) p=${capped:-} ;; esac
      [ -n "$p" ] || continue
      out=$(curl -s -o /dev/null -u guest:guest --max-time 120 -w '%{http_code} %{time_total} %{size_download}' \
        "http://127.0.0.1:$p$path")
      printf '%s\t%s\t%s\t%s\n' "$i" "$name" "$round" "$out" >>"$work/times.tsv"
    done <"$work/targets"
  done
done
echo "load_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$work/meta.env"

printf '%s\n' "${requests[@]}" >"$work/requests"
python3 - "$work" "$QUEUES" "$EVERY" "$REQUESTS" >"$work/section.md" <<'PY'
import os, statistics, sys
work, queues, every, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
meta = dict(l.rstrip("\n").split("=", 1) for l in open(os.path.join(work, "meta.env")) if "=" in l)
labels = [l.split("|")[0] for l in open(os.path.join(work, "requests")).read().splitlines()]
times, sizes, bad = {}, {}, []
for line in open(os.path.join(work, "times.tsv")):
    i, name, rnd, out = line.rstrip("\n").split("\t")
    code, t, size = (out.split() + ["", "", ""])[:3]
    if code != "200":
        bad.append(f"{name} {labels[int(i)]} round {rnd}: HTTP {code or 'no answer'}")
        continue
    times.setdefault((int(i), name), []).append(float(t) * 1000)
    sizes[(int(i), name)] = int(size)
names = [n for n in ("ferry", "before", "rabbitmq") if any(k[1] == n for k in times)]
def ms(v):
    return f"{v:.1f}" if v < 10 else f"{v:.0f}"
def cell(xs):
    return f"{ms(statistics.median(xs))} ({ms(min(xs))}–{ms(max(xs))})" if xs else "–"
def size(n):
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB" if n >= 1e3 else f"{n} B"
head = ["request", "size", "Ferry, ms: median (min–max)"]
if "before" in names:
    head += ["before, ms", "Ferry / before"]
if "rabbitmq" in names:
    head += ["RabbitMQ, ms", "RabbitMQ / Ferry"]
out = [f"{queues:,} queues (one message in every {every}th queue), made by `{meta['cmdline']}` on {meta['date']}: "
       f"a release build ({meta.get('ferry', '')}; {meta['built']}) on the {meta['nproc']}-core "
       f"development machine ({meta['cpu']}), shared with other engineers' builds and tests (load average "
       f"{meta['load_start']} at the start, {meta.get('load_timing_start')} when the timing began, "
       f"{meta['load_end']} at the end). Times from `curl -w '%{{time_total}}'` over loopback, {rounds} "
       "requests each, the targets asked in turn; ratios are of the medians.", ""]
if "before" in names:
    out[0] += f" *Before*: `OLD_FERRY` ({meta.get('before')}), the same setup, in the same run."
if "rabbitmq" in names:
    out[0] += (f" *RabbitMQ*: {meta.get('rabbitmq')} (Debian package, a private node with the management "
               f"plugin, defaults otherwise; the same queues and messages, declared through its API in "
               f"{meta.get('rabbit_declare_secs')} s).")
out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
for i, label in enumerate(labels):
    f = times.get((i, "ferry"), [])
    row = [label, size(sizes[(i, "ferry")]) if (i, "ferry") in sizes else "", cell(f)]
    if "before" in names:
        b = times.get((i, "before"), [])
        row += [cell(b), f"{statistics.median(f) / statistics.median(b):.2f}" if f and b else "–"]
    if "rabbitmq" in names:
        r = times.get((i, "rabbitmq"), [])
        row += [cell(r), f"{statistics.median(r) / statistics.median(f):.1f}" if f and r else "–"]
    out.append("| " + " | ".join(row) + " |")
if bad:
    out += ["", "Requests that failed: " + "; ".join(bad) + "."]
print("\n".join(out))
PY
cat "$work/section.md"
if [ "$DOCS" = 1 ]; then
  write_section "$DOC_FILE" bench-management "$work/section.md"
  echo "written to $DOC_FILE"
fi
