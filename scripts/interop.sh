#!/usr/bin/env bash
# Interop: drives the `ferry` binary with third-party clients (mosquitto-clients, paho-mqtt,
# pika) over loopback. Installs the clients itself when missing (apt-get, pip; CI runs as root).
#
# Until the MQTT and AMQP frontends land, Ferry's embedded default listeners answer every client
# with the protocol's own "not available" reply; the cases below check that real clients see
# exactly that, plus the binary's start-up and shutdown behaviour. Each frontend issue adds its
# cases here.
#
# Ends with one line "interop: N passed, N failed"; exits non-zero if any case failed.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

pass=0
fail=0
ok() { pass=$((pass + 1)); printf 'ok   %s\n' "$*"; }
bad() { fail=$((fail + 1)); printf 'FAIL %s\n' "$*"; }

# --- clients ----------------------------------------------------------------------------------
if ! command -v mosquitto_pub >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto-clients) >/dev/null 2>&1 ||
      echo "warning: could not install mosquitto-clients"
  fi
fi
python3 -c 'import paho.mqtt, pika' 2>/dev/null || python3 -m pip install -q paho-mqtt pika >/dev/null 2>&1 ||
  echo "warning: could not install paho-mqtt/pika"

# --- the broker -------------------------------------------------------------------------------
cargo build -q -p ferry-server --bin ferry || { echo "interop: build failed"; exit 1; }
ferry="$root/target/debug/ferry"
work=$(mktemp -d)
log="$work/ferry.log"
pid=""
cleanup() {
  [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

wait_port() { # port, seconds
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

(cd "$work" && exec "$ferry" --log-level info) >"$log" 2>&1 &
pid=$!
if wait_port 1883 20 && wait_port 5672 20; then
  ok "ferry with no arguments listens on 1883 and 5672"
else
  bad "ferry with no arguments listens on 1883 and 5672"
  cat "$log"
fi
[ -d "$work/ferry-data" ] && ok "ferry creates ./ferry-data" || bad "ferry creates ./ferry-data"

# --- MQTT: mosquitto_pub and paho-mqtt see 'server unavailable' --------------------------------
if command -v mosquitto_pub >/dev/null 2>&1; then
  out=$(timeout 10 mosquitto_pub -h 127.0.0.1 -p 1883 -t interop/t -m x 2>&1)
  rc=$?
  if [ $rc -ne 0 ] && grep -qi 'unavailable' <<<"$out"; then
    ok "mosquitto_pub is refused with 'server unavailable' until the MQTT frontend exists"
  else
    bad "mosquitto_pub: rc=$rc out=$out"
  fi
else
  bad "mosquitto_pub not installed"
fi

python3 - <<'PY' && ok "paho-mqtt gets CONNACK return code 3" || bad "paho-mqtt gets CONNACK return code 3"
import sys, threading
import paho.mqtt.client as mqtt
done = threading.Event()
result = {}
def on_connect(client, userdata, flags, rc, *args):
    result["rc"] = int(rc.value if hasattr(rc, "value") else rc)
    done.set()
try:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION1, client_id="interop", protocol=mqtt.MQTTv311)
except AttributeError:
    c = mqtt.Client(client_id="interop", protocol=mqtt.MQTTv311)
c.on_connect = on_connect
c.connect("127.0.0.1", 1883, keepalive=10)
c.loop_start()
done.wait(10)
c.loop_stop()
print("paho rc:", result.get("rc"))
sys.exit(0 if result.get("rc") == 3 else 1)
PY

# --- AMQP: pika sees the protocol header answer ------------------------------------------------
python3 - <<'PY' && ok "pika is refused with a protocol-header answer" || bad "pika is refused with a protocol-header answer"
import sys
import pika
from pika import exceptions as ex
try:
    pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672, socket_timeout=5, connection_attempts=1))
except (ex.IncompatibleProtocolError, ex.AMQPConnectionError, ex.StreamLostError) as e:
    print("pika:", type(e).__name__, e)
    sys.exit(0)
print("pika connected, which should not happen yet")
sys.exit(1)
PY

# --- configuration errors -----------------------------------------------------------------------
printf '[broker]\ndata_dir = "d"\ncolour = "blue"\n[[listeners]]\nprotocol = "mqtt"\nbind = "127.0.0.1:1"\n' >"$work/bad.toml"
out=$("$ferry" check-config "$work/bad.toml" 2>&1)
rc=$?
if [ $rc -ne 0 ] && grep -q 'colour' <<<"$out"; then ok "check-config names an unknown key"; else bad "check-config: rc=$rc out=$out"; fi

# --- graceful shutdown ------------------------------------------------------------------------
kill -TERM "$pid"
for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$pid" 2>/dev/null; then
  bad "ferry exits on SIGTERM within 15 s"
else
  wait "$pid"
  rc=$?
  pid=""
  [ $rc -eq 0 ] && ok "ferry exits 0 on SIGTERM" || bad "ferry exit status on SIGTERM: $rc"
fi

echo "interop: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
