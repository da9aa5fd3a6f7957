#!/usr/bin/env bash
# Crash test for durable storage (issue 6): runs the `ferry` binary as a child process, publishes
# persistent messages with AMQP confirms (pika) and MQTT QoS 1 (paho-mqtt), SIGKILLs the broker at
# random moments, restarts it on the same data directory and checks that every confirmed message
# is still there (then one round with a clean SIGTERM shutdown). In the same rounds it bridges
# (a `[[bridges]]` out rule, QoS 1) to a second `ferry` that is never killed and checks that
# every PUBACKed bridged message reaches it at least once (issue 16). The logic, what counts as a
# failure and the environment knobs (CRASH_ROUNDS, CRASH_SEED, CRASH_NO_KILL, CRASH_TIMEOUT,
# CRASH_KEEP) are in scripts/crash_test.py.
#
# Ends with "bridge round ..." lines, a "crash-test bridge: ..." line, then one line
# "crash-test: N rounds, X confirmed, M missing, D duplicates, ..."; exits non-zero on any
# missing message (also one bridged message missing at the remote) or any round that could not
# run.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

python3 -c 'import paho.mqtt, pika' 2>/dev/null || python3 -m pip install -q paho-mqtt pika >/dev/null 2>&1 ||
  echo "warning: could not install paho-mqtt/pika"

cargo build -q -p ferry-server --bin ferry || { echo "crash-test: build failed"; exit 1; }
ferry="${CARGO_TARGET_DIR:-$root/target}/debug/ferry"

# crash_test.py has its own watchdog (CRASH_TIMEOUT, 300 s); this is the last resort.
timeout -k 10 "$(( ${CRASH_TIMEOUT:-300} + 60 ))" python3 scripts/crash_test.py "$ferry"
rc=$?
[ $rc -eq 124 ] && echo "crash-test: FAILED: timed out"
exit $rc
