"""Ingest benchmark: how fast trackpipe takes in events, next to a bare server.

Starts `python -m trackpipe serve` the way a user does (fresh data dir, a registered
write key) and drives it with wrk over loopback:

  batch  POST /v1/batch, 100 ~1 KB Segment track events per request
  track  POST /v1/track, one ~1 KB track event per request

Every event carries a messageId never sent before (bench/wrk/ingest.lua), so
dedup drops nothing. The same loads then hit bench/bare_app.py, a read-the-body,
answer-200 ASGI app on the same uvicorn/httptools/uvloop stack (with trackpipe's
one-write protocol, sources/oneshot.py; --bare-stock serves it with uvicorn's own),
and the ratio trackpipe/bare is printed. After each trackpipe run the events stored (the log's
head, the accepted counter and a row count of log.db after shutdown) are compared
with the events acknowledged. The last line of stdout is one JSON object.

    python bench/ingest.py                       # 15 s per run, 50 connections
    python bench/ingest.py --duration 3 --only track --skip-bare
    python bench/ingest.py --only batch --profile  # + py-spy flamegraph of the batch load
    python bench/ingest.py --only track --skip-bare --profile --profile-all --profile-format raw

Exit status: 0 when every run had no errors and the accounting matched, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
LUA = BENCH / "wrk" / "ingest.lua"
BARE_APP = BENCH / "bare_app.py"
WRITE_KEY = "BENCHKEY"
AUTH = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
BATCH_SIZE = 100
MARK = "@@MID@@"  # replaced per request by the Lua script; see bench/wrk/ingest.lua
LOADS = {"batch": ("/v1/batch", BATCH_SIZE), "track": ("/v1/track", 1)}

# Targets from the issue: printed next to the figures, never asserted.
TARGET_BATCH_EVENTS = 100_000
TARGET_TRACK_RATIO = 0.40
TARGET_TRACK_P99_MS = 20.0
TARGET_RSS_MB = 300.0


# -- request bodies -----------------------------------------------------------

PRODUCTS = [
    ("Monopoly: 3rd Edition", "Games", 19.99), ("Uno Card Game", "Games", 3.49),
    ("Settlers of Catan", "Games", 44.0), ("Wingspan", "Games", 55.5),
    ("Ticket to Ride", "Games", 39.95), ("Pandemic Legacy", "Games", 79.0),
]
EVENT_NAMES = ["Order Completed", "Checkout Started", "Product Added", "Cart Viewed"]


def iso_ms(dt: datetime) -> str:
    """analytics-python style, trimmed to milliseconds: 2024-05-01T12:34:56.789+00:00."""
    return dt.isoformat(timespec="milliseconds")


def track_event(i: int, now: datetime) -> dict:
    """One realistic ~1 KB track event as analytics-python enqueues it."""
    items = [PRODUCTS[(i + k) % len(PRODUCTS)] for k in range(2)]
    products = [{
        "product_id": f"507f1f77bcf86cd79943{(i * 7 + k) % 10000:04d}", "sku": f"G-{3200 + i + k}",
        "name": name, "brand": "Hasbro", "category": cat, "price": price,
        "quantity": 1 + (i + k) % 3, "url": f"https://www.example.com/product/{3200 + i + k}",
        "image_url": f"https://www.example.com/images/{3200 + i + k}.jpg",
    } for k, (name, cat, price) in enumerate(items)]
    total = round(sum(p["price"] * p["quantity"] for p in products), 2)
    return {
        "type": "track",
        "userId": f"user-{100000 + i * 37 % 5000}",
        "anonymousId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench-anonymous-{i}")),
        "event": EVENT_NAMES[i % len(EVENT_NAMES)],
        "properties": {
            "order_id": f"ord-{50314 + i}", "checkout_id": f"chk-{90210 + i}",
            "affiliation": "Google Store", "total": total, "revenue": round(total * 0.9, 2),
            "shipping": 3.0, "tax": round(total * 0.08, 2), "discount": 2.5,
            "coupon": "hasbros", "currency": "USD", "order_source": "web",
            "products": products,
        },
        "context": {"library": {"name": "analytics-python", "version": "2.4.0"}},
        "timestamp": iso_ms(now),
        "integrations": {},
        "messageId": f"{MARK}-{i}",
    }


def body_template(load: str) -> str:
    now = datetime.now(timezone.utc)
    dumps = lambda obj: json.dumps(obj, separators=(",", ":"))  # noqa: E731
    if load == "track":
        return dumps(track_event(0, now))
    # analytics-python 2.x: {"batch": [...], "sentAt": ...}, write key in Basic auth.
    return dumps({"batch": [track_event(i, now) for i in range(BATCH_SIZE)],
                  "sentAt": iso_ms(now)})


# -- servers ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class RSSSampler(threading.Thread):
    """Peak VmRSS of one process, sampled every 100 ms (plus the kernel's VmHWM)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self.hwm_kb = pid, 0, 0
        self._stop = threading.Event()

    def read(self) -> None:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            elif line.startswith("VmHWM:"):
                self.hwm_kb = max(self.hwm_kb, int(line.split()[1]))

    def run(self) -> None:
        while not self._stop.wait(0.1):
            self.read()

    def stop(self) -> None:
        self._stop.set()
        self.read()

    @property
    def peak_mb(self) -> float:
        return max(self.peak_kb, self.hwm_kb) / 1024


class CPUMeter:
    """CPU time of a server's processes over a run, as shares of one core: the event
    loop's process ("api"), the log writer, the consumers process, and how busy the
    whole machine was (1.0 = every core). Read from /proc, so Linux only."""

    ROLES = (("spawn_main", "writer"), ("trackpipe.delivery.process", "consumers"))

    def __init__(self, pid: int):
        self.pid = pid
        self.started = self._snapshot()

    def _processes(self) -> dict[int, str]:
        roles, todo = {self.pid: "api"}, [self.pid]
        while todo:
            parent = todo.pop()
            for task in Path(f"/proc/{parent}/task").glob("*/children"):
                for child in task.read_text().split():
                    try:
                        argv = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
                    except OSError:
                        continue
                    role = next((r for mark, r in self.ROLES if mark.encode() in argv), None)
                    if role is not None:
                        roles[int(child)] = role
                        todo.append(int(child))
        return roles

    def _snapshot(self) -> tuple[float, dict[str, float], list[int]]:
        ticks: dict[str, float] = {}
        for pid, role in self._processes().items():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks[role] = ticks.get(role, 0) + int(fields[11]) + int(fields[12])  # utime+stime
        machine = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return time.monotonic(), ticks, machine

    def shares(self) -> dict[str, float]:
        (t0, a, m0), (t1, b, m1) = self.started, self._snapshot()
        hz, wall = os.sysconf("SC_CLK_TCK"), t1 - t0
        out = {role: round((b.get(role, 0) - a.get(role, 0)) / hz / wall, 2) for role in b}
        total = sum(m1) - sum(m0)
        idle = (m1[3] + m1[4]) - (m0[3] + m0[4])  # idle + iowait
        out["machine_busy"] = round(1 - idle / total, 2) if total else None
        return out


@dataclass
class Server:
    name: str
    argv: list[str]
    workdir: Path
    env: dict = field(default_factory=lambda: dict(os.environ))
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    rss: RSSSampler | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            # Own session: a Ctrl-C at the terminal reaches us, and we stop it in order.
            self.proc = subprocess.Popen([*self.argv, "--port", str(self.port)], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.rss = RSSSampler(self.proc.pid)
        self.rss.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while "
                                   f"starting:\n{self.log_tail()}")
            try:
                if http_get(self.url + "/health", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer /health within 30 s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.rss:
            self.rss.stop()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def trackpipe_server(workdir: Path, token: str) -> tuple[Server, Path]:
    data = workdir / "data"
    add = subprocess.run([sys.executable, "-m", "trackpipe", "sources", "add", "bench",
                          "--write-key", WRITE_KEY, "--data-dir", str(data)],
                         capture_output=True, text=True)
    if add.returncode != 0 or WRITE_KEY not in add.stdout:
        raise RuntimeError(f"`trackpipe sources add` failed ({add.returncode}): "
                           f"{add.stdout}{add.stderr}")
    server = Server("trackpipe", [sys.executable, "-m", "trackpipe", "serve",
                                  "--data-dir", str(data)], workdir)
    server.env["TRACKPIPE_ADMIN_TOKEN"] = token
    return server, data


def bare_server(workdir: Path, stock: bool = False) -> Server:
    return Server("bare", [sys.executable, str(BARE_APP), *(["--stock"] if stock else [])],
                  workdir)


# -- wrk ------------------------------------------------------------------------

def run_wrk(url: str, template: Path, seconds: int, connections: int, threads: int,
            check: bool) -> dict:
    nonce = uuid.uuid4().hex[:12]  # fresh per wrk run: no messageId repeats across runs
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
            "--timeout", "10s", "-s", str(LUA), url, "--", str(template), nonce, AUTH]
    env = {**os.environ, "WRK_CHECK": "1" if check else "0"}
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return json.loads(line[len("WRKJSON "):])


# -- trackpipe's own counts -----------------------------------------------------

METRIC = re.compile(r'^(trackpipe_[a-z_]+)(?:\{([^}]*)\})? ([0-9.eE+-]+)$', re.M)


def scrape(url: str) -> dict:
    """{"accepted": n, "requests": {(endpoint, status): n}, "rejected": {code: n}}."""
    status, text = http_get(url + "/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics answered {status}: {text[:300]!r}")
    out: dict = {"accepted": 0, "requests": {}, "rejected": {}, "discarded": {},
                 "deduplicated": 0}
    for name, labels, value in METRIC.findall(text.decode()):
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels or ""))
        n = int(float(value))
        if name == "trackpipe_events_accepted_total":
            out["accepted"] = n
        elif name == "trackpipe_events_deduplicated_total":
            out["deduplicated"] = n
        elif name == "trackpipe_http_requests_total":
            out["requests"][(lab.get("endpoint"), lab.get("status"))] = n
        elif name == "trackpipe_requests_rejected_total":
            out["rejected"][lab.get("code")] = n
        elif name == "trackpipe_events_discarded_total":
            out["discarded"][lab.get("reason")] = n
    return out


def settle(url: str) -> dict:
    """Metrics once in-flight requests (wrk abandons some at its deadline) are done."""
    last, deadline = None, time.monotonic() + 15
    while time.monotonic() < deadline:
        now = scrape(url)
        if last is not None and now == last:
            return now
        last = now
        time.sleep(0.3)
    return last


def count_rows(data: Path) -> int | None:
    db = data / "log.db"
    if not db.exists():
        return None
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        conn.close()


# -- one benchmark run ----------------------------------------------------------

def non2xx(w: dict) -> int:
    """wrk counts status > 399 itself; the Lua check (--check) counts every non-2xx."""
    return w["bad"] if w["checked"] else w["errors"]["status"]


def socket_errors(w: dict) -> int:
    e = w["errors"]
    return e["connect"] + e["read"] + e["write"] + e["timeout"]


@dataclass
class Result:
    server: str
    load: str
    wrk: dict
    rss_mb: float
    epr: int
    warm: list[dict] = field(default_factory=list)
    probe: dict | None = None
    accounting: dict | None = None
    cpu: dict | None = None  # CPUMeter.shares() over the measured run

    @property
    def runs(self) -> list[dict]:
        """Every wrk run against this server: warm-up, measured, error probe."""
        return [*self.warm, self.wrk, *([self.probe] if self.probe else [])]

    @property
    def seconds(self) -> float:
        return self.wrk["duration_us"] / 1e6

    @property
    def non2xx(self) -> int:
        return non2xx(self.wrk)

    @property
    def socket_errors(self) -> int:
        return socket_errors(self.wrk)

    @property
    def ok_requests(self) -> int:
        return self.wrk["requests"] - self.non2xx

    @property
    def rps(self) -> float:
        return self.ok_requests / self.seconds

    @property
    def events_per_s(self) -> float:
        return self.rps * self.epr

    def ms(self, pct: str) -> float:
        return self.wrk["latency_us"][pct] / 1000

    def line(self) -> str:
        e = self.wrk["errors"]
        return (f"{self.server:9} {self.load:5}  {self.rps:9,.0f} req/s  {self.events_per_s:10,.0f}"
                f" events/s  p50 {self.ms('p50'):7.2f} ms  p99 {self.ms('p99'):7.2f} ms  "
                f"max {self.ms('max'):7.1f} ms  non-2xx {self.non2xx}  socket errors "
                f"{self.socket_errors} (connect {e['connect']} read {e['read']} write "
                f"{e['write']} timeout {e['timeout']})  peak RSS {self.rss_mb:.1f} MB"
                + (f"\n{'':16}CPU (cores): " + "  ".join(f"{k} {v}" for k, v in self.cpu.items())
                   if self.cpu else ""))


class Bench:
    def __init__(self, args):
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="trackpipe-bench-"))
        self.servers: list[Server] = []
        self.failures: list[str] = []
        self.templates = {}
        for load in LOADS:
            path = self.root / f"{load}.json"
            path.write_text(body_template(load))
            self.templates[load] = path

    def size(self, load: str) -> int:
        """Body bytes once the Lua script has filled in the messageIds."""
        return len(self.templates[load].read_text().replace(MARK, "0123456789ab-1-123456"))

    def close(self) -> None:
        for s in self.servers:
            s.stop()
        if not self.args.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def wrk(self, server: Server, load: str, seconds: int, check: bool) -> dict:
        path, _ = LOADS[load]
        return run_wrk(server.url + path, self.templates[load], seconds, self.args.connections,
                       self.args.threads, check)

    def run(self, which: str, load: str) -> Result:
        a = self.args
        workdir = self.root / f"{which}-{load}"
        workdir.mkdir()
        data = None
        if which == "trackpipe":
            server, data = trackpipe_server(workdir, uuid.uuid4().hex)
        else:
            server = bare_server(workdir, self.args.bare_stock)
        self.servers.append(server)
        server.start()
        try:
            warm = [self.wrk(server, load, a.warmup, a.check)] if a.warmup > 0 else []
            profiler = self.start_profiler(server) if (
                a.profile and which == "trackpipe" and load == (a.only or "batch")) else None
            meter = CPUMeter(server.proc.pid)
            main = self.wrk(server, load, a.duration, a.check)
            cpu = meter.shares()
            if profiler:
                self.finish_profiler(profiler)
            result = Result(which, load, main, 0.0, LOADS[load][1], warm, cpu=cpu)
            if any(non2xx(w) for w in result.runs) and not a.check:
                # wrk only counts them: look again, briefly, recording statuses and bodies.
                result.probe = self.wrk(server, load, 2, True)
            if which == "trackpipe":
                metrics = settle(server.url)
                status, body = http_get(server.url + "/ready")
                head = json.loads(body).get("head") if status == 200 else None
                result.accounting = {"metrics": metrics, "head": head, "ready_status": status,
                                     "ready_body": body.decode(errors="replace")[:300]}
        except Exception:
            print(f"--- {server.name} log (tail) ---\n{server.log_tail()}", file=sys.stderr)
            raise
        finally:
            server.stop()
            self.servers.remove(server)
        result.rss_mb = server.rss.peak_mb
        print(result.line(), flush=True)
        if result.accounting is not None:
            result.accounting["rows"] = count_rows(data)
            self.check_accounting(result)
        self.check_errors(result, server)
        return result

    def check_errors(self, r: Result, server: Server) -> None:
        bad = sum(non2xx(w) for w in r.runs)
        sock = sum(socket_errors(w) for w in r.runs)
        if not bad and not sock:
            return
        statuses: dict[str, int] = {}
        samples: dict[str, int] = {}
        for w in r.runs:
            for code, n in w["bad_statuses"].items():
                statuses[code] = statuses.get(code, 0) + n
            for body in w["bad_samples"]:
                samples[body] = samples.get(body, 0) + 1
        what = (f"{r.server} {r.load}: {bad} non-2xx responses and {sock} socket errors "
                f"over {len(r.runs)} wrk run(s)")
        if statuses:
            what += (f"; statuses {statuses}" + (" (in a 2 s re-run that records them)"
                                                 if r.probe else ""))
        for body, n in samples.items():
            what += f"\n    sample{' x%d' % n if n > 1 else ''}: {body}"
        self.failures.append(what)
        tail = server.log_tail(20)
        if tail.strip():
            print(f"--- {server.name} log (tail) ---\n{tail}")

    def check_accounting(self, r: Result) -> None:
        acc, epr = r.accounting, r.epr
        runs = r.runs
        client_ok = sum(w["requests"] - non2xx(w) for w in runs)
        m = acc["metrics"]
        path = LOADS[r.load][0]
        server_ok = m["requests"].get((path, "200"), 0)
        server_other = {s: n for (ep, s), n in m["requests"].items() if s != "200"}
        acc.update(
            acked_events=client_ok * epr, server_acked_events=server_ok * epr,
            stored_events=acc["rows"] if acc["rows"] is not None else acc["head"],
            inflight_at_stop=server_ok - client_ok, server_non200=server_other)
        stored = acc["stored_events"]
        print(f"accounting trackpipe {r.load}: stored {stored:,} (log head {acc['head']}, "
              f"accepted counter {m['accepted']:,}, log.db rows {acc['rows']}) vs acked "
              f"{client_ok * epr:,} by wrk, {server_ok * epr:,} answered 200 by the server "
              f"({server_ok - client_ok} requests in flight when wrk stopped)"
              + (f"; server non-200 {server_other} rejected {m['rejected']}"
                 if server_other else "")
              + (f"; discarded {m['discarded']}" if m["discarded"] else "")
              + (f"; deduplicated {m['deduplicated']}" if m["deduplicated"] else ""))
        problems = []
        if len({stored, acc["head"], m["accepted"], server_ok * epr}) != 1:
            problems.append("stored (log.db rows / head / accepted counter) != 200 answers x "
                            f"{epr} events")
        if stored < client_ok * epr:
            problems.append(f"{client_ok * epr - stored} acknowledged events are missing")
        if not 0 <= server_ok - client_ok <= self.args.connections * len(runs):
            problems.append(f"{server_ok - client_ok} requests answered 200 that wrk did not "
                            "count: more than it could have had in flight")
        if m["discarded"] or m["deduplicated"]:
            problems.append("events were discarded or deduplicated (they should all be new "
                            "and valid)")
        acc["ok"] = not problems
        for p in problems:
            self.failures.append(f"trackpipe {r.load} accounting: {p}")

    # -- py-spy ----------------------------------------------------------------

    def start_profiler(self, server: Server):
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(exe).exists():
            print("--profile: py-spy not found; `pip install py-spy` (skipping the profile)")
            return None
        fmt = self.args.profile_format
        ext = {"flamegraph": "svg", "raw": "txt", "speedscope": "json"}[fmt]
        out = Path(self.args.profile_out or
                   Path(tempfile.gettempdir()) / f"trackpipe-batch-{time.strftime('%H%M%S')}.{ext}")
        argv = [exe, "record", "--pid", str(server.proc.pid), "--duration",
                str(self.args.duration), "--rate", "250", "--nonblocking", "--threads",
                *(["--subprocesses"] if self.args.profile_all else []),
                "--format", fmt, "--output", str(out)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        return proc, out

    def finish_profiler(self, profiler) -> None:
        proc, out = profiler
        try:
            text, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            text, _ = proc.communicate(timeout=10)
        if proc.returncode != 0 or not out.exists():
            print(f"--profile: py-spy failed ({proc.returncode}): {text.strip()[-500:]}")
            return
        print(f"profile of trackpipe under load: {out}")
        if self.args.profile_format == "raw":
            print_top(out)


def print_top(collapsed: Path, n: int = 15) -> None:
    """A `py-spy top`-like summary from collapsed stacks: self and total share per frame."""
    own, total, samples = {}, {}, 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        samples += c
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + c
        for f in set(frames):
            total[f] = total.get(f, 0) + c
    if not samples:
        return
    print(f"{'own %':>6} {'total %':>7}  frame   ({samples} samples, all threads)")
    for f, c in sorted(own.items(), key=lambda kv: -kv[1])[:n]:
        print(f"{100 * c / samples:6.1f} {100 * total[f] / samples:7.1f}  {f[:110]}")


# -- main -----------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--duration", type=int, default=15, help="seconds per measured run (15)")
    p.add_argument("--warmup", type=int, default=1,
                   help="seconds of unmeasured load after start, per run (1; 0 = none)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    p.add_argument("--threads", type=int, default=1,
                   help="wrk threads (1: on 2 cores one wrk thread keeps up with one Python "
                        "process and leaves it the other core)")
    p.add_argument("--only", choices=list(LOADS), help="run only this load")
    p.add_argument("--skip-bare", action="store_true", help="do not run the bare-app ceiling")
    p.add_argument("--bare-stock", action="store_true",
                   help="serve the bare app with uvicorn's own httptools protocol (two writes"
                        " per answer) instead of trackpipe's (sources/oneshot.py)")
    p.add_argument("--check", action="store_true",
                   help="inspect every response in Lua to record non-2xx statuses and sample "
                        "bodies (a little wrk CPU; off: wrk only counts them)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (data dirs, logs)")
    p.add_argument("--profile", action="store_true",
                   help="record the trackpipe run of the batch load (or of --only) with py-spy"
                        " (pip install py-spy)")
    p.add_argument("--profile-format", choices=["flamegraph", "raw", "speedscope"],
                   default="flamegraph", help="flamegraph = svg; raw also prints a top table")
    p.add_argument("--profile-out", help="profile file (default in the system temp dir)")
    p.add_argument("--profile-all", action="store_true",
                   help="--profile the log writer and consumers processes too (py-spy"
                        " --subprocesses; their stacks sit under a frame naming each process)")
    args = p.parse_args(argv)
    if not shutil.which("wrk"):
        print("ingest.py needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    if args.threads > args.connections:
        p.error("--threads must not exceed --connections")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cleanup runs in `finally`
    loads = [args.only] if args.only else list(LOADS)
    bench = Bench(args)
    results: dict[tuple[str, str], Result] = {}
    load_before = os.getloadavg()[0]
    print(f"trackpipe ingest benchmark: {args.duration}s per run (+{args.warmup}s warm-up), "
          f"{args.connections} connections, wrk -t{args.threads}, {os.cpu_count()} cores, "
          f"load average {load_before:.2f}; event ~{bench.size('track'):,} B, batch body "
          f"~{bench.size('batch'):,} B")
    try:
        for load in loads:
            for which in (["bare"] if not args.skip_bare else []) + ["trackpipe"]:
                try:
                    results[(which, load)] = bench.run(which, load)
                except (RuntimeError, OSError, ValueError, sqlite3.Error) as exc:
                    bench.failures.append(f"{which} {load}: {exc}")
                    print(f"FAILED: {which} {load}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted; stopping servers", file=sys.stderr)
        return 130
    finally:
        bench.close()
    print_summary(results, bench.failures, args, load_before)
    return 1 if bench.failures else 0


def print_summary(results: dict, failures: list[str], args, load_before: float) -> None:
    def get(which, load):
        return results.get((which, load))

    def rnd(x, nd=1):
        return None if x is None else round(x, nd)

    tb, tt = get("trackpipe", "batch"), get("trackpipe", "track")
    bb, bt = get("bare", "batch"), get("bare", "track")
    tp = [r for r in (tb, tt) if r]
    summary = {
        "batch_events_per_s": rnd(tb and tb.events_per_s, 0),
        "batch_rps": rnd(tb and tb.rps),
        "batch_p50_ms": rnd(tb and tb.ms("p50"), 2), "batch_p99_ms": rnd(tb and tb.ms("p99"), 2),
        "track_rps": rnd(tt and tt.rps),
        "track_p50_ms": rnd(tt and tt.ms("p50"), 2), "track_p99_ms": rnd(tt and tt.ms("p99"), 2),
        "bare_rps": rnd(bt and bt.rps), "bare_p99_ms": rnd(bt and bt.ms("p99"), 2),
        "bare_batch_rps": rnd(bb and bb.rps),
        "bare_batch_events_per_s": rnd(bb and bb.events_per_s, 0),
        "track_ratio": rnd(tt.rps / bt.rps, 3) if tt and bt and bt.rps else None,
        "batch_ratio": rnd(tb.rps / bb.rps, 3) if tb and bb and bb.rps else None,
        "peak_rss_mb": rnd(max(r.rss_mb for r in tp), 1) if tp else None,
        "batch_peak_rss_mb": rnd(tb and tb.rss_mb), "track_peak_rss_mb": rnd(tt and tt.rss_mb),
        "batch_cpu": tb and tb.cpu, "track_cpu": tt and tt.cpu, "bare_track_cpu": bt and bt.cpu,
        "stored_events": sum(r.accounting["stored_events"] for r in tp),
        "acked_events": sum(r.accounting["acked_events"] for r in tp),
        "server_acked_events": sum(r.accounting["server_acked_events"] for r in tp),
        "inflight_at_stop_events": sum(r.accounting["inflight_at_stop"] * r.epr for r in tp),
        "accounting_ok": all(r.accounting["ok"] for r in tp) if tp else None,
        "non_2xx": sum(r.non2xx for r in results.values()),
        "socket_errors": sum(r.socket_errors for r in results.values()),
        "duration_s": args.duration, "connections": args.connections, "wrk_threads": args.threads,
        "load_average": round(load_before, 2),
        "ok": not failures, "failures": failures,
    }
    print("\ntargets (not asserted):")
    if tb:
        print(f"  batch events/s      {tb.events_per_s:12,.0f}  target >= {TARGET_BATCH_EVENTS:,}"
              f"   {'MET' if tb.events_per_s >= TARGET_BATCH_EVENTS else 'MISSED'}")
    if tt and bt and bt.rps:
        ratio = tt.rps / bt.rps
        print(f"  track / bare rps    {ratio:12.1%}  target >= {TARGET_TRACK_RATIO:.0%}"
              f"          {'MET' if ratio >= TARGET_TRACK_RATIO else 'MISSED'}")
    if tt:
        print(f"  track p99           {tt.ms('p99'):9.2f} ms  target <= {TARGET_TRACK_P99_MS:.0f} ms"
              f"        {'MET' if tt.ms('p99') <= TARGET_TRACK_P99_MS else 'MISSED'}")
    if bb and tb and bb.rps:
        print(f"  batch / bare rps    {tb.rps / bb.rps:12.1%}  (no target)")
    if tp:
        peak = max(r.rss_mb for r in tp)
        print(f"  peak RSS            {peak:9.1f} MB  target < {TARGET_RSS_MB:.0f} MB"
              f"        {'MET' if peak < TARGET_RSS_MB else 'MISSED'}")
        print(f"  stored vs acked     {summary['stored_events']:,} stored, "
              f"{summary['acked_events']:,} acked by wrk, {summary['server_acked_events']:,} "
              "answered 200 (wrk drops requests in flight at its deadline)")
    for f in failures:
        print(f"FAILED: {f}")
        print(f"FAILED: {f}", file=sys.stderr)
    if failures:
        print("(a failed run's figures are not meaningful)")
    print(json.dumps(summary, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    sys.exit(main())
