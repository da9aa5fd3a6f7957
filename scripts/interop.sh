#!/usr/bin/env bash
# Interop: drives the `ferry` binary with third-party clients (mosquitto-clients, paho-mqtt,
# amqp-tools, pika, MQTT.js, amqplib, Celery, FastStream) over loopback. Installs the clients
# itself when missing (apt-get, pip, npm; CI runs as root).
#
# MQTT is driven through mosquitto_pub/mosquitto_sub and paho-mqtt (scripts/interop_mqtt.py),
# AMQP 0-9-1 through amqp-tools (librabbitmq) and pika (scripts/interop_amqp.py), and MQTT <-> AMQP
# on one broker through paho-mqtt and pika together (scripts/interop_cross.py). Node.js clients:
# MQTT.js over TCP and WebSocket and amqplib (scripts/interop_node.js, packages from npm kept in
# ~/.cache/ferry-interop/node); Python frameworks: Celery with the rpc:// result backend
# (scripts/interop_celery.py) and FastStream on aio-pika, whose RPC declares amq.rabbitmq.reply-to
# passively (scripts/interop_faststream.py). Users, AMQP
# permissions and client certificates as identities (cert_login) run against a broker started from
# a config file, with certificates made by the openssl CLI (scripts/interop_auth.py).
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
if ! command -v mosquitto_pub >/dev/null 2>&1 || ! command -v amqp-publish >/dev/null 2>&1 ||
  ! command -v openssl >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto-clients amqp-tools openssl) \
      >/dev/null 2>&1 || echo "warning: could not install mosquitto-clients / amqp-tools / openssl"
  fi
fi
python3 -c 'import paho.mqtt, pika' 2>/dev/null || python3 -m pip install -q paho-mqtt pika >/dev/null 2>&1 ||
  echo "warning: could not install paho-mqtt/pika"
python3 -c 'import celery, faststream.rabbit' 2>/dev/null ||
  timeout 600 python3 -m pip install -q celery 'faststream[rabbit]' >/dev/null 2>&1 ||
  echo "warning: could not install celery/faststream"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm) >/dev/null 2>&1 ||
      echo "warning: could not install nodejs / npm"
  fi
fi
node_dir="${XDG_CACHE_HOME:-$HOME/.cache}/ferry-interop/node"
if command -v npm >/dev/null 2>&1 &&
  ! { [ -d "$node_dir/node_modules/mqtt" ] && [ -d "$node_dir/node_modules/amqplib" ]; }; then
  mkdir -p "$node_dir" && (cd "$node_dir" && timeout 600 npm install --no-audit --no-fund --silent mqtt amqplib) \
    >/dev/null 2>&1 || echo "warning: could not install the npm packages mqtt / amqplib"
fi

# --- the broker -------------------------------------------------------------------------------
cargo build -q -p ferry-server --bin ferry || { echo "interop: build failed"; exit 1; }
ferry="${CARGO_TARGET_DIR:-$root/target}/debug/ferry"
work=$(mktemp -d)
log="$work/ferry.log"
pid=""
authpid=""
cleanup() {
  [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null
  [ -n "$authpid" ] && kill -9 "$authpid" 2>/dev/null
  [ -n "${KEEP_INTEROP:-}" ] && cp "$log" /tmp/interop-ferry.log; rm -rf "$work"
}
trap cleanup EXIT

# Reads "ok   ..." / "FAIL ..." lines of a case script into the tally; other lines pass through.
report() {
  local line
  while IFS= read -r line; do
    case "$line" in
      "ok   "*) ok "${line#ok   }" ;;
      "FAIL "*) bad "${line#FAIL }" ;;
      *) echo "$line" ;;
    esac
  done
}
# Runs scripts/interop_node.js with NODE_PATH set (args: MQTT URL, MQTT WebSocket URL, AMQP URL).
node_cases() {
  if command -v node >/dev/null 2>&1 && [ -d "$node_dir/node_modules/mqtt" ] && [ -d "$node_dir/node_modules/amqplib" ]; then
    NODE_PATH="$node_dir/node_modules" timeout 120 node scripts/interop_node.js "$@" 2>&1
  else
    echo "FAIL Node.js clients (MQTT.js, amqplib) installed: node $(node --version 2>&1), $node_dir"
  fi
}

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

  # $SYS (Mosquitto's tree, retained; its first round ran when the first client connected).
  got=$(msub -t '$SYS/broker/clients/connected' -C 1)
  [[ "$got" =~ ^[0-9]+$ ]] && ok "mosquitto_sub: \$SYS/broker/clients/connected is retained ($got)" ||
    bad "mosquitto_sub \$SYS/broker/clients/connected: '$got'"
  got=$(msub -t '$SYS/broker/version' -C 1)
  [[ "$got" == "ferry version "* ]] && ok "mosquitto_sub: \$SYS/broker/version is '$got'" ||
    bad "mosquitto_sub \$SYS/broker/version: '$got'"
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
  # MQTT.js over WebSocket (Ferry's default configuration has no WebSocket listener).
  report < <(node_cases "" ws://127.0.0.1:18083/mqtt "")
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

# --- Node.js: MQTT.js over TCP, amqplib (confirms, routing, errors, direct reply-to) --------------
report < <(node_cases mqtt://127.0.0.1:1883 "" amqp://guest:guest@127.0.0.1:5672)

# --- Celery (kombu / py-amqp, rpc:// results) and FastStream (aio-pika, RPC over reply-to) --------
report < <(timeout 120 python3 scripts/interop_celery.py 127.0.0.1 5672 2>&1)
report < <(timeout 120 python3 scripts/interop_faststream.py 127.0.0.1 5672 2>&1)

# --- MQTT <-> AMQP on one broker: paho-mqtt and pika (properties, request/response, retained) ---
while IFS= read -r line; do
  case "$line" in
    "ok   "*) ok "${line#ok   }" ;;
    "FAIL "*) bad "${line#FAIL }" ;;
    *) echo "$line" ;;
  esac
done < <(timeout 120 python3 scripts/interop_cross.py 127.0.0.1 1883 5672 2>&1)

# --- users, AMQP permissions, client certificates: a third broker from a config file -------------
# [[users]] (hashed by `ferry passwd`), [[permissions]] for alice and sensor-7 (none for bob), an
# [[acl]] for sensor-7, and TLS listeners with require_client_cert and cert_login = "common_name";
# a CA, a server certificate (127.0.0.1, localhost) and a client certificate CN=sensor-7 from the
# openssl CLI. The pika / paho cases are scripts/interop_auth.py.
auth="$work/auth"
mkdir -p "$auth"
mkcerts() ( # in $auth: ca.pem, server.pem/.key, client.pem/.key (CN=sensor-7)
  cd "$auth" || exit 1
  ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.pem -days 2 -subj "/CN=Ferry interop CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash"
  leaf() { # name, subject, extensions...
    local name=$1 subject=$2
    shift 2
    openssl req -new "${ec[@]}" -keyout "$name.key" -out "$name.csr" -subj "$subject"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
      "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid" "$@" >"$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -out "$name.pem" \
      -extfile "$name.ext"
  }
  leaf server "/CN=localhost" "extendedKeyUsage=serverAuth" "subjectAltName=IP:127.0.0.1,DNS:localhost"
  leaf client "/O=Ferry interop/CN=sensor-7" "extendedKeyUsage=clientAuth"
  [ -s ca.pem ] && [ -s server.pem ] && [ -s server.key ] && [ -s client.pem ] && [ -s client.key ]
)
mkconfig() { # $auth/ferry.toml; each user's password is "<name>-pw"
  printf '[broker]\ndata_dir = "data"\n'
  cat <<'TOML'
[[listeners]]
protocol = "amqp"
bind = "127.0.0.1:18672"
[[listeners]]
protocol = "amqp"
bind = "127.0.0.1:18671"
tls = { cert = "server.pem", key = "server.key", client_ca = "ca.pem", require_client_cert = true }
cert_login = "common_name"
[[listeners]]
protocol = "mqtt"
bind = "127.0.0.1:18884"
tls = { cert = "server.pem", key = "server.key", client_ca = "ca.pem", require_client_cert = true }
cert_login = "common_name"

[[permissions]]
user = "alice"
configure = "^alice\\."
write = "^(alice\\.|amq\\.default$)"
read = "^alice\\."

[[permissions]]
user = "sensor-7"
configure = "^sensor-7\\."
write = "^(sensor-7\\.|amq\\.default$)"
read = "^sensor-7\\."

[[acl]]
user = "sensor-7"
topic = "sensors/%u/#"
access = "readwrite"
TOML
  local u hash
  for u in alice bob sensor-7; do
    hash=$(printf '%s-pw\n' "$u" | "$ferry" passwd "$u" 2>/dev/null) && [ -n "$hash" ] || return 1
    printf '[[users]]\nname = "%s"\npassword_hash = "%s"\n' "$u" "$hash"
  done
}
if ! mkcerts >"$auth/openssl.log" 2>&1; then
  bad "openssl makes a CA, a server and a client certificate: $(cat "$auth/openssl.log")"
elif ! mkconfig >"$auth/ferry.toml"; then
  bad "ferry passwd hashes the passwords for [[users]]"
else
  "$ferry" --config "$auth/ferry.toml" >"$auth/log" 2>&1 &
  authpid=$!
  if wait_port 18672 20 && wait_port 18671 20 && wait_port 18884 20; then
    # amqp-tools: a refused operation is an error exit (librabbitmq reports the channel close).
    aurl=amqp://alice:alice-pw@127.0.0.1:18672
    out=$(timeout 10 amqp-declare-queue --url "$aurl" -q bob.tools 2>&1)
    rc=$?
    if [ $rc -ne 0 ] && grep -q "403.*configure access to queue 'bob.tools' in vhost '/' refused for user 'alice'" <<<"$out"; then
      ok "amqp-declare-queue refused by [[permissions]] (403) exits non-zero"
    else
      bad "amqp-declare-queue bob.tools as alice: rc=$rc out=$out"
    fi
    out=$(timeout 10 amqp-publish --url "$aurl" -e amq.direct -r alice.x -b refused 2>&1)
    rc=$?
    if [ $rc -ne 0 ] && grep -q "403.*write access to exchange 'amq.direct'" <<<"$out"; then
      ok "amqp-publish refused by [[permissions]] (403) exits non-zero"
    else
      bad "amqp-publish to amq.direct as alice: rc=$rc out=$out"
    fi

    # mosquitto over TLS with the client certificate: the user is sensor-7 (the [[acl]] grants
    # sensors/sensor-7/#), whatever user name and password the CONNECT carries.
    mtls=(-h 127.0.0.1 -p 18884 --cafile "$auth/ca.pem" --cert "$auth/client.pem" --key "$auth/client.key")
    timeout 10 stdbuf -oL mosquitto_sub "${mtls[@]}" -u mallory -P wrong -t 'sensors/sensor-7/#' -C 1 -v -d \
      >"$auth/sub.out" 2>&1 &
    sp=$!
    sub_ready "$auth/sub.out"
    timeout 10 mosquitto_pub "${mtls[@]}" -u mallory -P wrong -q 1 -t sensors/sensor-7/t -m from-cert >"$auth/pub.out" 2>&1
    wait $sp
    if grep -q '^sensors/sensor-7/t from-cert' "$auth/sub.out"; then
      ok "mosquitto over TLS, cert_login: sensor-7's publish on sensors/sensor-7/t reaches its subscriber"
    else
      bad "mosquitto cert_login: $(cat "$auth/sub.out" "$auth/pub.out")"
    fi
    out=$(timeout 10 mosquitto_pub -h 127.0.0.1 -p 18884 --cafile "$auth/ca.pem" -q 1 -t sensors/sensor-7/t -m x 2>&1)
    rc=$?
    [ $rc -ne 0 ] && ok "mosquitto over TLS without a client certificate is refused (require_client_cert)" ||
      bad "mosquitto without a client certificate: rc=$rc out=$out"

    while IFS= read -r line; do
      case "$line" in
        "ok   "*) ok "${line#ok   }" ;;
        "FAIL "*) bad "${line#FAIL }" ;;
        *) echo "$line" ;;
      esac
    done < <(timeout 60 python3 scripts/interop_auth.py 127.0.0.1 18672 18671 18884 "$auth" 2>&1)
  else
    bad "ferry with users, [[permissions]] and cert_login TLS listeners starts"
    cat "$auth/log"
  fi
  kill -TERM "$authpid" 2>/dev/null
  wait "$authpid" 2>/dev/null
  authpid=""
fi

# --- management API: RabbitMQ's rabbitmqadmin and curl against the default HTTP listener --------
# `ferry` with no file serves HTTP on 127.0.0.1:15672, where the loopback guest is an
# administrator (as RabbitMQ's). rabbitmqadmin ships in Debian's rabbitmq-server package.
if wait_port 15672 10; then
  code=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:15672/api/overview)
  [ "$code" = 401 ] && ok "management API: no credentials -> 401" || bad "management API without credentials: $code"
  # The output is captured before it is searched: with pipefail, `curl | grep -q` fails when grep
  # stops at its match and curl, still writing a large page, gets EPIPE (exit 23).
  metrics=$(curl -sS -f -u guest:guest http://127.0.0.1:15672/metrics 2>&1)
  rc=$?
  if [ $rc -eq 0 ] && grep -q '^ferry_connections{protocol="amqp"}' <<<"$metrics"; then
    ok "curl /metrics (Prometheus text)"
  else
    bad "curl /metrics: rc=$rc, ${#metrics} bytes: $(head -c 300 <<<"$metrics")"
  fi
  if command -v rabbitmqadmin >/dev/null 2>&1; then
    ra=(timeout 20 rabbitmqadmin -H 127.0.0.1 -P 15672 -u guest -p guest)
    timeout 10 stdbuf -oL mosquitto_sub -h 127.0.0.1 -p 1883 -i interop-admin -t interop/admin -d >"$work/admin.sub" 2>&1 &
    asp=$!
    sub_ready "$work/admin.sub"
    out=$("${ra[@]}" list connections 2>&1)
    rc=$?
    [ $rc -eq 0 ] && grep -q '127.0.0.1:[0-9]* -> 127.0.0.1:1883 | anonymous' <<<"$out" &&
      ok "rabbitmqadmin list connections shows the MQTT client" || bad "rabbitmqadmin list connections: rc=$rc $out"
    kill "$asp" 2>/dev/null
    wait "$asp" 2>/dev/null
    if command -v amqp-declare-queue >/dev/null 2>&1; then
      timeout 10 amqp-declare-queue --url amqp://guest:guest@127.0.0.1:5672 -q interop.admin >/dev/null &&
        timeout 10 amqp-publish --url amqp://guest:guest@127.0.0.1:5672 -r interop.admin -b one
    fi
    out=$("${ra[@]}" list queues 2>&1)
    rc=$?
    [ $rc -eq 0 ] && grep -Eq '\| interop.admin +\| 1 ' <<<"$out" && ok "rabbitmqadmin list queues" ||
      bad "rabbitmqadmin list queues: rc=$rc $out"
    # Each step's output is kept for the failure line (this case failed once in CI, 2026-12-06,
    # and passed on every rerun; the next failure should say which step and what it printed).
    declared=$("${ra[@]}" declare queue name=interop.declared durable=false 2>&1) &&
      listed=$("${ra[@]}" list queues name durable 2>&1) && grep -Eq '\| interop.declared +\| False ' <<<"$listed" &&
      deleted=$("${ra[@]}" delete queue name=interop.declared 2>&1) &&
      after=$("${ra[@]}" list queues name 2>&1) && ! grep -q 'interop.declared' <<<"$after"
    if [ $? -eq 0 ]; then
      ok "rabbitmqadmin declare queue, delete queue"
    else
      bad "rabbitmqadmin declare / delete queue: declare: ${declared:-} | list: ${listed:-} | delete: ${deleted:-} | list after: ${after:-}"
    fi
    out=$("${ra[@]}" show overview 2>&1)
    rc=$?
    [ $rc -eq 0 ] && grep -q 'rabbitmq_version' <<<"$out" && grep -q 'ferry@' <<<"$out" &&
      ok "rabbitmqadmin show overview" || bad "rabbitmqadmin show overview: rc=$rc $out"
    # publish and get through the API: via the default exchange into a queue, and via amq.topic to
    # an MQTT subscriber under the topic mapping (interop.api -> interop/api)
    if "${ra[@]}" declare queue name=interop.msgs durable=false >/dev/null 2>&1; then
      out=$("${ra[@]}" publish routing_key=interop.msgs payload=hello-from-rabbitmqadmin 2>&1)
      rc=$?
      [ $rc -eq 0 ] && grep -q 'Message published' <<<"$out" && ! grep -q 'NOT routed' <<<"$out" &&
        ok "rabbitmqadmin publish (routed)" || bad "rabbitmqadmin publish: rc=$rc $out"
      out=$("${ra[@]}" get queue=interop.msgs count=1 ackmode=ack_requeue_true 2>&1)
      rc=$?
      [ $rc -eq 0 ] && grep -q 'hello-from-rabbitmqadmin' <<<"$out" &&
        ok "rabbitmqadmin get (requeued)" || bad "rabbitmqadmin get: rc=$rc $out"
      out=$("${ra[@]}" get queue=interop.msgs count=5 ackmode=ack_requeue_false 2>&1)
      rc=$?
      listed=$("${ra[@]}" list queues name messages 2>&1)
      [ $rc -eq 0 ] && grep -q 'hello-from-rabbitmqadmin' <<<"$out" && grep -q 'True' <<<"$out" &&
        grep -Eq '\| interop.msgs +\| 0 ' <<<"$listed" &&
        ok "rabbitmqadmin get (redelivered, acknowledged)" || bad "rabbitmqadmin get ack: rc=$rc $out | list: $listed"
      "${ra[@]}" delete queue name=interop.msgs >/dev/null 2>&1
    else
      bad "rabbitmqadmin declare queue interop.msgs"
    fi
    timeout 10 stdbuf -oL mosquitto_sub -h 127.0.0.1 -p 1883 -i interop-api -t interop/api -C 1 -d >"$work/api.sub" 2>&1 &
    asp=$!
    sub_ready "$work/api.sub"
    out=$("${ra[@]}" publish exchange=amq.topic routing_key=interop.api payload=from-the-api 2>&1)
    wait "$asp" 2>/dev/null
    grep -q 'from-the-api' "$work/api.sub" && ! grep -q 'NOT routed' <<<"$out" &&
      ok "rabbitmqadmin publish reaches an MQTT subscriber (interop/api)" ||
      bad "rabbitmqadmin publish to MQTT: $out $(cat "$work/api.sub")"
    # A dynamic shovel (RabbitMQ's shovel parameter) from a local queue to this same broker over
    # AMQP: out through the shovel's client, in through the AMQP listener.
    value='{"src-uri": "amqp://", "src-queue": "interop.shovel.src", "dest-uri": "amqp://guest:guest@127.0.0.1:5672/%2f", "dest-queue": "interop.shovel.dest", "ack-mode": "on-confirm"}'
    if "${ra[@]}" declare queue name=interop.shovel.dest durable=true >/dev/null 2>&1 &&
      out=$("${ra[@]}" declare parameter component=shovel name=interop-shovel value="$value" 2>&1) &&
      grep -q 'parameter declared' <<<"$out"; then
      ok "rabbitmqadmin declare parameter component=shovel"
      "${ra[@]}" publish routing_key=interop.shovel.src payload=shovelled-by-ferry >/dev/null 2>&1
      got=""
      for ((i = 0; i < 50; i++)); do
        got=$("${ra[@]}" get queue=interop.shovel.dest count=1 ackmode=ack_requeue_false 2>&1)
        grep -q 'shovelled-by-ferry' <<<"$got" && break
        sleep 0.1
      done
      grep -q 'shovelled-by-ferry' <<<"$got" && ok "the dynamic shovel moves a message" ||
        bad "the dynamic shovel did not move the message: $got"
      out=$("${ra[@]}" list parameters 2>&1)
      grep -q 'interop-shovel' <<<"$out" && grep -q 'interop.shovel.dest' <<<"$out" &&
        ok "rabbitmqadmin list parameters" || bad "rabbitmqadmin list parameters: $out"
      out=$(curl -s -u guest:guest http://127.0.0.1:15672/api/shovels)
      grep -q '"type":"dynamic"' <<<"$out" && ! grep -q 'guest:guest' <<<"$out" &&
        ok "/api/shovels lists it dynamic, without the password" || bad "/api/shovels: $out"
      out=$("${ra[@]}" delete parameter component=shovel name=interop-shovel 2>&1)
      listed=$("${ra[@]}" list parameters 2>&1)
      grep -q 'parameter deleted' <<<"$out" && ! grep -q 'interop-shovel' <<<"$listed" &&
        ok "rabbitmqadmin delete parameter" || bad "rabbitmqadmin delete parameter: $out"
    else
      bad "rabbitmqadmin declare parameter component=shovel: $out"
    fi
    "${ra[@]}" delete queue name=interop.shovel.dest >/dev/null 2>&1
    "${ra[@]}" delete queue name=interop.shovel.src >/dev/null 2>&1
  else
    echo "SKIPPED rabbitmqadmin (install rabbitmq-server for it)"
  fi
  # ferry ctl: the same API through Ferry's own CLI (the loopback guest by default).
  fc=(timeout 20 "$ferry" ctl)
  if command -v amqp-declare-queue >/dev/null 2>&1; then
    timeout 10 amqp-declare-queue --url amqp://guest:guest@127.0.0.1:5672 -q interop.ctl >/dev/null &&
      timeout 10 amqp-publish --url amqp://guest:guest@127.0.0.1:5672 -r interop.ctl -b one
    out=$("${fc[@]}" list queues 2>&1)
    rc=$?
    [ $rc -eq 0 ] && grep -Eq '\| interop.ctl +\| 1 ' <<<"$out" && ok "ferry ctl list queues" ||
      bad "ferry ctl list queues: rc=$rc $out"
    if "${fc[@]}" purge queue interop.ctl >/dev/null 2>&1 &&
      "${fc[@]}" -f json list queues 2>/dev/null | python3 -c 'import json, sys
q = [x for x in json.load(sys.stdin) if x["name"] == "interop.ctl"]
sys.exit(0 if q and q[0]["messages"] == 0 else 1)' &&
      "${fc[@]}" delete queue interop.ctl >/dev/null 2>&1 &&
      listed=$("${fc[@]}" list queues 2>&1) && ! grep -q 'interop.ctl' <<<"$listed"; then
      ok "ferry ctl purge queue, list queues as JSON, delete queue"
    else
      bad "ferry ctl purge / delete queue"
    fi
  fi
  out=$("${fc[@]}" --user guest --password wrong list queues 2>&1)
  rc=$?
  [ $rc -eq 1 ] && grep -q 'login refused for user "guest"' <<<"$out" && ok "ferry ctl: a wrong password exits 1" ||
    bad "ferry ctl with a wrong password: rc=$rc $out"
else
  bad "ferry with no arguments serves HTTP on 15672"
fi

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
