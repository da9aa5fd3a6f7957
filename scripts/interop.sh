#!/usr/bin/env bash
# Interop: drives the `ferry` binary with third-party clients (mosquitto-clients, paho-mqtt,
# amqp-tools, pika) over loopback. Installs the clients itself when missing (apt-get, pip; CI runs as root).
#
# MQTT is driven through mosquitto_pub/mosquitto_sub and paho-mqtt (scripts/interop_mqtt.py),
# AMQP 0-9-1 through amqp-tools (librabbitmq) and pika (scripts/interop_amqp.py), and MQTT <-> AMQP
# on one broker through paho-mqtt and pika together (scripts/interop_cross.py).
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
if ! command -v mosquitto_pub >/dev/null 2>&1 || ! command -v amqp-publish >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto-clients amqp-tools) \
      >/dev/null 2>&1 || echo "warning: could not install mosquitto-clients / amqp-tools"
  fi
fi
python3 -c 'import paho.mqtt, pika' 2>/dev/null || python3 -m pip install -q paho-mqtt pika >/dev/null 2>&1 ||
  echo "warning: could not install paho-mqtt/pika"

# --- the broker -------------------------------------------------------------------------------
cargo build -q -p ferry-server --bin ferry || { echo "interop: build failed"; exit 1; }
ferry="${CARGO_TARGET_DIR:-$root/target}/debug/ferry"
work=$(mktemp -d)
log="$work/ferry.log"
pid=""
cleanup() {
  [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null
  [ -n "${KEEP_INTEROP:-}" ] && cp "$log" /tmp/interop-ferry.log; rm -rf "$work"
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

# --- MQTT: mosquitto_pub / mosquitto_sub ----------------------------------------------------
msub() { timeout 10 stdbuf -oL mosquitto_sub -h 127.0.0.1 -p 1883 "$@"; }
mpub() { timeout 10 mosquitto_pub -h 127.0.0.1 -p 1883 "$@"; }
sub_ready() { # waits until a background mosquitto_sub is subscribed (its -d log, line-buffered by stdbuf, shows SUBACK)
  local i
  for ((i = 0; i < 100; i++)); do grep -q SUBACK "$1" 2>/dev/null && return 0; sleep 0.1; done
  return 1
}
if command -v mosquitto_pub >/dev/null 2>&1; then
  for v in mqttv311 mqttv5; do
    for q in 0 1 2; do
      msub -V $v -q $q -t "interop/m/$v/$q" -C 3 -d >"$work/sub.$v.$q" 2>&1 &
      sp=$!
      sub_ready "$work/sub.$v.$q"
      for i in 1 2 3; do mpub -V $v -q $q -t "interop/m/$v/$q" -m "msg$i" -d >>"$work/pub.$v.$q" 2>&1; done
      wait $sp
      if [ "$(grep -c '^msg' "$work/sub.$v.$q")" = 3 ]; then
        ok "mosquitto_pub -> mosquitto_sub, $v QoS $q"
      else
        bad "mosquitto_pub -> mosquitto_sub, $v QoS $q: $(cat "$work/sub.$v.$q" "$work/pub.$v.$q")"
      fi
    done
  done

  mpub -t interop/ret/a -m kept -r -q 1
  got=$(msub -t 'interop/ret/+' -C 1 -v)
  [ "$got" = "interop/ret/a kept" ] && ok "mosquitto: retained message matched by a wildcard" ||
    bad "mosquitto retained: '$got'"
  mpub -t interop/ret/a -n -r -q 1
  got=$(timeout 2 mosquitto_sub -h 127.0.0.1 -p 1883 -t 'interop/ret/#' -W 1 -C 1 2>/dev/null)
  [ -z "$got" ] && ok "mosquitto: an empty retained publish clears it" || bad "mosquitto retained clear: '$got'"

  msub -t interop/will -C 1 -d >"$work/will.out" 2>&1 &
  wp=$!
  sub_ready "$work/will.out"
  stdbuf -oL mosquitto_sub -h 127.0.0.1 -p 1883 -t interop/nothing --will-topic interop/will --will-payload gone --will-qos 1 \
    -d >"$work/willer.out" 2>&1 &
  willer=$!
  sub_ready "$work/willer.out"
  kill -9 "$willer"
  wait "$wp"
  grep -q '^gone' "$work/will.out" && ok "mosquitto: the will of a killed client is published" ||
    bad "mosquitto will: $(cat "$work/will.out")"
else
  bad "mosquitto clients not installed"
fi

# --- MQTT: paho-mqtt (QoS 2, retained, wills, shared subscriptions, MQTT 5 properties) ------------
while IFS= read -r line; do
  case "$line" in
    "ok   "*) ok "${line#ok   }" ;;
    "FAIL "*) bad "${line#FAIL }" ;;
    *) echo "$line" ;;
  esac
done < <(timeout 120 python3 scripts/interop_mqtt.py 127.0.0.1 1883 2>&1)

# --- MQTT over WebSocket: a second broker from a config file with a ws listener ------------------
mkdir -p "$work/ws"
cat >"$work/ws/ferry.toml" <<'TOML'
[broker]
data_dir = "data"
[[listeners]]
protocol = "mqtt"
bind = "127.0.0.1:18831"
[[listeners]]
protocol = "mqtt"
bind = "127.0.0.1:18083"
transport = "websocket"
path = "/mqtt"
TOML
"$ferry" --config "$work/ws/ferry.toml" >"$work/ws/log" 2>&1 &
wspid=$!
if wait_port 18831 20 && wait_port 18083 20; then
  while IFS= read -r line; do
    case "$line" in
      "ok   "*"WebSocket"*) ok "${line#ok   }" ;;
      "FAIL "*"WebSocket"*) bad "${line#FAIL }" ;;
      "ok   "* | "FAIL "*) ;; # the TCP cases already ran above
      *) echo "$line" ;;
    esac
  done < <(timeout 60 python3 - 127.0.0.1 18831 18083 <<PY 2>&1
import runpy, sys
sys.path.insert(0, "scripts")
sys.argv = ["interop_mqtt.py", "127.0.0.1", "18831", "18083"]
runpy.run_path("scripts/interop_mqtt.py", run_name="__main__")
PY
)
else
  bad "ferry with a WebSocket listener starts"
  cat "$work/ws/log"
fi
kill -TERM "$wspid" 2>/dev/null
wait "$wspid" 2>/dev/null

# --- AMQP: amqp-tools (librabbitmq) ----------------------------------------------------------
if command -v amqp-publish >/dev/null 2>&1; then
  url=amqp://guest:guest@127.0.0.1:5672
  q="interop.tools.$$"
  if timeout 10 amqp-declare-queue --url "$url" -d -q "$q" >/dev/null &&
    for i in 1 2 3; do timeout 10 amqp-publish --url "$url" -r "$q" -p -C text/plain -b "tool$i" || exit 1; done; then
    got=$(timeout 10 amqp-consume --url "$url" -q "$q" -c 3 cat 2>&1)
    [ "$got" = "tool1tool2tool3" ] && ok "amqp-publish -> amqp-consume (persistent, content type)" ||
      bad "amqp-consume got '$got'"
    timeout 10 amqp-publish --url "$url" -r "$q" -b "one-more" && got=$(timeout 10 amqp-get --url "$url" -q "$q" 2>&1)
    [ "$got" = "one-more" ] && ok "amqp-get takes one message" || bad "amqp-get got '$got'"
  else
    bad "amqp-tools could not declare and publish"
  fi
else
  bad "amqp-tools not installed"
fi

# --- AMQP: pika (confirms, returns, routing, dead letters, TTL, limits, errors, tx, cancel) -------
while IFS= read -r line; do
  case "$line" in
    "ok   "*) ok "${line#ok   }" ;;
    "FAIL "*) bad "${line#FAIL }" ;;
    *) echo "$line" ;;
  esac
done < <(timeout 180 python3 scripts/interop_amqp.py 127.0.0.1 5672 2>&1)

# --- MQTT <-> AMQP on one broker: paho-mqtt and pika (properties, request/response, retained) ---
while IFS= read -r line; do
  case "$line" in
    "ok   "*) ok "${line#ok   }" ;;
    "FAIL "*) bad "${line#FAIL }" ;;
    *) echo "$line" ;;
  esac
done < <(timeout 120 python3 scripts/interop_cross.py 127.0.0.1 1883 5672 2>&1)

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
