#!/usr/bin/env bash
# Eclipse Mosquitto's raw-packet broker tests (../shared/peer-suites/mosquitto, issue 14) against
# a release `ferry`: builds it, starts it on a scratch data dir and a free loopback port, runs the
# suite, stops it, prints the deviations Ferry keeps on purpose (docs/conformance.md) and fails
# when fewer tests pass than MOSQUITTO_MIN_PASS.
#
#   bash scripts/mosquitto-suite.sh                  # the whole suite (about 2 minutes)
#   TESTS="04-retain-qos0.py" bash scripts/mosquitto-suite.sh
#
# Environment: MOSQUITTO_SUITE (the suite's folder; default <repo>/../shared/peer-suites/mosquitto),
# MOSQUITTO_MIN_PASS (default below), FERRY (a ferry binary to use instead of building one),
# LOGDIR (keep the per-test logs and the broker's log there), TESTS (run just these).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

# What this tree reaches (issue 14 asks for at least 92 of 99): 90; the 9 others are kept
# choices, listed with their reasons in docs/conformance.md (two of them, 07-will-delay and
# 07-will-delay-reconnect, assert a will delay outliving a session that has ended).
min_pass=${MOSQUITTO_MIN_PASS:-93}
suite=${MOSQUITTO_SUITE:-$(dirname "$root")/shared/peer-suites/mosquitto}
if [ ! -x "$suite/run.sh" ]; then
  echo "mosquitto-suite: FAILED: the suite is missing: $suite/run.sh (CI expects shared/ beside the clone;" \
    "set MOSQUITTO_SUITE to its folder)"
  exit 1
fi
command -v python3 >/dev/null || { echo "mosquitto-suite: FAILED: python3 is needed"; exit 1; }

if [ -z "${FERRY:-}" ]; then
  cargo build -q --release -p ferry-server --bin ferry || { echo "mosquitto-suite: build failed"; exit 1; }
  FERRY="${CARGO_TARGET_DIR:-$root/target}/release/ferry"
fi

work=$(mktemp -d /tmp/ferry-mosquitto.XXXXXX)
logdir=${LOGDIR:-$work/logs}
mkdir -p "$logdir"
pid=""
cleanup() {
  if [ -n "$pid" ]; then
    kill -TERM "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  fi
  rm -rf "$work/data"
  [ -n "${LOGDIR:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

# A free port: ask the kernel for one, then hand it to ferry (a tiny race, fine on a CI box).
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$work/ferry.toml" <<TOML
[broker]
data_dir = "$work/data"

[[listeners]]
protocol = "mqtt"
bind = "127.0.0.1:$port"
TOML

"$FERRY" --config "$work/ferry.toml" >"$logdir/ferry.log" 2>&1 &
pid=$!
up=0
for _ in $(seq 1 200); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then up=1; break; fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
if [ "$up" != 1 ]; then
  echo "mosquitto-suite: FAILED: ferry did not listen on 127.0.0.1:$port"
  cat "$logdir/ferry.log"
  exit 1
fi

out="$work/suite.out"
LOGDIR="$logdir" bash "$suite/run.sh" 127.0.0.1 "$port" | tee "$out"
last=$(tail -n 1 "$out")
passed=$(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\1/p' <<<"$last")
failed=$(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\2/p' <<<"$last")
if ! kill -0 "$pid" 2>/dev/null; then
  echo "mosquitto-suite: FAILED: ferry is no longer running (crashed?); its log:"
  tail -n 50 "$logdir/ferry.log"
  exit 1
fi

echo
echo "--- what Ferry keeps on purpose (docs/conformance.md) ---"
sed -n '/^<!-- kept:begin -->$/,/^<!-- kept:end -->$/p' docs/conformance.md | sed '1d;$d'
echo

if [ -z "$passed" ]; then
  echo "mosquitto-suite: FAILED: no result line from the suite"
  exit 1
fi
if [ -n "${TESTS:-}" ]; then
  echo "mosquitto-suite: $passed passed, $failed failed (a subset: TESTS=$TESTS)"
  [ "$failed" -eq 0 ]
  exit
fi
if [ "$passed" -lt "$min_pass" ]; then
  echo "mosquitto-suite: FAILED: $passed passed, $failed failed; at least $min_pass must pass"
  exit 1
fi
echo "mosquitto-suite: $passed passed, $failed failed (at least $min_pass must pass)"
