#!/usr/bin/env python3
"""Load sweep: Tether against peer routers on the same fleet.

Regenerates docs/results/comparison.md, its SVG plots and comparison.json.

For every workload (the Mooncake trace as closed-loop chat; agent programs)
and every load level, each system runs on a fresh fleet of four engine-sims
(fresh caches, fresh router), driven by tether-loadgen, `--repeats` times.
Systems: Tether under each scheduler strategy, sglang-router and vllm-router
(installed by scripts/peers.sh into .tools/routers). All engines run FCFS
and Tether's fleet file says `priority = false`: every system gets the same
engines. Simulated time runs `--time-scale` times faster than wall time in
the engines, the replayer and Tether's gateway alike.

Usage: scripts/compare.py [--quick] [--repeats N] [--time-scale F] [--systems a,b]
                          [--chat-speedups ...] [--agent-rates ...] [--out DIR]
                          [--report-only] [--dry-run]
The full sweep (the seven REPORT_SYSTEMS x 4 chat and 5 agent levels x 2
repeats, plus the overload variants: ~136 runs at time scale 4) takes about
41 minutes on 2 cores; --quick a few. Time scale 4 is what a 2-core machine
keeps up with (watch the engines' lag and the load generator's send lag in
the report). The systems, the overload variants and the agent workload are
listed at the top of this file.
(`just compare [ARGS]` installs the peers, builds, and runs it).
"""
import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
OUT = ROOT / "docs" / "results"
ROUTERS = ROOT / ".tools" / "routers" / "bin"

# =====================================================================
# What is compared. Edit here.
# =====================================================================
# A system: name -> how to run it. Tether systems: scheduler --strategy plus
# extra scheduler / ingress arguments. Peers: the router and its --policy.
SYSTEMS = {
    "tether": {"kind": "tether", "strategy": "tether"},
    "cache-aware": {"kind": "tether", "strategy": "cache-aware", "ingress_args": ["--stage-calls", "0"]},
    "tether-g1": {"kind": "tether", "strategy": "tether", "ingress_args": ["--queue-size-ratio", "1"]},
    "tether-g2": {"kind": "tether", "strategy": "tether", "ingress_args": ["--queue-size-ratio", "2"]},
    "tether-fcfs": {"kind": "tether", "strategy": "tether", "scheduler_args": ["--ordering", "fcfs"]},
    "tether-g2-fcfs": {"kind": "tether", "strategy": "tether", "scheduler_args": ["--ordering", "fcfs"],
                       "ingress_args": ["--queue-size-ratio", "2"]},
    "tether-unstaged": {"kind": "tether", "strategy": "tether", "ingress_args": ["--stage-calls", "0"]},
    "tether-unbalanced": {"kind": "tether", "strategy": "tether", "ingress_args": ["--decode-balance", "0"]},
    "tether-staged": {"kind": "tether", "strategy": "tether", "ingress_args": ["--stage-calls", "8"]},
    "tether-staged-g4": {"kind": "tether", "strategy": "tether", "ingress_args": ["--stage-calls", "8", "--queue-size-ratio", "4"]},
    # The engines' own KV cache events: engine-sims publish them (vLLM's
    # format, ZMQ), tether-kv-events relays them onto NATS, the scheduler
    # places by its exact index, and route requests carry engine-sim's own
    # token-block hashes.
    "tether-kv": {"kind": "tether", "strategy": "tether", "kv_events": True,
                  "scheduler_args": ["--prefix-source", "exact"], "ingress_args": ["--block-hashes", "engine-sim"]},
    "least-loaded": {"kind": "tether", "strategy": "least-loaded"},
    "round-robin": {"kind": "tether", "strategy": "round-robin"},
    "session-hash": {"kind": "tether", "strategy": "session-hash"},
    "sglang-router cache_aware": {"kind": "sglang-router", "policy": "cache_aware"},
    "vllm-router cache_aware": {"kind": "vllm-router", "policy": "cache_aware"},
    "vllm-router consistent_hash": {"kind": "vllm-router", "policy": "consistent_hash"},
}
# The full sweep (no --systems) runs these: the default, the default with
# decode balance off (the previous default), with staging off (the one
# before), and every baseline.
REPORT_SYSTEMS = ["tether", "tether-unbalanced", "tether-unstaged", "cache-aware", "sglang-router cache_aware",
                  "vllm-router cache_aware", "vllm-router consistent_hash"]
# --quick runs these only.
QUICK_SYSTEMS = ["tether", "cache-aware", "sglang-router cache_aware", "vllm-router consistent_hash"]
# The "never loses" target compares the default against the best of these.
BASELINES = ["cache-aware", "sglang-router cache_aware", "vllm-router cache_aware", "vllm-router consistent_hash"]
# The peer routers (the agent capacity and heaviest-level targets).
PEERS = ["sglang-router cache_aware", "vllm-router cache_aware", "vllm-router consistent_hash"]
DEFAULT = "tether"

# >>> OVERLOAD VARIANTS: Tether's default against itself with gateway ordering
# off, at each workload's heaviest level. Extra arguments are passed through
# as they are (flag names are still being settled: edit them here). A variant
# whose flags the binary's --help does not list is skipped with a warning.
# The first entry must be the default (it reuses the sweep's runs).
OVERLOAD_VARIANTS = [
    {"name": "tether", "scheduler_args": [], "ingress_args": []},
    {"name": "tether, FCFS ordering", "scheduler_args": ["--ordering", "fcfs"], "ingress_args": []},
    {"name": "tether, due order γ=2", "scheduler_args": [], "ingress_args": ["--queue-size-ratio", "2"]},
]

# <<< OVERLOAD VARIANTS

# Extra arguments for every Tether run (scheduler, ingress).
TETHER_SCHEDULER_ARGS = []
TETHER_INGRESS_ARGS = []

# Headers carrying the session id. Agents also send x-claude-code-session-id,
# the header by which tether-ingress (--program-headers) tells agent
# programs from chats; peers receive the same headers and ignore it.
CHAT_EXTRA_HEADERS = []
AGENT_EXTRA_HEADERS = ["x-claude-code-session-id"]

# The agent workload (tether-loadgen agent; docs/loadgen.md). --sessions and
# --rate are set per run.
AGENT_FLAGS = json.loads(os.environ["TETHER_COMPARE_AGENT_FLAGS"]) if os.environ.get("TETHER_COMPARE_AGENT_FLAGS") else ["--steps", "12", "--step-alpha", "1.0", "--fanout", "4", "--fanout-min", "1",
               "--tool-pause-secs", "1.5", "--tool-pause-max-secs", "6",
               "--system-prompts", "4", "--system-prompt-words", "2000",
               "--prompt-min", "50", "--prompt-max", "300", "--answer-min", "16", "--answer-max", "160",
               "--seed", "7"]
# =====================================================================

ENGINES = 4
MIN_SCRAPE_MS = 50
MODEL = "tether-sim"
SLO_FACTOR = 2.0           # capacity at SLO: mean session completion within 2x unloaded
NEVER_LOSES = 1.05


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url, timeout=1.0, body=None, headers=None):
    req = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status == 200
    except Exception:
        return False


def wait_until(pred, what, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not become ready in {timeout:.0f} s")


def help_text(binary):
    try:
        return subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=20).stdout
    except Exception:
        return ""


def flags_missing(args, help_out):
    return [a for a in args if a.startswith("--") and a.split("=")[0] not in help_out]


def exit_on_sigterm():
    """Turns SIGTERM (a `kill`, a CI timeout) into SystemExit, so that the
    `with` blocks and `finally` clauses that stop started processes run."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


class Procs:
    """Processes started for one measurement, each logging to its own file
    in `log_dir`; `stop` ends them all (terminate, then kill)."""

    def __init__(self, log_dir):
        self.procs, self.log_dir = [], log_dir

    def spawn(self, name, args, env=None):
        log = open(self.log_dir / f"{name}.log", "w")
        e = dict(os.environ, RUST_LOG="warn", **(env or {}))
        self.procs.append(subprocess.Popen([str(a) for a in args], stdout=log, stderr=subprocess.STDOUT, env=e))

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Stack:
    """Four engine-sims and one router in front of them: Tether (NATS,
    session-state, scheduler, ingress) or a peer router."""

    def __init__(self, system, scale, log_dir, ingress_time_scale):
        self.sys, self.scale = system, scale
        self.procs = Procs(log_dir)
        self.spawn = self.procs.spawn
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="tether-compare-"))
        self.ingress_time_scale = ingress_time_scale

    def __enter__(self):
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

    def _start(self):
        self.engine_urls = []
        fleet = []
        kv = self.sys.get("kv_events", False)
        for i in range(ENGINES):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            kv_args, kv_fleet = [], ""
            if kv:
                pub, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
                kv_args = ["--kv-events-endpoint", pub, "--kv-events-replay-endpoint", replay]
                kv_fleet = f'kv_events = "{pub}"\nkv_replay = "{replay}"\n'
            self.spawn(f"sim-{i}", [BIN / "tether-engine-sim", "--listen", f"127.0.0.1:{port}", "--name", f"sim-{i}",
                                    "--time-scale", self.scale, "--max-model-len", "262144",
                                    "--scheduling-policy", "fcfs"] + kv_args)
            self.engine_urls.append(url)
            fleet.append(f'[[engines]]\nname = "sim-{i}"\nurl = "{url}"\nmodels = ["{MODEL}"]\n'
                         'priority = false\ncache_tokens = 400000\n' + kv_fleet)
        (self.tmp / "fleet.toml").write_text("\n".join(fleet))
        for url in self.engine_urls:
            wait_until(lambda: http_ok(url + "/health"), url)
        kind = self.sys["kind"]
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        if kind == "sglang-router":
            self.spawn("router", [ROUTERS / "python", "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
                                  "--port", port, "--worker-urls", *self.engine_urls, "--policy", self.sys["policy"],
                                  "--prometheus-port", free_port(), "--log-level", "warn",
                                  "--shutdown-grace-period-secs", "1"])
        elif kind == "vllm-router":
            self.spawn("router", [ROUTERS / "vllm-router", "--host", "127.0.0.1", "--port", port,
                                  "--worker-urls", *self.engine_urls, "--policy", self.sys["policy"],
                                  "--prometheus-port", free_port(), "--log-level", "warning"])
        else:
            nats_port = free_port()
            nats = os.environ.get("TETHER_NATS_SERVER") or str(ROOT / ".tools" / "venv" / "bin" / "nats-server")
            self.spawn("nats", [nats, "-a", "127.0.0.1", "-p", nats_port, "-js", "-sd", self.tmp / "js"])
            env = {"TETHER_NATS_URL": f"nats://127.0.0.1:{nats_port}", "TETHER_FLEET": str(self.tmp / "fleet.toml")}
            ss, sc = free_port(), free_port()
            self.spawn("session-state", [BIN / "tether-session-state", "--admin-listen", f"127.0.0.1:{ss}"], env)
            wait_until(lambda: http_ok(f"http://127.0.0.1:{ss}/ready"), "session-state")
            if kv:
                kp = free_port()
                self.spawn("kv-events", [BIN / "tether-kv-events", "--admin-listen", f"127.0.0.1:{kp}"], env)
                wait_until(lambda: http_ok(f"http://127.0.0.1:{kp}/ready"), "kv-events")
            # Tether's engine scrapes (scheduler load, ingress health and
            # capacity) run every 100 ms of simulated time, but never more
            # often than MIN_SCRAPE_MS of wall time: at 10 ms and time scale
            # 10 the three loops sent ~1,200 requests/s to four engine-sims,
            # and the CPU they took slowed every Tether strategy on this
            # 2-core machine (agent at 10/s: mean session 23.6 s; 16-18 s at
            # 50 ms). The price: Tether's control loops see the engines
            # every 0.5 simulated seconds at time scale 10.
            scrape = max(MIN_SCRAPE_MS, int(100 / self.scale))
            self.spawn("scheduler", [BIN / "tether-scheduler", "--admin-listen", f"127.0.0.1:{sc}",
                                     "--strategy", self.sys["strategy"], "--scrape-interval-ms", scrape]
                       + TETHER_SCHEDULER_ARGS + self.sys.get("scheduler_args", []), env)
            wait_until(lambda: http_ok(f"http://127.0.0.1:{sc}/ready"), "scheduler")
            ingress = [BIN / "tether-ingress", "--listen", f"127.0.0.1:{port}", "--health-interval-ms", scrape,
                       "--route-timeout-ms", "200"]
            if self.ingress_time_scale:
                # The gateway's waiting bounds and its capacity control's
                # engine scrape run on simulated time too.
                ingress += ["--time-scale", self.scale, "--capacity-interval-ms", scrape]
            self.spawn("ingress", ingress + TETHER_INGRESS_ARGS + self.sys.get("ingress_args", []), env)
            wait_until(lambda: http_ok(self.url + "/ready"), "ingress")
        # Ready when a real (one-token) call goes through: a router may list
        # its workers before it can route to them.
        probe = json.dumps({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "ready?"}]}).encode()
        wait_until(lambda: http_ok(self.url + "/v1/chat/completions", 5.0, probe,
                                   {"content-type": "application/json", "x-session-id": "compare-probe"}),
                   f"{kind} at {self.url}", timeout=90)
        return self

    def engine_lag(self):
        """The largest value of any engine metric named like `*lag*` (none
        when the engines do not expose one)."""
        best = None
        for url in self.engine_urls:
            try:
                with urllib.request.urlopen(url + "/metrics", timeout=2) as r:
                    text = r.read().decode()
            except Exception:
                continue
            for line in text.splitlines():
                if line.startswith("#") or "lag" not in line.split("{")[0].split(" ")[0]:
                    continue
                try:
                    v = float(line.rsplit(" ", 1)[1])
                except ValueError:
                    continue
                best = v if best is None else max(best, v)
        return best

    def __exit__(self, *exc):
        self.procs.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


KEEP = ["label", "calls", "errors", "sessions", "sessions_complete", "ttft", "tpot", "e2e", "session_completion",
        "duration", "calls_per_s", "output_tokens_per_s", "prompt_tokens", "cached_tokens", "cache_hit_rate",
        "send_lag", "send_lag_max", "error_samples", "time_scale"]


def run_one(system, workload_args, scale, run_dir, ingress_time_scale, wall_limit):
    """One fresh fleet + router, one loadgen run; the trimmed summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with Stack(system, scale, run_dir, ingress_time_scale) as s:
        started = time.time()
        args = [BIN / "tether-loadgen", "--base-url", s.url, "--model", MODEL, "--time-scale", scale,
                "--label", run_dir.name, "--engine-metrics", ",".join(s.engine_urls), "--out", run_dir,
                "--request-timeout-secs", "900"] + workload_args
        with open(run_dir / "loadgen.log", "w") as log:
            try:
                subprocess.run([str(a) for a in args], check=True, stdout=subprocess.DEVNULL, stderr=log,
                               timeout=wall_limit)
            except subprocess.TimeoutExpired:
                print(f"    loadgen ran over {wall_limit:.0f} s wall and was stopped", flush=True)
                raise
        load_wall = time.time() - started
        lag = s.engine_lag()
    summary = json.loads((run_dir / "summary.json").read_text())
    out = {k: summary.get(k) for k in KEEP}
    out["wall_seconds"] = round(time.time() - t0, 1)
    out["load_wall_seconds"] = round(load_wall, 1)
    out["engine_lag_max"] = lag
    return out


# ---------- statistics over repeats ----------
def metric(summary, name):
    if summary is None:
        return None
    if name == "hit":
        return summary.get("cache_hit_rate")
    if name == "errors":
        return summary.get("errors")
    if name == "lag":
        return summary.get("send_lag_max")
    group, stat = name.split(".")
    d = summary.get(group) or {}
    if not d.get("count"):
        return None
    return d.get(stat)


def spread(values):
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals)


def fmt(s, kind="s"):
    if s is None:
        return "–"
    med, lo, hi = s
    if kind == "pct":
        f = lambda v: f"{v:.1%}"
    elif kind == "int":
        f = lambda v: f"{v:.0f}"
    else:
        f = lambda v: f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return f(med) if lo == hi else f"{f(med)} ({f(lo)}–{f(hi)})"


# ---------- the plan ----------
def trace_span(trace, n):
    ts = []
    with open(trace) as f:
        for line in f:
            if line.strip():
                ts.append(json.loads(line)["timestamp"])
    ts.sort()
    ts = ts[:n]
    return (ts[-1] - ts[0]) / 1000.0 if len(ts) > 1 else 1.0


def workloads(a):
    """(name, levels [(label, x, loadgen args, est. simulated seconds)], unloaded (x, args, est.), x-axis label)."""
    span = trace_span(a.trace, a.chat_requests)

    def chat_args(speedup):
        return ["--extra-session-headers", ",".join(CHAT_EXTRA_HEADERS)] * bool(CHAT_EXTRA_HEADERS) + [
            "--max-requests", str(a.chat_requests), "mooncake", "--trace", a.trace, "--pacing", "closed",
            "--speedup", f"{speedup:g}", "--max-think", "3"]

    def agent_args(rate):
        return ["--extra-session-headers", ",".join(AGENT_EXTRA_HEADERS)] * bool(AGENT_EXTRA_HEADERS) + [
            "agent", "--sessions", str(a.agent_programs), "--rate", f"{rate:g}"] + AGENT_FLAGS

    chat_rate = a.chat_requests / span
    # Simulated seconds a run lasts: arrivals, then the tail (later turns,
    # long programs, the backlog past saturation) — fitted to measured runs.
    chat_sim = lambda s: span / s + 5 + 20 * max(0.0, s - 0.6)
    agent_sim = lambda r: a.agent_programs / r + min(90.0, 30 + 3 * r)
    chat = [(f"x{s:g}", s * chat_rate, chat_args(s), chat_sim(s)) for s in a.chat_speedups]
    agent = [(f"{r:g}/s", r, agent_args(r), agent_sim(r)) for r in a.agent_rates]
    cu = min(a.chat_speedups) * a.unloaded_fraction
    au = min(a.agent_rates) * a.unloaded_fraction
    return [
        {"name": "chat", "title": "Mooncake trace, closed-loop chat", "levels": chat,
         "unloaded": (cu * chat_rate, chat_args(cu), chat_sim(cu)),
         "xlabel": "offered load (trace requests per simulated second)"},
        {"name": "agent", "title": "Agent programs", "levels": agent,
         "unloaded": (au, agent_args(au), agent_sim(au)),
         "xlabel": "program arrivals per simulated second"},
    ]


# Wall seconds to start and stop a fleet and its router.
STARTUP = {"tether": 1.5, "sglang-router": 1.3, "vllm-router": 1.1}


def estimate(seconds_sim, kind, scale):
    return seconds_sim / scale + STARTUP[kind]


def main():
    global OUT
    exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time-scale", type=float, default=4.0, help="simulated seconds per wall second (default 4)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per point (default 2; --quick: 1)")
    ap.add_argument("--chat-requests", type=int, default=None, help="first N trace requests per chat run (default 200; --quick: 100)")
    ap.add_argument("--chat-speedups", default=None, help="chat load levels: trace speed-ups (default 0.6,1.2,1.8,2.4)")
    ap.add_argument("--agent-programs", type=int, default=None, help="programs per agent run (default 280, about 2,040 calls; --quick: 80)")
    ap.add_argument("--agent-rates", default=None, help="agent load levels: programs per second (default 5,10,20,40,80)")
    ap.add_argument("--unloaded-fraction", type=float, default=0.5,
                    help="the unloaded reference runs at this fraction of the lightest level (default 0.5)")
    ap.add_argument("--systems", default=None, help="comma-separated subset of the systems")
    ap.add_argument("--workloads", default="chat,agent")
    ap.add_argument("--trace", default=str(ROOT.parent / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"))
    ap.add_argument("--quick", action="store_true", help="fewer requests, 2 levels, 1 repeat, 4 systems: a few minutes")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate, run nothing")
    ap.add_argument("--out", default=str(OUT), help="where the report, plots and runs go (default docs/results)")
    ap.add_argument("--report-only", action="store_true",
                    help="re-render the report from docs/results/comparison.json")
    a = ap.parse_args()
    OUT = pathlib.Path(a.out).resolve()
    OUT.mkdir(parents=True, exist_ok=True)
    if a.report_only:
        saved = json.loads((OUT / "comparison.json").read_text())
        write_report(saved)
        return
    a.repeats = a.repeats or (1 if a.quick else 2)
    a.chat_requests = a.chat_requests or (100 if a.quick else 200)
    a.agent_programs = a.agent_programs or (80 if a.quick else 280)
    a.chat_speedups = [float(x) for x in (a.chat_speedups or ("0.6,2.4" if a.quick else "0.6,1.2,1.8,2.4")).split(",")]
    a.agent_rates = [float(x) for x in (a.agent_rates or ("5,40" if a.quick else "5,10,20,40,80")).split(",")]
    names = a.systems.split(",") if a.systems else (QUICK_SYSTEMS if a.quick else REPORT_SYSTEMS)
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        sys.exit(f"unknown systems {unknown}; known: {list(SYSTEMS)}")
    if not pathlib.Path(a.trace).exists():
        sys.exit(f"trace not found: {a.trace}")
    commit, dirty = git_state()
    F = a.time_scale

    needed = ["tether-engine-sim", "tether-loadgen"]
    if any(SYSTEMS[n]["kind"] == "tether" for n in names):
        needed += ["tether-ingress", "tether-scheduler", "tether-session-state"]
    missing = [b for b in needed if not (BIN / b).exists()]
    if missing and not a.dry_run:
        sys.exit(f"missing binaries {missing}: cargo build --release --workspace --bins")
    for n in names:
        kind = SYSTEMS[n]["kind"]
        if kind != "tether" and not (ROUTERS / ("python" if kind == "sglang-router" else kind)).exists():
            sys.exit(f"{kind} is not installed: scripts/peers.sh")
    ingress_help = help_text(BIN / "tether-ingress") if (BIN / "tether-ingress").exists() else ""
    scheduler_help = help_text(BIN / "tether-scheduler") if (BIN / "tether-scheduler").exists() else ""
    ingress_time_scale = "--time-scale" in ingress_help
    if not ingress_time_scale and ingress_help:
        print("note: tether-ingress has no --time-scale; not passing it", flush=True)
    variants = []
    if DEFAULT in names:
        for v in OVERLOAD_VARIANTS[1:]:
            miss = flags_missing(v["scheduler_args"], scheduler_help) + flags_missing(v["ingress_args"], ingress_help)
            if miss:
                print(f"warning: overload variant {v['name']!r} skipped: flags {miss} are not in the binaries' --help",
                      flush=True)
            else:
                variants.append(v)

    wls = [w for w in workloads(a) if w["name"] in a.workloads.split(",")]
    # The plan: (workload, level label, x, system name, system spec, repeat, args, est. sim seconds)
    plan = []
    for w in wls:
        ux, uargs, usim = w["unloaded"]
        ref = DEFAULT if DEFAULT in names else names[0]
        plan.append((w["name"], "unloaded", ux, ref, SYSTEMS[ref], 0, uargs, usim))
        for rep in range(a.repeats):
            for label, x, args, sim in w["levels"]:
                for n in names:
                    plan.append((w["name"], label, x, n, SYSTEMS[n], rep, args, sim))
        label, x, args, sim = w["levels"][-1]
        for v in variants:
            spec = dict(SYSTEMS[DEFAULT], scheduler_args=v["scheduler_args"], ingress_args=v["ingress_args"])
            for rep in range(a.repeats):
                plan.append((w["name"], label, x, v["name"], spec, rep, args, sim))
    est = sum(estimate(sim, spec["kind"], F) for _, _, _, _, spec, _, _, sim in plan)
    print(f"{len(plan)} runs: {len(names)} systems × {len(a.chat_speedups)} chat and {len(a.agent_rates)} agent levels × "
          f"{a.repeats} repeats, + {len(wls)} unloaded references and {len(variants) * len(wls) * a.repeats} overload "
          f"variant runs; time scale {F:g}. Estimated {est / 60:.0f} minutes.", flush=True)
    if a.dry_run:
        for p in plan:
            print(f"  {p[0]:6s} {p[1]:9s} {p[3]:30s} repeat {p[5]}  ~{estimate(p[7], p[4]['kind'], F):.0f} s")
        return

    runs_dir = OUT / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir(parents=True)
    for old in OUT.glob("*.svg"):  # plots of an earlier report
        old.unlink()
    saved = {
        "meta": {"commit": commit, "dirty": dirty, "time_scale": F, "repeats": a.repeats, "quick": a.quick,
                 "chat_requests": a.chat_requests, "agent_programs": a.agent_programs,
                 "chat_speedups": a.chat_speedups, "agent_rates": a.agent_rates, "trace": a.trace,
                 "trace_rate": a.chat_requests / trace_span(a.trace, a.chat_requests),
                 "unloaded_fraction": a.unloaded_fraction, "systems": names,
                 "variants": [v["name"] for v in variants], "agent_flags": AGENT_FLAGS,
                 "agent_extra_headers": AGENT_EXTRA_HEADERS, "ingress_time_scale": ingress_time_scale,
                 "overload_variants": OVERLOAD_VARIANTS, "estimate_minutes": est / 60,
                 "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                 "machine": f"{platform.machine()} with {os.cpu_count()} cores ({platform.platform()})",
                 "workloads": {w["name"]: {"title": w["title"], "xlabel": w["xlabel"],
                                           "levels": [[label, x] for label, x, _, _ in w["levels"]],
                                           "unloaded_x": w["unloaded"][0]} for w in wls}},
        "runs": [],
    }
    started = time.time()
    done_est = 0.0
    for i, (wl, label, x, name, spec, rep, args, sim) in enumerate(plan):
        run_dir = runs_dir / wl / label.replace("/", "per") / f"{name.replace(' ', '_').replace(',', '')}-{rep}"
        e = estimate(sim, spec["kind"], F)
        try:
            summary = run_one(spec, args, F, run_dir, ingress_time_scale, wall_limit=max(300.0, 6 * e))
        except Exception as exc:  # a failed run is recorded, the sweep goes on
            why = str(exc) if not isinstance(exc, subprocess.CalledProcessError) else \
                f"loadgen exited {exc.returncode}: " + " / ".join(
                    (run_dir / "loadgen.log").read_text().strip().splitlines()[-3:])
            print(f"  {wl} {label} {name} #{rep}: FAILED ({why}); logs in {run_dir}", flush=True)
            summary = None
        saved["runs"].append({"workload": wl, "level": label, "x": x, "system": name, "repeat": rep,
                              "summary": summary})
        done_est += e
        elapsed = time.time() - started
        if summary:
            sc = summary["session_completion"]
            print(f"  [{i + 1}/{len(plan)}] {wl:5s} {label:9s} {name:30s} #{rep}  ttft {summary['ttft']['mean']:.3f}/"
                  f"{summary['ttft']['p99']:.2f}  session {sc['mean']:.2f}/{sc['p99']:.2f}  hit "
                  f"{summary.get('cache_hit_rate') or 0:.2f}  err {summary['errors']}  lag "
                  f"{summary.get('send_lag_max') or 0:.2f}  ({summary['wall_seconds']:.0f} s; "
                  f"{elapsed / 60:.1f}/{elapsed / done_est * est / 60:.0f} min)", flush=True)
        saved["meta"]["elapsed"] = elapsed
        (OUT / "comparison.json").write_text(json.dumps(saved, indent=1))
    write_report(saved)


def git_state():
    """The commit the run is made from, and whether tracked files differ from it."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return commit, bool(dirty)


# ---------- SVG line plots (no plotting library needed) ----------
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]


def nice_bounds(lo, hi):
    """A 1-2-5 value at or below lo and one at or above hi."""
    steps = [m * 10 ** e for e in range(-4, 6) for m in (1, 2, 5)]
    below = max((v for v in steps if v <= lo), default=steps[0])
    above = min((v for v in steps if v >= hi), default=steps[-1])
    return below, above if above > below else below * 10


def svg_lines(path, title, xlabel, ylabel, series, hline=None, dashed=()):
    """series: [(name, [(x, (median, lo, hi)) ...])]: one line per system on a
    log y axis, min–max whiskers; hline: (y, label) drawn dashed; systems
    named in `dashed` are drawn dashed."""
    w, h, ml, mr, mt, mb = 720, 420, 64, 230, 34, 50
    pw, ph = w - ml - mr, h - mt - mb
    pts = [(x, s) for _, ps in series for x, s in ps if s is not None]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>', f'<text x="{ml}" y="20" font-size="14">{title}</text>']
    if not pts:
        out.append("</svg>")
        path.write_text("\n".join(out))
        return
    xs = [x for x, _ in pts]
    ys = [v for _, s in pts for v in s if v and v > 0] + ([hline[0]] if hline and hline[0] > 0 else [])
    xmin, xmax = min(xs), max(xs)
    if xmax == xmin:
        xmin, xmax = xmin * 0.9, xmax * 1.1 + 1e-9
    pad = (xmax - xmin) * 0.05
    xmin, xmax = max(0.0, xmin - pad), xmax + pad
    ylo, yhi = nice_bounds(min(ys), max(ys)) if ys else (0.01, 1.0)
    X = lambda x: ml + pw * (x - xmin) / (xmax - xmin)
    Y = lambda y: mt + ph * (1 - (math.log10(max(y, ylo)) - math.log10(ylo)) / (math.log10(yhi) - math.log10(ylo)))
    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    ticks = [m * 10 ** e for e in range(-4, 6) for m in (1, 2, 5) if ylo <= m * 10 ** e <= yhi * 1.0001]
    if len(ticks) > 10:
        ticks = [t for t in ticks if f"{t:g}".lstrip("0.").startswith("1")]
    for v in ticks:
        y = Y(v)
        out.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{ml + pw}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
    for x in sorted(set(xs)):
        out.append(f'<line x1="{X(x):.1f}" y1="{mt + ph}" x2="{X(x):.1f}" y2="{mt + ph + 5}" stroke="#888"/>')
        out.append(f'<text x="{X(x):.1f}" y="{mt + ph + 18}" text-anchor="middle">{x:.3g}</text>')
    out.append(f'<text x="{ml + pw / 2}" y="{h - 8}" text-anchor="middle">{xlabel}</text>')
    out.append(f'<text x="14" y="{mt + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {mt + ph / 2})">{ylabel}</text>')
    if hline:
        y = Y(hline[0])
        out.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{ml + pw}" y2="{y:.1f}" stroke="#444" stroke-dasharray="2,4"/>')
        out.append(f'<text x="{ml + 4}" y="{y - 4:.1f}" fill="#444">{hline[1]}</text>')
    for k, (name, ps) in enumerate(series):
        c = COLORS[k % len(COLORS)]
        ps = [(x, s) for x, s in ps if s is not None]
        dash = ' stroke-dasharray="6,3"' if name in dashed else ""
        width = 2.8 if k == 0 else 1.6
        if ps:
            line = " ".join(f"{X(x):.1f},{Y(s[0]):.1f}" for x, s in ps)
            out.append(f'<polyline points="{line}" fill="none" stroke="{c}" stroke-width="{width}"{dash}/>')
            for x, (med, lo, hi) in ps:
                out.append(f'<line x1="{X(x):.1f}" y1="{Y(lo):.1f}" x2="{X(x):.1f}" y2="{Y(hi):.1f}" stroke="{c}"/>')
                out.append(f'<circle cx="{X(x):.1f}" cy="{Y(med):.1f}" r="3" fill="{c}"/>')
        ly = mt + 18 * k + 6
        out.append(f'<line x1="{w - mr + 10}" y1="{ly}" x2="{w - mr + 30}" y2="{ly}" stroke="{c}" stroke-width="{width}"{dash}/>')
        out.append(f'<text x="{w - mr + 36}" y="{ly + 4}">{name}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out))


# ---------- the report ----------
def write_report(saved):
    meta, runs = saved["meta"], saved["runs"]
    systems = meta["systems"]
    variants = meta.get("variants", [])

    def reps(wl, level, name):
        return [r["summary"] for r in runs if r["workload"] == wl and r["level"] == level and r["system"] == name]

    def point(wl, level, name, m):
        return spread([metric(s, m) for s in reps(wl, level, name)])

    def med(wl, level, name, m):
        p = point(wl, level, name, m)
        return None if p is None else p[0]

    wls = list(meta["workloads"])
    unloaded = {wl: med(wl, "unloaded", DEFAULT if DEFAULT in systems else systems[0], "session_completion.mean")
                for wl in wls}
    unloaded_ttft = {wl: med(wl, "unloaded", DEFAULT if DEFAULT in systems else systems[0], "ttft.mean") for wl in wls}

    # Capacity at SLO: the highest level up to which every level keeps mean
    # session completion within SLO_FACTOR x the unloaded value.
    capacity = {}
    for wl in wls:
        levels = meta["workloads"][wl]["levels"]
        for name in systems:
            cap = 0.0
            ref = unloaded.get(wl)
            for label, x in levels:
                v = med(wl, label, name, "session_completion.mean")
                if ref is None or v is None or v > SLO_FACTOR * ref:
                    break
                cap = x
            capacity[(wl, name)] = cap

    def verdict(ok):
        return "met" if ok else "**missed**"

    def ratio(a, b):
        if a is None or b is None:
            return None
        return a / b if b > 0 else (1.0 if a <= 0 else math.inf)

    targets = []
    # (i) never loses
    never_rows = []
    base_here = [b for b in BASELINES if b in systems]
    all_ok = bool(base_here) and DEFAULT in systems
    metrics4 = [("ttft.mean", "mean TTFT"), ("ttft.p99", "p99 TTFT"), ("session_completion.mean", "mean session"),
                ("session_completion.p99", "p99 session")]
    if DEFAULT in systems and base_here:
        for wl in wls:
            for label, x in meta["workloads"][wl]["levels"]:
                cells = []
                for m, _ in metrics4:
                    mine = med(wl, label, DEFAULT, m)
                    others = [(med(wl, label, b, m), b) for b in base_here]
                    others = [(v, b) for v, b in others if v is not None]
                    if mine is None or not others:
                        cells.append("–")
                        all_ok = False
                        continue
                    best, who = min(others)
                    r = ratio(mine, best)
                    ok = r <= NEVER_LOSES
                    all_ok &= ok
                    cells.append(f"{r:.2f}× {who}" + ("" if ok else " ✗"))
                never_rows.append(f"| {wl} | {label} | " + " | ".join(cells) + " |")
    targets.append((f"(i) never loses: at every level of both workloads, `{DEFAULT}`'s mean and p99 TTFT and mean and "
                    f"p99 session completion ≤ {NEVER_LOSES}× the best of {', '.join(base_here) or '(none run)'}",
                    "every ratio in the table below", verdict(all_ok)))
    # (ii) agent
    if "agent" in wls and DEFAULT in systems:
        peers_here = [p for p in PEERS if p in systems]
        mine = capacity.get(("agent", DEFAULT), 0.0)
        best_peer = max((capacity.get(("agent", p), 0.0) for p in peers_here), default=None)
        if best_peer is None:
            targets.append(("(ii) agent: capacity at SLO ≥ 1.5× the best peer's", "no peer ran", verdict(False)))
        else:
            r = mine / best_peer if best_peer > 0 else (math.inf if mine > 0 else None)
            rs = "–" if r is None else ("∞" if r == math.inf else f"{r:.2f}×")
            targets.append(("(ii) agent: capacity at SLO ≥ 1.5× the best peer's",
                            f"{mine:g} vs {best_peer:g} programs/s ({rs})", verdict(r is not None and r >= 1.5)))
            label, x = meta["workloads"]["agent"]["levels"][-1]
            for m, lim, what in [("session_completion.mean", 0.5, "mean"), ("session_completion.p99", 1.0, "p99")]:
                v = med("agent", label, DEFAULT, m)
                peer = [(med("agent", label, p, m), p) for p in peers_here]
                peer = [(pv, p) for pv, p in peer if pv is not None]
                if v is None or not peer:
                    targets.append((f"(ii) agent, heaviest level ({label}): {what} session completion ≤ {lim}× the best "
                                    "peer's", "not measured", verdict(False)))
                    continue
                best, who = min(peer)
                r = ratio(v, best)
                targets.append((f"(ii) agent, heaviest level ({label}): {what} session completion ≤ {lim}× the best "
                                "peer's", f"{v:.2f} s vs {best:.2f} s ({who}): {r:.2f}×", verdict(r <= lim)))
    # (iii) overload: the default against its FCFS-ordering variant; every
    # other variant is an option, shown against the same FCFS reference.
    names_v = [v["name"] if isinstance(v, dict) else v for v in variants]
    fcfs = next((n for n in names_v if "FCFS" in n), None)
    for who in [DEFAULT] + [n for n in names_v if n != fcfs]:
        if fcfs is None:
            break
        tag = "" if who == DEFAULT else " (an option, not the default)"
        for wl in wls:
            label, x = meta["workloads"][wl]["levels"][-1]
            for m, lim, what in [("ttft.mean", 0.5, "mean"), ("ttft.p99", 1.5, "p99")]:
                mine, theirs = med(wl, label, who, m), med(wl, label, fcfs, m)
                r = ratio(mine, theirs)
                targets.append((f"(iii) overload, {wl} at {label}: `{who}`'s {what} TTFT ≤ {lim}× `{fcfs}`{tag}",
                                "not measured" if r is None else f"{mine:.3f} s vs {theirs:.3f} s ({r:.2f}×)",
                                verdict(r is not None and r <= lim)))

    # Plots
    for wl in wls:
        levels = meta["workloads"][wl]["levels"]
        for m, what in metrics4:
            series = [(name, [(x, point(wl, label, name, m)) for label, x in levels]) for name in systems]
            fname = f"{wl}-{m.replace('.', '-').replace('_', '-')}.svg"
            hline = None
            if m == "session_completion.mean" and unloaded.get(wl):
                hline = (SLO_FACTOR * unloaded[wl], f"SLO: {SLO_FACTOR:g}× unloaded")
            svg_lines(OUT / fname, f"{meta['workloads'][wl]['title']}: {what} (median, min–max)",
                      meta["workloads"][wl]["xlabel"], f"{what} (simulated s)", series, hline,
                      dashed=[n for n in systems if SYSTEMS.get(n, {}).get("kind", "tether") != "tether"])

    def table(wl, label, names):
        head = ("| system | TTFT mean | TTFT p99 | session mean | session p99 | hit rate | errors | send lag max |")
        lines = [head, "|---|---|---|---|---|---|---|---|"]
        for name in names:
            if not reps(wl, label, name):
                continue
            cells = [fmt(point(wl, label, name, "ttft.mean")), fmt(point(wl, label, name, "ttft.p99")),
                     fmt(point(wl, label, name, "session_completion.mean")),
                     fmt(point(wl, label, name, "session_completion.p99")), fmt(point(wl, label, name, "hit"), "pct"),
                     fmt(point(wl, label, name, "errors"), "int"), fmt(point(wl, label, name, "lag"))]
            failed = sum(1 for s in reps(wl, label, name) if s is None)
            lines.append(f"| {name}{f' ({failed} failed)' if failed else ''} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    elapsed = meta.get("elapsed", 0.0)
    agent_flags = " ".join(meta.get("agent_flags", []))
    lags = [r["summary"].get("send_lag_max") or 0.0 for r in runs if r["summary"]]
    elags = [r["summary"].get("engine_lag_max") for r in runs if r["summary"] and r["summary"].get("engine_lag_max") is not None]
    failed = [r for r in runs if r["summary"] is None]
    calls = {wl: [r["summary"]["calls"] for r in runs if r["workload"] == wl and r["summary"] and r["level"] != "unloaded"]
             for wl in wls}
    L = [
        "# Load sweep: Tether against peer routers",
        "",
        f"Generated by `just compare` (`scripts/compare.py`{' --quick' if meta.get('quick') else ''}), started "
        f"{meta.get('started', '?')} UTC, commit `{meta['commit']}`{' (with uncommitted changes)' if meta['dirty'] else ''}, "
        f"on {meta.get('machine', '?')}. **Do not edit by hand**: rerun the recipe (`--report-only` re-renders this "
        f"page from `comparison.json`). The sweep took {elapsed / 60:.1f} minutes "
        f"(estimated {meta.get('estimate_minutes', 0):.0f}).",
        "",
        "## Set-up",
        "",
        f"Every run starts a fresh fleet of four engine-sims (Llama-3-8B on an H100 each, 400,000 tokens of KV, "
        "`--max-model-len 262144`, all **FCFS**; see [engine-sim.md](../engine-sim.md)) and one router in front of "
        "them, then replays the workload with `tether-loadgen` (streamed calls, the session id in `x-session-id`). "
        f"Simulated time runs **{meta['time_scale']:g}×** faster than wall time in the engines, the replayer"
        + (", Tether's gateway (`--time-scale`)" if meta.get("ingress_time_scale") else "") + " and Tether's scrape "
        "interval alike; every latency here is in simulated seconds. Each point is run "
        f"**{meta['repeats']}** time(s); tables give the median with the min–max spread in brackets, plots the median "
        "with min–max whiskers.",
        "",
        "| system | what |",
        "|---|---|",
    ]
    for name in systems + variants:
        spec = SYSTEMS.get(name)
        if spec is None:
            v = next((v for v in meta.get("overload_variants", []) if v["name"] == name), {})
            L.append(f"| {name} | Tether, strategy `tether`, scheduler args `{' '.join(v.get('scheduler_args', []))}`, "
                     f"ingress args `{' '.join(v.get('ingress_args', []))}` (overload comparison only) |")
        elif spec["kind"] == "tether":
            extra = " ".join(spec.get("ingress_args", []))
            L.append(f"| {name} | Tether (NATS, session-state, scheduler, ingress), scheduler `--strategy {spec['strategy']}`"
                     f"{f', ingress `{extra}`' if extra else ''}"
                     f"{' — the default' if name == DEFAULT else ''}; fleet file `priority = false` |")
        else:
            L.append(f"| {name} | {spec['kind']} from PyPI (scripts/peers.sh), `--policy {spec['policy']}` |")
    chat_meta = meta["workloads"].get("chat")
    agent_meta = meta["workloads"].get("agent")
    L += ["", "**Workloads and levels.**", ""]
    if chat_meta:
        L.append(f"- *chat*: the first {meta['chat_requests']} requests of the Mooncake synthetic trace "
                 f"({meta['trace_rate']:.2f} requests per second at its own pace; mean prompt ≈ 15,000 tokens), sessions "
                 "reconstructed from shared prefixes ([loadgen.md](../loadgen.md)), closed loop: a session's next turn "
                 "follows its previous answer after the trace's gap (÷ speed-up, at most 3 s). Levels: trace speed-ups "
                 + ", ".join(f"{l}" for l, _ in chat_meta["levels"]) + f" (fixed multipliers; x-axis: requests per "
                 f"second offered); the unloaded reference runs at ×{chat_meta['unloaded_x'] / meta['trace_rate']:g}. "
                 f"Calls per run: {min(calls['chat'], default=0)}–{max(calls['chat'], default=0)}.")
    if agent_meta:
        f = dict(zip(meta["agent_flags"][::2], meta["agent_flags"][1::2]))
        g = lambda k, d="?": f.get(k, d)
        L.append(f"- *agent*: {meta['agent_programs']} agent programs arriving as a Poisson process (`tether-loadgen agent "
                 f"{agent_flags}`): heavy-tailed lengths (1–{g('--steps')} steps, bounded Pareto α = "
                 f"{g('--step-alpha', '1.2')}), each step a fan-out of {g('--fanout-min')}–{g('--fanout')} parallel "
                 f"calls ({g('--prompt-min')}–{g('--prompt-max')} new words each, answers of {g('--answer-min')}–"
                 f"{g('--answer-max')} tokens) joined before the next step, a random tool-call pause between steps "
                 f"(exponential, mean {g('--tool-pause-secs')} s, at most {g('--tool-pause-max-secs')} s), the context "
                 f"growing by every joined branch and answer, and {g('--system-prompts')} shared "
                 f"{int(g('--system-prompt-words', '0')):,}-word system prompts, each opening about "
                 f"1/{g('--system-prompts')} of the programs. Requests also carry the session id in "
                 f"{', '.join(f'`{h}`' for h in meta.get('agent_extra_headers', [])) or 'no other header'}. The program "
                 "mix is the same at every level; only arrivals speed up. Levels: "
                 + ", ".join(l for l, _ in agent_meta["levels"]) + " programs per second (fixed); the unloaded "
                 f"reference runs at {agent_meta['unloaded_x']:g}/s. Calls per run: "
                 f"{min(calls['agent'], default=0)}–{max(calls['agent'], default=0)}.")
    L += ["", f"**Unloaded reference** (one light run of `{DEFAULT if DEFAULT in systems else systems[0]}`): "
          + "; ".join(f"{wl}: mean session completion {unloaded[wl]:.2f} s, mean TTFT {unloaded_ttft[wl]:.3f} s"
                      for wl in wls if unloaded.get(wl) is not None and unloaded_ttft.get(wl) is not None) + ".",
          ""]
    L += ["## Targets", "", "Computed from the medians over repeats.", "", "| target | measured | |", "|---|---|---|"]
    L += [f"| {t} | {m} | {v} |" for t, m, v in targets]
    if never_rows:
        L += ["", f"Ratios of `{DEFAULT}` to the best baseline at each level (which baseline was best beside it; ✗: over "
              f"{NEVER_LOSES}×):", "", "| workload | level | " + " | ".join(w for _, w in metrics4) + " |",
              "|---|---|" + "---|" * len(metrics4)] + never_rows
    L += ["", f"## Capacity at SLO", "",
          f"The highest level up to which a system's mean session completion stays within {SLO_FACTOR:g}× the "
          "unloaded value (0: not even the lightest level).", "",
          "| system | " + " | ".join(f"{wl} ({'requests/s' if wl == 'chat' else 'programs/s'})" for wl in wls) + " |",
          "|---|" + "---|" * len(wls)]
    for name in systems:
        L.append(f"| {name} | " + " | ".join(f"{capacity.get((wl, name), 0.0):.3g}" for wl in wls) + " |")
    for wl in wls:
        wm = meta["workloads"][wl]
        L += ["", f"## {wm['title']}", ""]
        L += [" ".join(f"![{what}]({wl}-{m.replace('.', '-').replace('_', '-')}.svg)" for m, what in metrics4), ""]
        for m, what in [("session_completion.mean", "Mean session completion"), ("ttft.mean", "Mean TTFT")]:
            L += [f"{what} (s) at each level:", "",
                  "| system | " + " | ".join(label for label, _ in wm["levels"]) + " |",
                  "|---|" + "---|" * len(wm["levels"])]
            for name in systems:
                L.append(f"| {name} | " + " | ".join(fmt(point(wl, label, name, m)) for label, _ in wm["levels"]) + " |")
            L.append("")
        for label, x in wm["levels"]:
            L += [f"**{wl}, level {label}** (offered {x:.3g} {'requests' if wl == 'chat' else 'programs'}/s)", "",
                  table(wl, label, systems + [v for v in variants if label == wm["levels"][-1][0]]), ""]
    if variants:
        L += ["## Overload: gateway ordering", "",
              f"At each workload's heaviest level, `{DEFAULT}` against the same system with the variant's arguments "
              "(the overload rows in the tables above; the variants are listed at the top of `scripts/compare.py`).", ""]
    L += ["## Did the machine keep up?", "",
          "`send lag` is how late the replayer sent a step against its plan (simulated seconds; a few × 0.01 s is "
          "timer granularity × the time scale). "
          f"Largest send lag over all runs: {max(lags, default=0):.2f} s; median of the runs' maxima: "
          f"{statistics.median(lags) if lags else 0:.2f} s. "
          + (f"Largest engine-sim lag reported: {max(elags):.2f} s." if elags else
             "engine-sim exposes no lag metric, so the engines' own delay is not measured here.")
          + (f" {len(failed)} run(s) failed: " + ", ".join(f"{r['workload']}/{r['level']}/{r['system']}#{r['repeat']}"
                                                          for r in failed) + "." if failed else ""),
          "",
          "Raw records: `docs/results/runs/<workload>/<level>/<system>-<repeat>/` (`calls.jsonl`, `sessions.jsonl`, "
          "`summary.json`, every process's log; regenerated, not committed); `comparison.json` holds every run's summary.",
          ""]
    (OUT / "comparison.md").write_text("\n".join(L))
    print(f"wrote {OUT / 'comparison.md'}")


if __name__ == "__main__":
    main()
