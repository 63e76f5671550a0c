#!/usr/bin/env bash
# Runs the whole system locally: nats-server (JetStream on), four engine-sims,
# session-state, scheduler and ingress, all on loopback. Waits until each is
# ready, prints where they are, and on Ctrl-C stops every process it started.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
nats_server="$("$root/scripts/tools.sh")"
bin="$root/target/release"
run="$root/.run"
mkdir -p "$run/logs"
NATS_PORT="${NATS_PORT:-4222}"
INGRESS="${TETHER_LISTEN:-127.0.0.1:8080}"
export TETHER_NATS_URL="nats://127.0.0.1:$NATS_PORT"
export TETHER_FLEET="${TETHER_FLEET:-$root/deploy/local/fleet.toml}"
export RUST_LOG="${RUST_LOG:-info}"

pids=()
stopping=0
cleanup() {
  stopping=1
  trap - INT TERM EXIT
  echo; echo "stopping..."
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped."
}
trap cleanup INT TERM EXIT

start() { # name, command...
  local name="$1"; shift
  "$@" >"$run/logs/$name.log" 2>&1 &
  pids+=("$!")
}

wait_http() { # name, url
  for _ in $(seq 1 200); do
    if curl -fsS -o /dev/null "$2" 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "$1 did not become ready at $2; see $run/logs/$1.log" >&2
  exit 1
}

start nats "$nats_server" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$run/jetstream"
for i in $(seq 1 60); do (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && break; sleep 0.05; done

for i in 1 2 3 4; do
  start "sim-$i" "$bin/tether-engine-sim" --listen "127.0.0.1:810$i" --name "sim-$i" --models tether-sim
done
for i in 1 2 3 4; do wait_http "sim-$i" "http://127.0.0.1:810$i/health"; done

start session-state "$bin/tether-session-state" --admin-listen 127.0.0.1:9102
wait_http session-state http://127.0.0.1:9102/ready
start scheduler "$bin/tether-scheduler" --admin-listen 127.0.0.1:9103
wait_http scheduler http://127.0.0.1:9103/ready
start ingress "$bin/tether-ingress" --listen "$INGRESS"
wait_http ingress "http://$INGRESS/ready"

cat <<MSG

Tether is up.
  ingress         http://$INGRESS   (OpenAI API, /metrics)
  scheduler       http://127.0.0.1:9103/metrics
  session-state   http://127.0.0.1:9102/metrics
  engines         http://127.0.0.1:8101 .. 8104 (engine-sim)
  nats            nats://127.0.0.1:$NATS_PORT
  logs            $run/logs/

Try:
  curl -si http://$INGRESS/v1/chat/completions \\
    -H 'content-type: application/json' -H 'x-session-id: demo' \\
    -d '{"model":"tether-sim","max_tokens":16,"messages":[{"role":"user","content":"Hello!"}]}'
  curl -s http://$INGRESS/v1/tether/sessions/demo

Ctrl-C stops everything.
MSG
wait -n "${pids[@]}" || true
if [ "$stopping" = 0 ]; then echo "a process exited; see $run/logs/" >&2; fi
