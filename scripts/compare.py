#!/usr/bin/env python3
"""Regenerates docs/results/comparison.md and its plots.

Brings up a fleet of four engine-sims and the whole Tether system once per
experiment (fresh NATS, fresh caches), replays a workload with tether-loadgen
against the ingress under each routing policy, and writes a Markdown report
with tables and SVG plots. Everything runs with simulated time scaled by
--time-scale (engines, replayer and scrape interval alike).

Usage: scripts/compare.py [--time-scale 20] [--max-requests 2000] [--quick]
(`just compare` runs it after a release build).
"""
import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
OUT = ROOT / "docs" / "results"
POLICIES = ["round-robin", "least-loaded", "session-hash", "cache-aware", "tether"]


def sglang_router():
    """The Python that runs sglang-router, if it is installed (on PATH, or in .tools/routers)."""
    for script in [shutil.which("sglang-router"), str(ROOT / ".tools" / "routers" / "bin" / "sglang-router")]:
        if script and pathlib.Path(script).exists():
            python = pathlib.Path(script).parent / "python"
            if python.exists():
                return str(python)
    return None
OTHER_ROUTERS = ["sglang-router", "vllm-router"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not become ready")


class Stack:
    """nats-server, 4 engine-sims, session-state, scheduler and ingress."""

    def __init__(self, nats, strategy, time_scale, priority=False, mode="atlas", engines=4, log_dir=None, scheduler_args=(),
                 external=None):
        self.nats_bin, self.strategy, self.scale = nats, strategy, time_scale
        self.scheduler_args = list(scheduler_args)
        # (python, policy): run sglang-router in front of the engines instead of Tether.
        self.external = external
        self.priority, self.mode, self.n = priority, mode, engines
        self.procs = []
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="tether-compare-"))
        self.log_dir = log_dir or self.tmp

    def spawn(self, name, args, env=None):
        log = open(self.log_dir / f"{name}.log", "w")
        e = dict(os.environ, RUST_LOG="warn", **(env or {}))
        self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=e))

    def __enter__(self):
        nats_port = free_port()
        self.spawn("nats", [self.nats_bin, "-a", "127.0.0.1", "-p", str(nats_port), "-js", "-sd", str(self.tmp / "js")])
        self.engine_urls = []
        fleet = []
        for i in range(self.n):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            self.spawn(f"sim-{i}", [BIN / "tether-engine-sim", "--listen", f"127.0.0.1:{port}", "--name", f"sim-{i}",
                                    "--time-scale", str(self.scale), "--max-model-len", "262144",
                                    "--scheduling-policy", "priority" if self.priority else "fcfs"])
            self.engine_urls.append(url)
            fleet.append(f'[[engines]]\nname = "sim-{i}"\nurl = "{url}"\nmodels = ["tether-sim"]\n'
                         f'priority = {"true" if self.priority else "false"}\ncache_tokens = 400000\n')
        (self.tmp / "fleet.toml").write_text("\n".join(fleet))
        for url in self.engine_urls:
            wait_http(url + "/health")
        if self.external:
            python, policy = self.external
            port = free_port()
            self.ingress = f"http://127.0.0.1:{port}"
            self.spawn("sglang-router", [python, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
                                         "--worker-urls", *self.engine_urls, "--policy", policy, "--log-level", "warn"])
            wait_http(self.ingress + "/v1/models", timeout=60)
            return self
        env = {"TETHER_NATS_URL": f"nats://127.0.0.1:{nats_port}", "TETHER_FLEET": str(self.tmp / "fleet.toml")}
        ss, sc = free_port(), free_port()
        self.spawn("session-state", [BIN / "tether-session-state", "--admin-listen", f"127.0.0.1:{ss}"], env)
        wait_http(f"http://127.0.0.1:{ss}/ready")
        scrape = max(10, int(100 / self.scale))
        self.spawn("scheduler", [BIN / "tether-scheduler", "--admin-listen", f"127.0.0.1:{sc}",
                                 "--strategy", self.strategy, "--priority-mode", self.mode,
                                 "--scrape-interval-ms", str(scrape)] + self.scheduler_args, env)
        wait_http(f"http://127.0.0.1:{sc}/ready")
        port = free_port()
        self.ingress = f"http://127.0.0.1:{port}"
        self.spawn("ingress", [BIN / "tether-ingress", "--listen", f"127.0.0.1:{port}",
                               "--health-interval-ms", str(scrape), "--route-timeout-ms", "200"], env)
        wait_http(self.ingress + "/ready")
        return self

    def __exit__(self, *exc):
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def loadgen(stack, label, workload_args, scale, out_dir):
    run_dir = out_dir / label
    args = [BIN / "tether-loadgen", "--base-url", stack.ingress, "--time-scale", str(scale), "--label", label,
            "--engine-metrics", ",".join(stack.engine_urls), "--out", str(run_dir)] + workload_args
    t0 = time.time()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["wall_seconds"] = round(time.time() - t0, 1)
    calls = [json.loads(l) for l in (run_dir / "calls.jsonl").read_text().splitlines() if l.strip()]
    summary["ttfts"] = sorted(c["ttft"] for c in calls if c.get("ttft") is not None)
    print(f"  {label:40s} ttft mean {summary['ttft']['mean']:.3f}s  session {summary['session_completion']['mean']:.2f}s  "
          f"hit {summary.get('cache_hit_rate') or 0:.3f}  errors {summary['errors']}  ({summary['wall_seconds']}s)", flush=True)
    return summary


# ---------- SVG plots (no plotting library needed) ----------
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


def svg_cdf(path, title, series, xlabel):
    w, h, ml, mb, mt, mr = 640, 400, 60, 50, 30, 170
    xmax = max((s[-1] for _, s in series if s), default=1.0)
    xmax = max(xmax, 1e-9)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{ml}" y="18" font-size="14">{title}</text>']
    pw, ph = w - ml - mr, h - mt - mb
    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    for i in range(6):
        x = ml + pw * i / 5
        out.append(f'<text x="{x:.0f}" y="{h - mb + 16}" text-anchor="middle">{xmax * i / 5:.2f}</text>')
        y = mt + ph * (1 - i / 5)
        out.append(f'<text x="{ml - 6}" y="{y + 4:.0f}" text-anchor="end">{i / 5:.1f}</text>')
    out.append(f'<text x="{ml + pw / 2}" y="{h - 10}" text-anchor="middle">{xlabel}</text>')
    for k, (name, vals) in enumerate(series):
        if not vals:
            continue
        n = len(vals)
        step = max(1, n // 400)
        pts = [(ml + pw * v / xmax, mt + ph * (1 - (i + 1) / n)) for i, v in enumerate(vals) if i % step == 0 or i == n - 1]
        d = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        c = COLORS[k % len(COLORS)]
        out.append(f'<polyline points="{d}" fill="none" stroke="{c}" stroke-width="2"/>')
        out.append(f'<rect x="{w - mr + 12}" y="{mt + 18 * k}" width="12" height="12" fill="{c}"/>')
        out.append(f'<text x="{w - mr + 30}" y="{mt + 18 * k + 10}">{name}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out))


def svg_bars(path, title, items, fmt="{:.2f}"):
    w, h, ml, mb, mt = 640, 360, 60, 90, 30
    vmax = max((v for _, v in items), default=1.0) or 1.0
    pw, ph = w - ml - 20, h - mt - mb
    bw = pw / max(1, len(items))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>', f'<text x="{ml}" y="18" font-size="14">{title}</text>',
           f'<line x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}" stroke="#888"/>']
    for i, (name, v) in enumerate(items):
        bh = ph * v / vmax
        x = ml + i * bw + bw * 0.15
        out.append(f'<rect x="{x:.1f}" y="{mt + ph - bh:.1f}" width="{bw * 0.7:.1f}" height="{bh:.1f}" fill="{COLORS[i % len(COLORS)]}"/>')
        out.append(f'<text x="{x + bw * 0.35:.1f}" y="{mt + ph - bh - 4:.1f}" text-anchor="middle">{fmt.format(v)}</text>')
        out.append(f'<text x="{x + bw * 0.35:.1f}" y="{mt + ph + 16}" text-anchor="middle" transform="rotate(20 {x + bw * 0.35:.1f} {mt + ph + 16})">{name}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out))


def table(rows, title):
    head = "| policy | calls | errors | TTFT mean | TTFT p50 | TTFT p90 | TTFT p99 | TPOT mean | E2E mean | session completion mean | cache hit rate |"
    lines = [f"**{title}**", "", head, "|" + "---|" * 11]
    for r in rows:
        hit = r.get("cache_hit_rate")
        lines.append(f"| {r['label'].split('/')[-1]} | {r['calls']} | {r['errors']} | {r['ttft']['mean']:.3f} | {r['ttft']['p50']:.3f} | "
                     f"{r['ttft']['p90']:.3f} | {r['ttft']['p99']:.3f} | {r['tpot']['mean'] * 1000:.1f} ms | {r['e2e']['mean']:.2f} | "
                     f"{r['session_completion']['mean']:.2f} | {'' if hit is None else f'{hit:.1%}'} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--time-scale", type=float, default=20.0)
    ap.add_argument("--small-time-scale", type=float, default=10.0)
    ap.add_argument("--max-requests", type=int, default=2000)
    ap.add_argument("--trace", default=str(ROOT.parent / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"))
    ap.add_argument("--closed-speedups", default="1,1.1,1.2,1.3,1.5,2")
    ap.add_argument("--quick", action="store_true", help="a few hundred requests, for trying the script")
    ap.add_argument("--report-only", action="store_true",
                    help="re-render the report from the last run's records (docs/results/comparison.json and runs/)")
    a = ap.parse_args()
    # Recorded before anything is written, so the report names the code that made it.
    a.commit, a.dirty = git_state()
    if a.report_only:
        saved = json.loads((OUT / "comparison.json").read_text())
        for regime, rows in saved["results"].items():
            for r in rows:
                calls = OUT / "runs" / r["label"] / "calls.jsonl"
                recs = [json.loads(l) for l in calls.read_text().splitlines() if l.strip()] if calls.exists() else []
                r["ttfts"] = sorted(c["ttft"] for c in recs if c.get("ttft") is not None)
        for k, v in saved.get("args", {}).items():
            setattr(a, k, v)
        write_report(a, saved["results"], saved["unloaded_ttft"], saved["closed_speedup"], saved.get("elapsed", 0.0))
        return
    if a.quick:
        a.max_requests = 300
    nats = os.environ.get("TETHER_NATS_SERVER") or str(ROOT / ".tools" / "venv" / "bin" / "nats-server")
    trace = pathlib.Path(a.trace)
    if not trace.exists():
        sys.exit(f"trace not found: {trace}")
    runs = OUT / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    F = a.time_scale
    started = time.time()
    moon = lambda pacing, speedup: ["mooncake", "--trace", str(trace), "--pacing", pacing, "--speedup", str(speedup),
                                    "--max-think", "3", "--max-requests", str(a.max_requests)]

    # 1. Unloaded TTFT: the first 100 requests one at a time, round-robin.
    print("unloaded reference", flush=True)
    with Stack(nats, "round-robin", F) as s:
        base = loadgen(s, "unloaded", ["--concurrency-limit", "1"] + moon("closed", 1000)[:-2] + ["--max-requests", "100"], F, runs)
    unloaded = base["ttft"]["mean"]

    # 2. Closed-loop load: the lowest speed-up where round-robin's mean TTFT ≥ 2.5× unloaded.
    print("calibrating the closed-loop load", flush=True)
    chosen, rr = None, None
    for sp in [float(x) for x in a.closed_speedups.split(",")]:
        with Stack(nats, "round-robin", F) as s:
            r = loadgen(s, f"calibrate-x{sp:g}", moon("closed", sp), F, runs)
        chosen, rr = sp, r
        if r["ttft"]["mean"] >= 2.5 * unloaded:
            break
    print(f"closed-loop speed-up {chosen:g}", flush=True)

    results = {}
    sgl = sglang_router()
    for regime, pacing, sp in [("closed", "closed", chosen), ("open", "open", 1.0)]:
        print(regime, flush=True)
        results[regime] = []
        for p in POLICIES:
            if regime == "closed" and p == "round-robin":
                # The calibration run at the chosen load is this run.
                rr = dict(rr)
                rr["label"] = "closed/round-robin"
                shutil.copytree(runs / f"calibrate-x{chosen:g}", runs / "closed" / "round-robin")
                results[regime].append(rr)
                continue
            with Stack(nats, p, F, priority=(p == "tether")) as s:
                results[regime].append(loadgen(s, f"{regime}/{p}", moon(pacing, sp), F, runs))
        if sgl:
            with Stack(nats, "-", F, external=(sgl, "cache_aware")) as s:
                results[regime].append(loadgen(s, f"{regime}/sglang-router", moon(pacing, sp), F, runs))

    # 3. Overload: 1.5× the closed-loop load; tether placement, priority queues vs FCFS.
    print("overload", flush=True)
    results["overload"] = []
    variants = [("tether FCFS", False, "atlas", []), ("tether ATLAS", True, "atlas", []), ("tether PLAS", True, "plas", []),
                ("tether ATLAS + prompt cost", True, "atlas", ["--level-prompt-cost", "0.0001"])]
    for label, prio, mode, extra in variants:
        with Stack(nats, "tether", F, priority=prio, mode=mode, scheduler_args=extra) as s:
            results["overload"].append(loadgen(s, f"overload/{label}", moon("closed", chosen * 1.5), F, runs))

    # 4. Agent programs (fan-out/join).
    print("agent", flush=True)
    results["agent"] = []
    agent = ["agent", "--sessions", "60", "--rate", "1.5", "--steps", "12", "--fanout", "4", "--prompt-min", "200",
             "--prompt-max", "800", "--answer-min", "16", "--answer-max", "300", "--seed", "7"]
    for p in POLICIES:
        with Stack(nats, p, F, priority=(p == "tether")) as s:
            results["agent"].append(loadgen(s, f"agent/{p}", agent, F, runs))
    if sgl:
        with Stack(nats, "-", F, external=(sgl, "cache_aware")) as s:
            results["agent"].append(loadgen(s, "agent/sglang-router", agent, F, runs))

    # 5. A smaller time scale: the closed-loop result for the two headline policies.
    print(f"time scale {a.small_time_scale:g}", flush=True)
    results["small-scale"] = []
    for p in ["least-loaded", "tether"]:
        with Stack(nats, p, a.small_time_scale, priority=(p == "tether")) as s:
            results["small-scale"].append(loadgen(s, f"closed-F{a.small_time_scale:g}/{p}", moon("closed", chosen), a.small_time_scale, runs))

    write_report(a, results, unloaded, chosen, time.time() - started)


def trace_stats(path, n):
    """What the replayed slice of the trace offers: sessions under loadgen's
    default rule (a request continues the latest earlier request with which it
    shares the longest leading run of blocks, at least one), and the hit rate
    of an ideal, infinite, shared cache."""
    reqs = [json.loads(l) for l in pathlib.Path(path).read_text().splitlines() if l.strip()][:n]
    reqs.sort(key=lambda r: r["timestamp"])
    latest = {}  # prefix -> session of the latest request holding it
    sizes = []
    cont = hit = total = 0
    for r in reqs:
        ids = tuple(r["hash_ids"])
        best = next((k for k in range(len(ids), 0, -1) if ids[:k] in latest), 0)
        if best:
            sess = latest[ids[:best]]
            cont += 1
            sizes[sess] += 1
        else:
            sess = len(sizes)
            sizes.append(1)
        hit += best
        total += len(ids)
        for k in range(1, len(ids) + 1):
            latest[ids[:k]] = sess
    return {"requests": len(reqs), "continuations": cont, "sessions": len(sizes),
            "multi_turn": sum(1 for x in sizes if x > 1), "ideal_hit": hit / max(1, total)}


def git_state():
    """The commit the run is made from, and whether tracked files differ from it."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return commit, bool(dirty)


def write_report(a, results, unloaded, chosen, elapsed):
    def by(regime, name):
        return next(r for r in results[regime] if r["label"].endswith("/" + name))

    for regime in ["closed", "open", "agent"]:
        svg_cdf(OUT / f"ttft-cdf-{regime}.svg", f"TTFT CDF, {regime}", [(r["label"].split("/")[-1], r["ttfts"]) for r in results[regime]], "TTFT (simulated s)")
        svg_bars(OUT / f"session-completion-{regime}.svg", f"Mean session completion time, {regime} (s)",
                 [(r["label"].split("/")[-1], r["session_completion"]["mean"]) for r in results[regime]])
        svg_bars(OUT / f"cache-hit-{regime}.svg", f"Fleet prefix-cache hit rate, {regime}",
                 [(r["label"].split("/")[-1], r.get("cache_hit_rate") or 0.0) for r in results[regime]], "{:.1%}")
    svg_cdf(OUT / "ttft-cdf-overload.svg", "TTFT CDF, overload", [(r["label"].split("/")[-1], r["ttfts"]) for r in results["overload"]], "TTFT (simulated s)")

    ts = trace_stats(a.trace, a.max_requests)
    commit, dirty = a.commit, a.dirty
    t, ll, ca = by("closed", "tether"), by("closed", "least-loaded"), by("closed", "cache-aware")
    ot, oll, oca = by("open", "tether"), by("open", "least-loaded"), by("open", "cache-aware")
    fc = next(r for r in results["overload"] if "FCFS" in r["label"])
    at = next(r for r in results["overload"] if r["label"].endswith("ATLAS"))
    ap_ = next((r for r in results["overload"] if "prompt cost" in r["label"]), None)

    def verdict(ok):
        return "met" if ok else "**missed**"

    checks = [
        ("closed: mean session completion ≤ 0.5× least-loaded", f"{t['session_completion']['mean']:.2f} s vs {ll['session_completion']['mean']:.2f} s ({t['session_completion']['mean'] / ll['session_completion']['mean']:.2f}×)", verdict(t['session_completion']['mean'] <= 0.5 * ll['session_completion']['mean'])),
        ("closed: mean session completion ≤ cache-aware", f"{t['session_completion']['mean']:.2f} s vs {ca['session_completion']['mean']:.2f} s", verdict(t['session_completion']['mean'] <= ca['session_completion']['mean'])),
        ("closed: hit rate within 5 % of the ideal shared cache (≈ 64 % over the whole trace)",
         f"{(t.get('cache_hit_rate') or 0):.1%} (ideal for the replayed slice: {ts['ideal_hit']:.1%})",
         verdict((t.get('cache_hit_rate') or 0) >= ts['ideal_hit'] - 0.05)),
        ("open: mean TTFT ≤ 0.9× least-loaded", f"{ot['ttft']['mean']:.3f} s vs {oll['ttft']['mean']:.3f} s ({ot['ttft']['mean'] / oll['ttft']['mean']:.2f}×)", verdict(ot['ttft']['mean'] <= 0.9 * oll['ttft']['mean'])),
        ("open: mean TTFT ≤ cache-aware", f"{ot['ttft']['mean']:.3f} s vs {oca['ttft']['mean']:.3f} s", verdict(ot['ttft']['mean'] <= oca['ttft']['mean'])),
        ("overload: ATLAS mean TTFT ≤ 0.5× FCFS", f"{at['ttft']['mean']:.3f} s vs {fc['ttft']['mean']:.3f} s ({at['ttft']['mean'] / fc['ttft']['mean']:.2f}×)", verdict(at['ttft']['mean'] <= 0.5 * fc['ttft']['mean'])),
    ]
    checks += [
        ("overload: ATLAS p99 TTFT ≤ 1.5× FCFS", f"{at['ttft']['p99']:.3f} s vs {fc['ttft']['p99']:.3f} s ({at['ttft']['p99'] / fc['ttft']['p99']:.2f}×)", verdict(at['ttft']['p99'] <= 1.5 * fc['ttft']['p99'])),
    ]
    if ap_ is not None:
        checks += [
            ("overload, ATLAS with the prompt's cost in the level: mean TTFT ≤ 0.5× FCFS", f"{ap_['ttft']['mean']:.3f} s vs {fc['ttft']['mean']:.3f} s ({ap_['ttft']['mean'] / fc['ttft']['mean']:.2f}×)", verdict(ap_['ttft']['mean'] <= 0.5 * fc['ttft']['mean'])),
            ("overload, ATLAS with the prompt's cost in the level: p99 TTFT ≤ 1.5× FCFS", f"{ap_['ttft']['p99']:.3f} s vs {fc['ttft']['p99']:.3f} s ({ap_['ttft']['p99'] / fc['ttft']['p99']:.2f}×)", verdict(ap_['ttft']['p99'] <= 1.5 * fc['ttft']['p99'])),
        ]
    lines = [
        "# Policy comparison",
        "",
        f"Generated by `just compare` (`scripts/compare.py`) on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"commit `{commit}`{' (with uncommitted changes)' if dirty else ''}, on {platform.machine()} with {os.cpu_count()} cores "
        f"({platform.platform()}). Do not edit by hand: rerun the recipe. It took {elapsed / 60:.1f} minutes.",
        "",
        "**Set-up.** Four engine-sims (Llama-3-8B on H100 defaults, see [engine-sim.md](../engine-sim.md), with `--max-model-len` raised "
        "to 262,144 because the trace holds prompts over 128 k tokens), the whole Tether system "
        "(NATS, session-state, scheduler, ingress), fresh for every run; `tether-loadgen` streams every call. "
        f"Simulated time runs {a.time_scale:g}× faster than wall time for engines, replayer and the scheduler's scrape interval alike; "
        "all latencies are simulated seconds. Baselines run FCFS engines without a priority field; `tether` runs engines with "
        "`--scheduling-policy priority` and sends its level as `priority`.",
        "",
        f"**Workload.** The first {a.max_requests} requests of the Mooncake synthetic trace, sessions reconstructed from `hash_ids` "
        "([loadgen.md](../loadgen.md)). Unloaded mean TTFT (100 requests one at a time): "
        f"**{unloaded:.3f} s**. Closed loop: turns follow answers after the trace's gap capped at 3 s, with session arrivals "
        f"sped up **{chosen:g}×** — the first speed-up tried at which round-robin's mean TTFT reached 2.5× the unloaded value "
        f"({by('closed', 'round-robin')['ttft']['mean'] / unloaded:.1f}× there). Open loop: every request at its own timestamp. "
        "Overload: the closed loop at 1.5× that speed-up.",
        "",
        "## Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
    ] + [f"| {c} | {m} | {v} |" for c, m, v in checks] + [
        "",
        "## Reading the results",
        "",
        "Each figure is a single run. On this 2-core machine, which also runs the engines, the services and the replayer, "
        "repeated runs of one configuration have differed by up to about 15 % in mean TTFT under overload and by a few "
        "per cent in the other regimes, so smaller differences between policies are not significant.",
        "",
        f"What the replayed slice offers a router: of its {ts['requests']} requests, {ts['continuations']} continue an earlier "
        f"conversation (loadgen's session rule), giving {ts['sessions']} sessions of which only {ts['multi_turn']} have more "
        f"than one turn; an ideal, infinite cache shared by the whole fleet would serve {ts['ideal_hit']:.1%} of the prompt "
        "blocks. Each engine-sim holds 400,000 tokens of KV; at this trace's rate (mean prompt ≈ 15,000 tokens) an "
        "engine's cache turns over within tens of seconds, so reuse further apart than that is lost whatever the router "
        "does — which bounds every policy's hit rate far below the ideal. Every session's first call starts at level 0 "
        "whatever its size, so least-attained-service ordering acts on later turns only: it moves them behind fresh "
        "sessions' calls. In these runs the priority queue is the engine's own waiting queue, which has no "
        "anti-starvation: the router's starvation rule sees only the time a call waited at the gateway, not in the "
        "engine, so under overload a long session's later turns can wait behind a stream of fresh calls and the TTFT "
        "tail grows.",
        "",
        "What would close the gaps: (1) cache hit rate — more KV per engine relative to traffic, or a KV tier shared "
        "across engines (Mooncake's own answer), since the router can only choose among caches that still hold the "
        "prefix; a longer-memory prefix index helps only if the engines keep the blocks; (2) session completion and "
        "TTFT against least-loaded — workloads whose sessions really continue (the agent workload below, or a trace "
        "reconstructed with a looser turn rule); (3) overload — a signal that separates level-0 calls: the prompt's "
        "prefill cost is known at arrival (non-clairvoyant about outputs, as ATLAS requires) and could seed the "
        "level, and preemptive priority inside the engine (vLLM's priority policy preempts running lower-priority "
        "requests; engine-sim only orders its waiting queue); (4) the overload tail — hold the queue at the gateway "
        "(an engine `max_concurrency` near its batch size) where the anti-starvation bound of policy.md applies, or "
        "feed the engine's queue time back into the session's wait.",
        "",
        "## Closed loop",
        "",
        table(results["closed"], "Mooncake trace, closed loop (seconds)"),
        "![TTFT CDF](ttft-cdf-closed.svg) ![session completion](session-completion-closed.svg) ![cache hit rate](cache-hit-closed.svg)",
        "",
        "## Open loop",
        "",
        table(results["open"], "Mooncake trace, open loop at trace timestamps (seconds)"),
        "![TTFT CDF](ttft-cdf-open.svg) ![session completion](session-completion-open.svg) ![cache hit rate](cache-hit-open.svg)",
        "",
        "## Overload: priority queues vs FCFS, same placement",
        "",
        table(results["overload"], "Mooncake trace, closed loop at 1.5× load (seconds)"),
        "![TTFT CDF](ttft-cdf-overload.svg)",
        "",
        "## Agent programs",
        "",
        "60 sessions arriving at 1.5/s; each runs 1–12 steps (bounded Pareto, α = 1.2: most programs are short, a few long) "
        "of 4 parallel calls (prompts 200–800 words, answers 16–300 tokens) that join; the history grows.",
        "",
        table(results["agent"], "Agent workload (seconds)"),
        "![TTFT CDF](ttft-cdf-agent.svg) ![session completion](session-completion-agent.svg) ![cache hit rate](cache-hit-agent.svg)",
        "",
        f"## The same at time scale {a.small_time_scale:g}",
        "",
        "The gateway's own real overhead is magnified by the time scale; the closed-loop result for the two headline policies at a "
        "smaller factor:",
        "",
        table(results["small-scale"], f"Closed loop at time scale {a.small_time_scale:g} (seconds)"),
        "",
        "Raw records: `docs/results/runs/<run>/{calls,sessions}.jsonl` and `summary.json` (regenerated, not committed); "
        "`comparison.json` holds the summaries.",
        "",
        "Other routers: " + ("`sglang-router` (its `cache_aware` policy, default thresholds) was found and runs on the same fleet "
                             "and workloads as the row `sglang-router`; it does not see sessions, only prompts. "
                             if any(r["label"].endswith("/sglang-router") for rs in results.values() for r in rs)
                             else "`sglang-router` is not installed here, so it has no row. ")
        + "`vllm-router` is not driven by this script yet. (Both are on PyPI; the recipe looks for `sglang-router` on PATH "
        "and in `.tools/routers`.)",
        "",
    ]
    (OUT / "comparison.md").write_text("\n".join(lines))
    summary = {k: [{kk: vv for kk, vv in r.items() if kk != "ttfts"} for r in v] for k, v in results.items()}
    args = {"time_scale": a.time_scale, "small_time_scale": a.small_time_scale, "max_requests": a.max_requests, "trace": a.trace,
            "commit": a.commit, "dirty": a.dirty}
    (OUT / "comparison.json").write_text(json.dumps({"unloaded_ttft": unloaded, "closed_speedup": chosen, "elapsed": elapsed,
                                                     "args": args, "results": summary}, indent=1))
    print(f"wrote {OUT / 'comparison.md'}")


if __name__ == "__main__":
    main()
