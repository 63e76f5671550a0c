#!/usr/bin/env python3
"""What a router adds, side by side: `just bench-overhead`.

One instant backend (tether-instant-backend: every call answered at once)
and, in front of it, each router: Tether (the whole system: nats-server,
session-state, scheduler, ingress, default policy), sglang-router and
vllm-router (pinned, in .tools/routers), and the backend called directly.
All run at once on this machine; the targets are measured in turn, in
alternating rounds, with the same settings:

1. throughput and latency, non-streaming: `wrk` with N connections posting a
   small chat completion with a rotating x-session-id;
2. added time to the first streamed token: one request at a time, targets
   interleaved, the time from sending the request to reading the first
   `data:` line, minus the direct path's median.

Prints a table per measure and Tether's ratio to each peer. Figures are
what this machine gave in this run; report them as ratios.
"""

import argparse
import http.client
import json
import os
import pathlib
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from compare import BIN, ROOT, ROUTERS, Procs, exit_on_sigterm, free_port, http_ok, wait_until  # noqa: E402

MODEL = "tether-sim"

WRK_LUA = r"""
local n = 0
request = function()
  n = n + 1
  local body = '{"model":"tether-sim","max_tokens":8,"messages":[{"role":"user","content":"hello there, how are you?"}]}'
  return wrk.format("POST", "/v1/chat/completions",
    {["content-type"] = "application/json", ["x-session-id"] = "s" .. (n % 4096)}, body)
end
"""


def probe(url):
    body = json.dumps({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "ready?"}]}).encode()
    return http_ok(url + "/v1/chat/completions", 5.0, body,
                   {"content-type": "application/json", "x-session-id": "overhead-probe"})


def start(procs, tmp, systems):
    """Starts the backend and every router; returns {target name: base url}."""
    bport = free_port()
    backend = f"http://127.0.0.1:{bport}"
    procs.spawn("backend", [BIN / "tether-instant-backend", "--listen", f"127.0.0.1:{bport}", "--model", MODEL])
    wait_until(lambda: http_ok(backend + "/health"), "instant backend")
    targets = {"direct": backend}
    if "tether" in systems:
        (tmp / "fleet.toml").write_text(
            f'[[engines]]\nname = "instant"\nurl = "{backend}"\nmodels = ["{MODEL}"]\n'
            "priority = false\nmax_concurrency = 4096\n")
        nats_port = free_port()
        nats = os.environ.get("TETHER_NATS_SERVER") or str(ROOT / ".tools" / "venv" / "bin" / "nats-server")
        procs.spawn("nats", [nats, "-a", "127.0.0.1", "-p", nats_port, "-js", "-sd", tmp / "js"])
        env = {"TETHER_NATS_URL": f"nats://127.0.0.1:{nats_port}", "TETHER_FLEET": str(tmp / "fleet.toml")}
        ss, sc, ip = free_port(), free_port(), free_port()
        procs.spawn("session-state", [BIN / "tether-session-state", "--admin-listen", f"127.0.0.1:{ss}"], env)
        wait_until(lambda: http_ok(f"http://127.0.0.1:{ss}/ready"), "session-state")
        procs.spawn("scheduler", [BIN / "tether-scheduler", "--admin-listen", f"127.0.0.1:{sc}"], env)
        wait_until(lambda: http_ok(f"http://127.0.0.1:{sc}/ready"), "scheduler")
        procs.spawn("ingress", [BIN / "tether-ingress", "--listen", f"127.0.0.1:{ip}"], env)
        targets["tether"] = f"http://127.0.0.1:{ip}"
        wait_until(lambda: http_ok(targets["tether"] + "/ready"), "tether ingress")
    for name, kind, policy in [("sglang-router cache_aware", "sglang", "cache_aware"),
                               ("vllm-router consistent_hash", "vllm", "consistent_hash"),
                               ("vllm-router cache_aware", "vllm", "cache_aware")]:
        if name not in systems:
            continue
        port = free_port()
        if kind == "sglang":
            args = [ROUTERS / "python", "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", port,
                    "--worker-urls", backend, "--policy", policy, "--prometheus-port", free_port(),
                    "--log-level", "warn"]
        else:
            args = [ROUTERS / "vllm-router", "--host", "127.0.0.1", "--port", port, "--worker-urls", backend,
                    "--policy", policy, "--prometheus-port", free_port(), "--log-level", "warning"]
        procs.spawn(name.replace(" ", "-"), args)
        targets[name] = f"http://127.0.0.1:{port}"
    for name, url in targets.items():
        wait_until(lambda: probe(url), name, timeout=90)
    return targets


UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_wrk(out):
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {}
    for p, v, u in re.findall(r"^\s+(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        lat[p] = float(v) * UNITS[u]
    errors = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", out))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return {"rps": rps, "p50": lat.get("50"), "p99": lat.get("99"), "errors": errors}


def wrk(url, conns, secs, lua):
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--latency", "-s", lua, url],
                         capture_output=True, text=True, timeout=secs + 60).stdout
    return parse_wrk(out)


def first_token(target, session):
    """Seconds from connecting to reading the first `data:` line, on a fresh
    connection (as `curl` measures; a kept-alive connection measured
    sglang-router's delayed-ACK stall, ~40 ms, rather than its routing)."""
    body = json.dumps({"model": MODEL, "max_tokens": 8, "stream": True,
                       "messages": [{"role": "user", "content": "hello there, how are you?"}]}).encode()
    conn = http.client.HTTPConnection(target.removeprefix("http://"), timeout=30)
    t = time.perf_counter()
    conn.connect()
    # Headers and body go in one segment (a bytes body), without Nagle's
    # delay: the client must not be what is measured.
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        conn.request("POST", "/v1/chat/completions", body,
                     {"content-type": "application/json", "x-session-id": session})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"status {r.status}")
        while True:
            line = r.readline()
            if not line:
                raise RuntimeError("stream ended before a data line")
            if line.startswith(b"data:"):
                dt = time.perf_counter() - t
                break
        r.read()
    finally:
        conn.close()
    return dt


def main():
    exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--seconds", type=int, default=10, help="per wrk run")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of wrk runs")
    ap.add_argument("--ttft-requests", type=int, default=200, help="streaming requests per target")
    ap.add_argument("--systems", default="tether,sglang-router cache_aware,vllm-router consistent_hash,"
                                         "vllm-router cache_aware")
    ap.add_argument("--out", help="also write the results as JSON here")
    a = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk not found: `just bench-overhead` installs it (apt-get install wrk)")
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="tether-overhead-"))
    procs = Procs(tmp)
    lua = tmp / "post.lua"
    lua.write_text(WRK_LUA)
    try:
        targets = start(procs, tmp, systems)
        names = list(targets)
        print(f"targets: {', '.join(names)}; wrk -t1 -c{a.connections} -d{a.seconds}s × {a.rounds} rounds",
              flush=True)
        runs = {n: [] for n in names}
        for r in range(a.rounds):
            order = names if r % 2 == 0 else list(reversed(names))
            for n in order:
                res = wrk(targets[n] + "/v1/chat/completions", a.connections, a.seconds, lua)
                runs[n].append(res)
                print(f"  round {r + 1} {n:30s} {res['rps']:9.0f} req/s  p50 {res['p50'] * 1e3:6.2f} ms  "
                      f"p99 {res['p99'] * 1e3:6.2f} ms  errors {res['errors']}", flush=True)
        # Streaming: one request at a time, targets interleaved.
        ttft = {n: [] for n in names}
        for n in names:  # warm up
            for i in range(5):
                first_token(targets[n], f"warm-{i}")
        for i in range(a.ttft_requests):
            for n in (names if i % 2 == 0 else list(reversed(names))):
                ttft[n].append(first_token(targets[n], f"t{i % 64}"))
    finally:
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def med(xs):
        return statistics.median(xs) if xs else float("nan")

    summary = {}
    for n in names:
        summary[n] = {
            "rps": med([x["rps"] for x in runs[n]]),
            "p50_ms": med([x["p50"] for x in runs[n]]) * 1e3,
            "p99_ms": med([x["p99"] for x in runs[n]]) * 1e3,
            "errors": sum(x["errors"] for x in runs[n]),
            "ttft_ms": med(ttft[n]) * 1e3,
        }
    direct = summary["direct"]["ttft_ms"]
    print()
    print(f"| target | req/s | p50 ms | p99 ms | errors | streaming TTFT ms | added ms |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        s = summary[n]
        s["added_ms"] = s["ttft_ms"] - direct
        added = "–" if n == "direct" else f"{s['added_ms']:+.2f}"
        print(f"| {n} | {s['rps']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['errors']} | "
              f"{s['ttft_ms']:.2f} | {added} |")
    if "tether" in summary:
        t = summary["tether"]
        print()
        for n in names:
            if n in ("direct", "tether"):
                continue
            p = summary[n]
            print(f"tether / {n}: throughput {t['rps'] / p['rps']:.2f}×, p50 {t['p50_ms'] / p['p50_ms']:.2f}×, "
                  f"added TTFT {t['added_ms'] / p['added_ms']:.2f}×" if p["added_ms"] > 0 else
                  f"tether / {n}: throughput {t['rps'] / p['rps']:.2f}×, p50 {t['p50_ms'] / p['p50_ms']:.2f}×")
    if a.out:
        pathlib.Path(a.out).write_text(json.dumps({"settings": vars(a), "summary": summary, "runs": runs,
                                                   "ttft_samples_ms": {n: [x * 1e3 for x in v]
                                                                       for n, v in ttft.items()}}, indent=1))


if __name__ == "__main__":
    main()
