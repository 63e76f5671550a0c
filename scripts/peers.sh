#!/usr/bin/env bash
# Installs the peer routers that `just compare` measures Tether against into
# their own venv, .tools/routers (ignored by git), pinned from PyPI:
# sglang-router (SGLang's model gateway) and vllm-router (vLLM's router).
# Idempotent: installs only what is missing or at another version. Prints
# the venv's bin directory.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.tools/routers"
SGLANG_ROUTER_VERSION="${SGLANG_ROUTER_VERSION:-0.3.2}"
VLLM_ROUTER_VERSION="${VLLM_ROUTER_VERSION:-0.1.17}"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
installed() { # name version -> 0 when that version is installed
  "$venv/bin/python" - "$1" "$2" <<'PY' 2>/dev/null
import importlib.metadata as m, sys
sys.exit(0 if m.version(sys.argv[1]) == sys.argv[2] else 1)
PY
}
want=()
installed sglang-router "$SGLANG_ROUTER_VERSION" || want+=("sglang-router==$SGLANG_ROUTER_VERSION")
installed vllm-router "$VLLM_ROUTER_VERSION" || want+=("vllm-router==$VLLM_ROUTER_VERSION")
if [ "${#want[@]}" -gt 0 ]; then
  echo "installing ${want[*]} into $venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${want[@]}" >&2
fi
echo "$venv/bin"
