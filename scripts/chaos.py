#!/usr/bin/env python3
"""Fault scenarios under load: what a crash or a hang costs Tether.

Regenerates docs/results/chaos.md and chaos.json.

Every scenario starts a fresh Tether system (four engine-sims, nats-server
with JetStream, session-state, scheduler, ingress; fresh ports, fresh store
directory), runs one agent workload through the ingress with tether-loadgen,
injects one fault FAULT_AT wall seconds after the load starts, and, once the
load is over and the system has drained, checks every session the load
generator sent against the system's own view of it
(`GET /v1/tether/sessions/<id>`): a session is *lost* when the system does
not know it, counts fewer dispatched calls than the client saw answered, or
still holds calls in flight; *double-applied* when it counts more calls than
the client sent.

Scenarios (name: fault):
  none                 no fault (the reference row)
  scheduler kill       kill -9 the scheduler, restart it 3 s later
  nats restart         kill -9 nats-server, restart it on the same port and store 5 s later
  session-state kill   kill -9 session-state, restart it 3 s later (durable: stream + snapshots)
  engine kill          kill -9 engine sim-1, restart it (same port, same args) 5 s later
  hung engine          SIGSTOP sim-1 for 10 s, then SIGCONT (ingress --engine-ttfb-timeout-secs 2)
  cluster node loss    3-node NATS cluster, streams with 3 replicas; kill -9 one node for good

Usage: scripts/chaos.py [--only name1,name2] [--out DIR] [--report-only]
Names may be written with spaces or hyphens (`--only engine-kill,none`). The
whole set takes about 3-4 minutes on 2 cores. Each scenario's logs, the load
generator's records and the session checks stay in
<out>/runs/chaos/<scenario>/ (not committed). `just chaos [ARGS]` builds and
runs it.
"""
import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import compare  # noqa: E402
from compare import BIN, MODEL, ROOT, free_port, http_ok, wait_until  # noqa: E402

# =====================================================================
# The set-up. Edit here.
# =====================================================================
SCALE = 2.0                # simulated seconds per wall second: engines, ingress, load generator
ENGINES = 4
FAULT_AT = 6.0             # wall seconds after the load starts
LOAD_WALL_LIMIT = 150.0    # wall seconds before a load run counts as hung
DRAIN_SECS = 15.0          # wall seconds the check waits for the system to settle
LOAD_FLAGS = ["--request-timeout-secs", "300", "--extra-session-headers", "x-claude-code-session-id",
              "agent", "--sessions", "180", "--rate", "6", "--steps", "6", "--fanout", "3",
              "--tool-pause-secs", "0.5", "--seed", "3"]
HUNG_TTFB_SECS = 2         # the hung-engine scenario's ingress --engine-ttfb-timeout-secs
# =====================================================================

NATS_SERVER = os.environ.get("TETHER_NATS_SERVER") or str(ROOT / ".tools" / "venv" / "bin" / "nats-server")
EVENTS_STREAM = "TETHER_EVENTS"   # tether_bus::jetstream::events_stream_name for the default prefix
RUST_LOG = os.environ.get("TETHER_CHAOS_LOG", "info")
# Metric families read after the run (summed over their labels).
INGRESS_METRICS = ["tether_ingress_events_dropped", "tether_ingress_events_retried", "tether_ingress_retries",
                   "tether_ingress_engine_ejections", "tether_ingress_route_fallbacks", "tether_ingress_calls"]
SESSION_METRICS = ["tether_session_events", "tether_session_duplicate_events", "tether_session_snapshots_loaded",
                   "tether_session_consumer_restarts", "tether_session_replay_gaps", "tether_session_sessions"]


def log(msg):
    print(msg, flush=True)


class Exited(RuntimeError):
    """A process ended while we waited for it to become ready."""

    def __init__(self, proc):
        self.proc, self.tail = proc, last_lines(proc.log_path)
        super().__init__(f"{proc.name} exited with {proc.p.returncode} before it was ready: {self.tail}")


def last_lines(path, n=1):
    """The log's last lines that are not a backtrace frame."""
    try:
        lines = [l.strip() for l in path.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [l for l in lines if l and not re.match(r"^(\d+:|at |Stack backtrace)", l)]
    return " / ".join(lines[-n:])


def wait_ready(proc, pred, what, timeout=60.0):
    """wait_until, but fails at once when `proc` exits."""
    def check():
        if not proc.alive():
            raise Exited(proc)
        return pred()
    wait_until(check, what, timeout)


class Proc:
    """One process that a fault can kill (-9), restart with the same
    arguments, pause (SIGSTOP) and resume (SIGCONT). Its output goes to
    `<log_dir>/<name>.log`, appended across restarts."""

    def __init__(self, name, args, log_dir, env=None):
        self.name, self.args = name, [str(a) for a in args]
        self.log_path = log_dir / f"{name}.log"
        self.env = dict(os.environ, RUST_LOG=RUST_LOG, **(env or {}))
        self.p, self.paused, self.starts = None, False, 0

    def start(self):
        with open(self.log_path, "a") as f:
            f.write(f"=== chaos: start #{self.starts + 1} at {time.strftime('%H:%M:%S')}: {' '.join(self.args)}\n")
            f.flush()
            self.p = subprocess.Popen(self.args, stdout=f, stderr=subprocess.STDOUT, env=self.env)
        self.starts += 1
        self.paused = False
        return self

    def alive(self):
        return self.p is not None and self.p.poll() is None

    def kill9(self):
        if self.alive():
            os.kill(self.p.pid, signal.SIGKILL)
            self.p.wait()
        self.paused = False

    def pause(self):
        if self.alive():
            os.kill(self.p.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self):
        if self.alive() and self.paused:
            os.kill(self.p.pid, signal.SIGCONT)
        self.paused = False

    def terminate(self):
        if self.alive():
            if self.paused:
                os.kill(self.p.pid, signal.SIGCONT)
                self.paused = False
            self.p.terminate()

    def wait_stopped(self, timeout=10):
        if self.p is None:
            return
        try:
            self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


class System:
    """A fresh Tether system; every process by name. `cluster`: three
    nats-server nodes instead of one, every stream with three replicas."""

    def __init__(self, run_dir, cluster=False, ingress_args=(), ss_args=(), row=None):
        self.run_dir, self.cluster, self.ingress_args = run_dir, cluster, list(ingress_args)
        self.ss_args = list(ss_args)
        row = {"notes": [], "details": []} if row is None else row
        self.notes, self.details = row["notes"], row["details"]   # short (the table), long (below it)
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="tether-chaos-"))
        self.procs = {}
        self.nats_nodes = []      # [(name, client port, monitoring port)]

    def spawn(self, name, args, env=None):
        p = Proc(name, args, self.run_dir, env).start()
        self.procs[name] = p
        return p

    def __getitem__(self, name):
        return self.procs[name]

    def __enter__(self):
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

    def _start(self):
        self.engine_urls, fleet = [], []
        for i in range(1, ENGINES + 1):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            self.spawn(f"sim-{i}", [BIN / "tether-engine-sim", "--listen", f"127.0.0.1:{port}", "--name", f"sim-{i}",
                                    "--time-scale", SCALE, "--max-model-len", "262144", "--scheduling-policy", "fcfs"])
            self.engine_urls.append(url)
            fleet.append(f'[[engines]]\nname = "sim-{i}"\nurl = "{url}"\nmodels = ["{MODEL}"]\n'
                         'priority = false\ncache_tokens = 400000\n')
        (self.tmp / "fleet.toml").write_text("\n".join(fleet))
        self._start_nats()
        for i, url in enumerate(self.engine_urls, 1):
            wait_ready(self[f"sim-{i}"], lambda: http_ok(url + "/health"), f"sim-{i} at {url}")
        self.nats_env = {"TETHER_NATS_URL": ",".join(f"nats://127.0.0.1:{p}" for _, p, _ in self.nats_nodes)}
        env = dict(self.nats_env, TETHER_FLEET=str(self.tmp / "fleet.toml"))
        ss, sc, port = free_port(), free_port(), free_port()
        self.ss_url, self.sc_url = f"http://127.0.0.1:{ss}", f"http://127.0.0.1:{sc}"
        self.url = f"http://127.0.0.1:{port}"
        ss_args = [BIN / "tether-session-state", "--admin-listen", f"127.0.0.1:{ss}"]
        ss_args += (["--js-replicas", "3"] if self.cluster else []) + self.ss_args
        self.spawn("session-state", ss_args, env)
        wait_ready(self["session-state"], lambda: http_ok(self.ss_url + "/ready"), "session-state")
        if self.cluster:
            self.notes.append("every service given all three node URLs")
        # The same scrape bound as scripts/compare.py (100 ms simulated, at least 50 ms wall).
        scrape = max(compare.MIN_SCRAPE_MS, int(100 / SCALE))
        proc = self.spawn("scheduler", [BIN / "tether-scheduler", "--admin-listen", f"127.0.0.1:{sc}",
                                        "--scrape-interval-ms", scrape], env)
        wait_ready(proc, lambda: http_ok(self.sc_url + "/ready"), "scheduler")
        proc = self.spawn("ingress", [BIN / "tether-ingress", "--listen", f"127.0.0.1:{port}",
                                      "--health-interval-ms", scrape, "--route-timeout-ms", "200",
                                      "--time-scale", SCALE, "--capacity-interval-ms", scrape]
                          + self.ingress_args, env)
        wait_ready(proc, lambda: http_ok(self.url + "/ready"), "ingress")
        probe = json.dumps({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "ready?"}]}).encode()
        wait_until(lambda: http_ok(self.url + "/v1/chat/completions", 5.0, probe,
                                   {"content-type": "application/json", "x-session-id": "chaos-probe"}),
                   f"Tether at {self.url}", timeout=90)
        return self

    def _start_nats(self):
        n = 3 if self.cluster else 1
        ports = [(free_port(), free_port(), free_port()) for _ in range(n)]   # client, cluster, monitoring
        for i, (p, cp, mp) in enumerate(ports, 1):
            name = f"nats-{i}" if self.cluster else "nats"
            args = [NATS_SERVER, "-a", "127.0.0.1", "-p", p, "-m", mp, "-js", "-sd", self.tmp / f"js-{i}"]
            if self.cluster:
                routes = ",".join(f"nats://127.0.0.1:{c}" for j, (_, c, _) in enumerate(ports, 1) if j != i)
                args += ["--server_name", f"n{i}", "--cluster_name", "tether", "--cluster", f"nats://127.0.0.1:{cp}",
                         "--routes", routes]
            self.spawn(name, args)
            self.nats_nodes.append((name, p, mp))
        for name, _, mp in self.nats_nodes:
            wait_ready(self[name], lambda: http_ok(f"http://127.0.0.1:{mp}/healthz?js-enabled-only=true"), name)
        if self.cluster:
            # JetStream in a cluster needs a meta leader before streams can be made.
            wait_until(lambda: all((jsz(mp) or {}).get("meta_cluster", {}).get("leader") for _, _, mp in self.nats_nodes),
                       "the NATS cluster's JetStream meta leader", timeout=60)

    def __exit__(self, *exc):
        # One at a time, the last started first: each service stops (the
        # session-state writes its final snapshots) while NATS is still up.
        # A signal that interrupts this still lets every other process stop.
        interrupted = None
        for p in reversed(list(self.procs.values())):
            try:
                p.terminate()
                p.wait_stopped(10)
            except BaseException as e:
                interrupted = interrupted or e
                if p.alive():
                    p.p.kill()
                    p.p.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if interrupted is not None:
            raise interrupted


def get_json(url, timeout=3.0):
    """(HTTP status, parsed JSON or None); status None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            body = json.loads(e.read() or b"null")
        except Exception:
            body = None
        return e.code, body
    except Exception:
        return None, None


def get_text(url, timeout=3.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode()
    except Exception:
        return None


def jsz(monitor_port, query=""):
    return get_json(f"http://127.0.0.1:{monitor_port}/jsz{query}", 2.0)[1]


def metric_sums(text, names):
    """Each metric family in `names` summed over its labels (prometheus-client
    writes counters as `<name>_total`); families absent from `text` are left out."""
    out = {}
    for line in (text or "").splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name = head.split("{")[0]
        base = name[:-6] if name.endswith("_total") else name
        if base in names:
            try:
                out[base] = out.get(base, 0.0) + float(value)
            except ValueError:
                pass
    return out


def js_state(system):
    """What the first answering NATS node's /jsz says: the JetStream meta
    leader, and each stream's leader (a server name in a cluster), message
    count and last sequence, with its consumers' pending deliveries summed."""
    for name, _, mp in system.nats_nodes:
        if not system[name].alive():
            continue
        j = jsz(mp, "?streams=true&consumers=true")
        if not j:
            continue
        out = {"meta_leader": (j.get("meta_cluster") or {}).get("leader"), "streams": {}}
        for acc in j.get("account_details") or []:
            for st in acc.get("stream_detail") or []:
                cons = st.get("consumer_detail") or []
                out["streams"][st.get("name")] = {
                    "leader": (st.get("cluster") or {}).get("leader"),
                    "messages": (st.get("state") or {}).get("messages"),
                    "last_seq": (st.get("state") or {}).get("last_seq"),
                    "consumers": len(cons),
                    "consumers_pending": sum(c.get("num_pending", 0) for c in cons),
                    "consumers_ack_pending": sum(c.get("num_ack_pending", 0) for c in cons)}
        return out
    return {}


def leaders(js):
    return ", ".join([f"meta {js.get('meta_leader')}"] + [f"{k} {v['leader']}" for k, v in js.get("streams", {}).items()])


# ---------- the faults ----------
# Each runs in the main thread while the load generator runs; `mark` notes
# what was done when (wall seconds after the load started).
def fault_none(system, mark):
    pass


def kill_restart(name, after):
    def fault(system, mark):
        system[name].kill9()
        mark(f"kill -9 {name}")
        time.sleep(after)
        system[name].start()
        mark(f"restart {name}")
    return fault


def fault_hang(system, mark):
    system["sim-1"].pause()
    mark("SIGSTOP sim-1")
    time.sleep(10)
    system["sim-1"].resume()
    mark("SIGCONT sim-1")


def fault_node_loss(system, mark):
    """Kills the node that leads the events stream (n1 when /jsz does not
    say): the harder case, and the same one every run."""
    before = js_state(system)
    leader = (before.get("streams", {}).get(EVENTS_STREAM) or {}).get("leader") or "n1"
    victim = f"nats-{leader[1:]}" if leader[1:].isdigit() else "nats-1"
    system.victim = victim
    system.details.append("leaders before the kill: " + leaders(before))
    system[victim].kill9()
    mark(f"kill -9 {victim} (server n{victim[5:]}, the {EVENTS_STREAM} leader), not restarted")
    time.sleep(5)
    after = js_state(system)
    system.details.append("5 s after: " + leaders(after))
    system.notes.append(f"killed the {EVENTS_STREAM} leader n{victim[5:]} (leaders after it: see Details)")


SCENARIOS = [
    {"name": "none", "fault": "no fault (the reference row)", "run": fault_none},
    {"name": "scheduler kill", "fault": "kill -9 the scheduler, restart after 3 s",
     "run": kill_restart("scheduler", 3)},
    {"name": "nats restart", "fault": "kill -9 nats-server, restart on the same port and store after 5 s",
     "run": kill_restart("nats", 5)},
    {"name": "session-state kill", "fault": "kill -9 session-state, restart after 3 s",
     "run": kill_restart("session-state", 3), "session_state_args": ["--snapshot-interval-ms", "2000"],
     # At the default 10 s the kill (about 8 s after start) comes before any
     # snapshot, and the restart replays the whole stream only.
     "note": "session-state `--snapshot-interval-ms 2000` (default 10000), so that the restart loads snapshots "
             "and replays the stream after them"},
    {"name": "engine kill", "fault": "kill -9 engine sim-1, restart (same port, same args) after 5 s",
     "run": kill_restart("sim-1", 5)},
    {"name": "hung engine", "fault": "SIGSTOP sim-1 for 10 s, then SIGCONT", "run": fault_hang,
     "ingress_args": ["--engine-ttfb-timeout-secs", str(HUNG_TTFB_SECS)],
     "note": f"ingress `--engine-ttfb-timeout-secs {HUNG_TTFB_SECS}` (wall seconds; default 30)"},
    {"name": "cluster node loss", "fault": "3-node NATS cluster, session-state `--js-replicas 3`; kill -9 the node "
     "leading the events stream, not restarted", "run": fault_node_loss, "cluster": True},
]


def slug(name):
    return name.lower().replace(" ", "-").replace("_", "-")


# ---------- one scenario ----------
def pct(values, q):
    """Nearest-rank percentile."""
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(-(-q * len(v) // 1)) - 1))
    return v[k]


def read_jsonl(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def call_failed(c):
    return c.get("status") != 200 or bool(c.get("error"))


def check_sessions(system, calls, sessions):
    """Polls every session's view until nothing is in flight and nothing is
    short (or DRAIN_SECS pass); returns the counts and the last views."""
    sent, ok = {}, {}
    for c in calls:
        s = c["session"]
        sent[s] = sent.get(s, 0) + 1
        ok[s] = ok.get(s, 0) + (0 if call_failed(c) else 1)
    ids = sorted({s["session"] for s in sessions} | set(sent))
    deadline = time.time() + DRAIN_SECS
    while True:
        views, res = {}, {"lost": [], "missing": 0, "short": 0, "in_flight": 0, "unanswered": 0, "double": []}
        for sid in ids:
            status, body = get_json(f"{system.url}/v1/tether/sessions/{urllib.parse.quote(sid, safe='')}")
            views[sid] = {"status": status, "view": body}
            lost = None
            if status == 404:
                lost, key = "missing", "missing"
            elif status != 200 or not isinstance(body, dict):
                lost, key = f"unanswered ({status})", "unanswered"
            else:
                req, inflight = body.get("requests", 0), body.get("in_flight", 0)
                if req < ok.get(sid, 0):
                    lost, key = f"requests {req} < {ok.get(sid, 0)} answered", "short"
                elif inflight > 0:
                    lost, key = f"in_flight {inflight}", "in_flight"
                if req > sent.get(sid, 0):
                    res["double"].append({"session": sid, "requests": req, "sent": sent.get(sid, 0)})
            if lost:
                res[key] += 1
                res["lost"].append({"session": sid, "why": lost, "sent": sent.get(sid, 0), "ok": ok.get(sid, 0),
                                    "view": body})
        if not res["lost"] or time.time() > deadline:
            res["checked"] = len(ids)
            res["drain_wait"] = round(DRAIN_SECS - max(0.0, deadline - time.time()), 1)
            return res, views
        time.sleep(1.0)


def run_scenario(sc, runs):
    run_dir = runs / slug(sc["name"])
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    row = {"name": sc["name"], "fault": sc["fault"], "cluster": bool(sc.get("cluster")), "run_dir": str(run_dir.relative_to(ROOT))
           if run_dir.is_relative_to(ROOT) else str(run_dir), "events": [], "notes": [], "details": []}
    if sc.get("note"):
        row["notes"].append(sc["note"])
    t_start = time.time()
    try:
        with System(run_dir, cluster=sc.get("cluster", False), ingress_args=sc.get("ingress_args", []),
                    ss_args=sc.get("session_state_args", []), row=row) as system:
            out = run_dir / "load"
            load = system.spawn("loadgen", [BIN / "tether-loadgen", "--base-url", system.url, "--model", MODEL,
                                            "--time-scale", SCALE, "--out", out, "--label", slug(sc["name"])]
                                + LOAD_FLAGS)
            t0 = time.time()

            def mark(what):
                row["events"].append({"at": round(time.time() - t0, 2), "what": what})
                log(f"    {time.time() - t0:5.1f} s  {what}")

            while time.time() < t0 + FAULT_AT and load.alive():
                time.sleep(0.05)
            if not load.alive():
                row["notes"].append("the load ended before the fault")
            sc["run"](system, mark)
            try:
                load.p.wait(timeout=max(1.0, t0 + LOAD_WALL_LIMIT - time.time()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"the load ran over {LOAD_WALL_LIMIT:.0f} s wall")
            row["load_wall_s"] = round(time.time() - t0, 1)
            if load.p.returncode != 0:
                raise RuntimeError(f"tether-loadgen exited with {load.p.returncode} (see {load.log_path})")
            calls = read_jsonl(out / "calls.jsonl")
            sessions = read_jsonl(out / "sessions.jsonl")
            if not calls:
                raise RuntimeError("tether-loadgen wrote no calls")
            for name, p in system.procs.items():
                if name != "loadgen" and not p.alive() and name != getattr(system, "victim", None):
                    row["notes"].append(f"{name} was not running after the load")
            check, views = check_sessions(system, calls, sessions)
            (run_dir / "sessions-check.json").write_text(json.dumps({"check": check, "views": views}, indent=1))
            row["ingress_metrics"] = metric_sums(get_text(system.url + "/metrics"), INGRESS_METRICS)
            row["session_state_metrics"] = metric_sums(get_text(system.ss_url + "/metrics"), SESSION_METRICS)
            row["jetstream_after"] = js_state(system)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
        row["details"].append(traceback.format_exc().strip().splitlines()[-1])
        (run_dir / "error.txt").write_text(traceback.format_exc())
        row["wall_s"] = round(time.time() - t_start, 1)
        return row
    # Events still unacknowledged when the ingress stopped (it logs them and
    # counts them dropped then, after the metrics above were read).
    m = re.findall(r"events not acknowledged by the stream in time.*?unacknowledged=(\d+)",
                   re.sub(r"\x1b\[[0-9;]*m", "", (run_dir / "ingress.log").read_text(errors="replace")))
    row["events_unacked_at_shutdown"] = sum(int(x) for x in m)
    failed = [c for c in calls if call_failed(c)]
    good = [c for c in calls if not call_failed(c)]
    ttfts = [c["ttft"] for c in good if c.get("ttft") is not None]
    e2es = [c["e2e"] for c in calls if c.get("e2e") is not None]
    errs = {}
    for c in failed:
        k = f"{c.get('status')}: {str(c.get('error') or '')[:120]}"
        errs[k] = errs.get(k, 0) + 1
    row.update({
        "calls": len(calls), "failed": len(failed), "failure_share": len(failed) / len(calls),
        "ttft_p99": pct(ttfts, 0.99), "ttft_max": max(ttfts, default=None), "e2e_max": max(e2es, default=None),
        "e2e_p99": pct(e2es, 0.99), "sessions": check["checked"],
        "sessions_lost": len(check["lost"]), "sessions_missing": check["missing"], "sessions_short": check["short"],
        "sessions_in_flight": check["in_flight"], "sessions_unanswered": check["unanswered"],
        "double_applied": len(check["double"]), "lost_samples": check["lost"][:10],
        "double_samples": check["double"][:10], "drain_wait_s": check["drain_wait"],
        "failure_kinds": dict(sorted(errs.items(), key=lambda kv: -kv[1])[:8]),
        "slowest_calls": [{k: c.get(k) for k in ("session", "step", "branch", "engine", "status", "ttft", "e2e")}
                          for c in sorted(calls, key=lambda c: -(c.get("e2e") or 0))[:50]],
        "wall_s": round(time.time() - t_start, 1),
    })
    return row


# ---------- the report ----------
def f3(v):
    return "–" if v is None else (f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}")


def table(rows):
    ref = next((r for r in rows if r["name"] == "none" and "error" not in r), None)
    head = ["scenario", "fault", "calls", "failed", "failure share", "TTFT p99", "TTFT max", "e2e max",
            "max added latency", "sessions lost", "double-applied", "events dropped", "events stored", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['fault']} | ERROR | | | | | | | | | | | {r['error'][:200]} |")
            continue
        added = "–" if ref is None or r["name"] == "none" else f"{r['e2e_max'] - ref['e2e_max']:+.2f}"
        dropped = r["ingress_metrics"].get("tether_ingress_events_dropped")
        dropped = "–" if dropped is None else f"{dropped:.0f}"
        ev = (r.get("jetstream_after") or {}).get("streams", {}).get(EVENTS_STREAM)
        stored = "–" if not ev else f"{ev['messages']} / {expected_events(r)}"
        lost = str(r["sessions_lost"])
        parts = [f"{r[k]} {what}" for k, what in [("sessions_missing", "missing"), ("sessions_short", "short"),
                                                  ("sessions_in_flight", "in flight"),
                                                  ("sessions_unanswered", "unanswered")] if r[k]]
        if parts:
            lost += " (" + ", ".join(parts) + ")"
        notes = list(r["notes"])
        if r.get("events_unacked_at_shutdown"):
            notes.append(f"the ingress still held {r['events_unacked_at_shutdown']} unacknowledged events when it was "
                         "stopped")
        notes += [", ".join(f"{e['at']:.1f} s {e['what']}" for e in r["events"])] if r["events"] else []
        lines.append("| " + " | ".join([
            r["name"], r["fault"], str(r["calls"]), str(r["failed"]), f"{r['failure_share']:.1%}",
            f3(r["ttft_p99"]), f3(r["ttft_max"]), f3(r["e2e_max"]), added, lost, str(r["double_applied"]),
            dropped, stored, "; ".join(notes)]) + " |")
    return "\n".join(lines)


def expected_events(r):
    """Two lifecycle events (dispatched, finished) per call, the readiness probe's included."""
    return 2 * (r["calls"] + 1)


def write_report(out, meta, rows):
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps({"meta": meta, "scenarios": rows}, indent=1))
    load = " ".join(LOAD_FLAGS)
    L = [
        "# Fault scenarios under load",
        "",
        f"Generated by `just chaos` (`scripts/chaos.py`{' --only ' + ','.join(meta['only']) if meta['only'] else ''}), "
        f"started {meta['started']} UTC, commit `{meta['commit']}`"
        f"{' (with uncommitted changes)' if meta['dirty'] else ''}, on {meta['machine']}; it took "
        f"{meta['elapsed'] / 60:.1f} minutes. **Do not edit by hand**: rerun the recipe. Raw numbers: "
        "[chaos.json](chaos.json).",
        "",
        "## Set-up",
        "",
        f"Each scenario starts a fresh system: {ENGINES} engine-sims (FCFS, `--time-scale {SCALE:g}`), nats-server "
        "with JetStream (`-js -sd <fresh dir>`), session-state (durable, the default: the JetStream events stream and "
        "shard snapshots), scheduler (strategy `tether`) and ingress (`--time-scale "
        f"{SCALE:g}`), all on loopback with fresh ports, as `scripts/compare.py` starts Tether. One load run per "
        f"scenario: `tether-loadgen --time-scale {SCALE:g} {load}` (session id in `x-session-id`). The fault is "
        f"injected {FAULT_AT:g} s (wall) after the load starts; the notes give when each step happened (wall seconds "
        "after the load started).",
        "",
        "- *calls*, *failed*: calls sent; calls with a status other than 200 or an error (connection cut, timeout).",
        "- *TTFT p99 / max* over the calls that succeeded, *e2e max* over all calls, and *max added latency* (that "
        "scenario's max e2e − the `none` scenario's): **simulated seconds**, as tether-loadgen reports them "
        f"(wall × {SCALE:g}).",
        f"- *sessions lost*: after the load, the check waits until the system has settled (up to {DRAIN_SECS:g} s), "
        "then asks the ingress for every session (`GET /v1/tether/sessions/<id>`). Lost: the system does not know "
        "the session (404, *missing*), it counts fewer calls (`requests`) than the client got answers for (*short*), "
        "or it still holds calls in flight (*in flight*); *unanswered*: the view could not be read. *double-applied*: "
        "it counts more calls than the session sent.",
        "- *events dropped*: the ingress's `tether_ingress_events_dropped` (lifecycle events it gave up on) when "
        "the check ends. *events stored*: messages in the JetStream events stream after the check, against two "
        "lifecycle events (dispatched, finished) per call. Events the ingress still held unacknowledged when it "
        "was stopped afterwards (it logs them, and drops them then) are in the notes.",
        "",
        "## Results",
        "",
        table(rows),
        "",
    ]
    detail = []
    ref = next((r for r in rows if r["name"] == "none" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            detail.append(f"- **{r['name']}**: failed: {r['error']}" + "".join(f". {d}" for d in r["details"]) + ".")
            continue
        bits = list(r["details"])
        if r["failure_kinds"]:
            bits.append("failures: " + "; ".join(f"{n}× `{k}`" for k, n in r["failure_kinds"].items()))
        if ref is not None and r is not ref:
            slow = [c for c in r["slowest_calls"] if (c["e2e"] or 0) > 2 * ref["e2e_max"]]
            if slow:
                by = {}
                for c in slow:
                    by[c["engine"]] = by.get(c["engine"], 0) + 1
                bits.append(f"{len(slow)}{'+' if len(slow) == len(r['slowest_calls']) else ''} calls took over twice "
                            f"the reference's max e2e ({2 * ref['e2e_max']:.1f} s), by engine: "
                            + ", ".join(f"{k} {v}" for k, v in sorted(by.items(), key=lambda kv: str(kv[0]))))
            late = [c for c in r["slowest_calls"] if (c["ttft"] or 0) > 2 * ref["ttft_max"]]
            if late:
                bits.append("calls with a TTFT over twice the reference's max (among the 50 slowest): "
                            + ", ".join(f"{c['ttft']:.1f} s on {c['engine']}" for c in late[:10]))
        im, sm = r["ingress_metrics"], r["session_state_metrics"]
        bits.append("ingress: " + ", ".join(f"{k.removeprefix('tether_ingress_')} {v:g}" for k, v in im.items()))
        bits.append("session-state (since its last start): "
                    + ", ".join(f"{k.removeprefix('tether_session_')} {v:g}" for k, v in sm.items()))
        ev = (r.get("jetstream_after") or {}).get("streams", {}).get(EVENTS_STREAM)
        if ev:
            bits.append(f"{EVENTS_STREAM} after the run: {ev['messages']} messages (last sequence {ev['last_seq']}; "
                        f"two events per call: {expected_events(r)} expected with the readiness probe), its "
                        f"{ev['consumers']} consumers {ev['consumers_pending']} pending, "
                        f"{ev['consumers_ack_pending']} unacknowledged")
        if r.get("cluster"):
            bits.append("leaders after the run: " + leaders(r.get("jetstream_after") or {}))
        detail.append(f"- **{r['name']}** (load {r['load_wall_s']:g} s wall): " + ". ".join(bits) + ".")
    if detail:
        L += ["## Details", "", "Failure kinds, the services' counters after the run, and what the table's notes "
              "abbreviate.", "", *detail, ""]
    L += ["Each scenario's process logs, `calls.jsonl`, `sessions.jsonl`, `summary.json` and the session check "
          "(`sessions-check.json`) stay in `docs/results/runs/chaos/<scenario>/` (regenerated, not committed).", ""]
    (out / "chaos.md").write_text("\n".join(L))


def main():
    compare.exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated scenario names (spaces or hyphens)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"), help="where chaos.md and chaos.json go")
    ap.add_argument("--report-only", action="store_true", help="re-render chaos.md from <out>/chaos.json")
    a = ap.parse_args()
    out = pathlib.Path(a.out).resolve()
    if a.report_only:
        data = json.loads((out / "chaos.json").read_text())
        write_report(out, data["meta"], data["scenarios"])
        print(table(data["scenarios"]))
        return
    wanted = [slug(n.strip()) for n in a.only.split(",") if n.strip()]
    unknown = [w for w in wanted if w not in {slug(s["name"]) for s in SCENARIOS}]
    if unknown:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(slug(s['name']) for s in SCENARIOS)}")
    chosen = [s for s in SCENARIOS if not wanted or slug(s["name"]) in wanted]
    for b in ["tether-engine-sim", "tether-session-state", "tether-scheduler", "tether-ingress", "tether-loadgen"]:
        if not (BIN / b).exists():
            sys.exit(f"{BIN / b} is missing: run `cargo build --release --workspace --bins` (or `just chaos`)")
    commit, dirty = compare.git_state()
    meta = {"started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "commit": commit, "dirty": dirty,
            "machine": f"{platform.machine()} with {os.cpu_count()} cores ({platform.platform()})",
            "only": [s["name"] for s in chosen] if wanted else [], "time_scale": SCALE, "fault_at": FAULT_AT,
            "load_flags": LOAD_FLAGS, "engines": ENGINES}
    t0 = time.time()
    rows = []
    for sc in chosen:
        log(f"== {sc['name']}: {sc['fault']}")
        row = run_scenario(sc, out / "runs" / "chaos")
        rows.append(row)
        if "error" in row:
            log(f"   ERROR: {row['error']} (see {row['run_dir']})")
        else:
            log(f"   {row['calls']} calls, {row['failed']} failed, {row['sessions_lost']} sessions lost, "
                f"{row['double_applied']} double-applied; max e2e {f3(row['e2e_max'])} s (load {row['load_wall_s']} s "
                f"wall, scenario {row['wall_s']} s)")
    meta["elapsed"] = time.time() - t0
    write_report(out, meta, rows)
    print()
    print(table(rows))
    print()
    print(f"wrote {out / 'chaos.md'} and {out / 'chaos.json'}")


if __name__ == "__main__":
    main()
