"""Load test of `citrus-edge serve` on loopback: bounded concurrent clients, latency, 503s, RSS.

Starts the service on BUNDLE (a free loopback port; `--url` and `--pid` use one already running
instead), waits for /v1/ready, then runs `--clients` threads, each sending `--requests` requests
one after another (keep-alive), and prints:
- the server's RSS after every 100 requests, and its growth from request 200 to request 1000
  and to the last (the first 200 warm ORT's arenas and the allocator; growth past
  `--max-growth` % fails);
- p50 / p99 latency of the answered requests (client side: send to last byte), requests/s;
- the 503 count (the queue was full; the client waits `--backoff-ms` and sends its next request)
  and errors: any other status, or a failed connection (must be 0).

`--mode ground` (default) posts the image to /v1/ground (the whole model); `--mode frames` opens
one video session per client on it and posts it as frames (SAM2 only, drop-to-keep-up: a
`dropped` answer is a 200 and is counted apart). Exit code 1 when there were errors or the RSS
grew too much. `--json FILE` writes the figures.

    python scripts/load_serve.py out/demo/bundle            # 8 clients x 250 requests
    python scripts/load_serve.py BUNDLE --mode frames --queue-size 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

SERVER = "import sys, citrus_edge.cli.serve_command; from citrus_edge.cli import entry; entry()"
RSS_EVERY = 100


def rss_mib(pid: int) -> float:
    """Resident set size of `pid` from /proc (Linux), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, port: int, queue_size: int, log: Path) -> subprocess.Popen:
    """`citrus-edge serve` in a child process, its output (one access line per request) to
    `log`: a pipe nobody reads would fill and stall the server."""
    cmd = [sys.executable, "-c", SERVER, "serve", str(bundle), "--port", str(port)]
    cmd += ["--queue-size", str(queue_size)]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(
    url: str, server: subprocess.Popen | None, log: Path, timeout_s: float = 300
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}): {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready after {timeout_s:.0f} s")


class Load:
    """Shared counters of the client threads; RSS sampled on every RSS_EVERY-th request."""

    def __init__(self, pid: int, total: int) -> None:
        self.pid, self.total = pid, total
        self.lock = threading.Lock()
        self.latencies_ms: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.done = 0
        self.rss: list[tuple[int, float]] = []

    def record(self, status: str, ms: float) -> None:
        with self.lock:
            self.done += 1
            self.statuses[status] += 1
            if status in ("200", "201", "dropped"):
                self.latencies_ms.append(ms)
            if self.done % RSS_EVERY == 0:
                mib = rss_mib(self.pid)
                self.rss.append((self.done, mib))
                print(
                    f"requests {self.done:5d}/{self.total}: server RSS {mib:7.1f} MiB", flush=True
                )


def client(url: str, args: argparse.Namespace, image: bytes, load: Load, headers: dict) -> None:
    params = {"task": args.task}
    with httpx.Client(base_url=url, timeout=args.timeout, headers=headers) as http:
        path = "/v1/ground"
        if args.mode == "frames":
            session = open_session(http, image, params, args.backoff_ms)
            if session is None:
                load.record("session not opened", 0.0)  # an error: this client sends nothing
                return
            path, params = f"/v1/sessions/{session}/frames", {}
        for _ in range(args.requests):
            t0 = time.perf_counter()
            try:
                r = http.post(path, content=image, params=params)
                status = str(r.status_code)
                if status == "200" and args.mode == "frames" and r.json()["status"] == "dropped":
                    status = "dropped"
            except httpx.HTTPError as e:
                status = f"connection: {type(e).__name__}"
            load.record(status, (time.perf_counter() - t0) * 1e3)
            if status == "503":
                time.sleep(args.backoff_ms / 1e3)


def open_session(http: httpx.Client, image: bytes, params: dict, backoff_ms: float) -> str | None:
    """A session on `image` (its key frame), retrying while the queue is full (503)."""
    for _ in range(1000):
        opened = http.post("/v1/sessions", content=image, params=params)
        if opened.status_code == 201:
            return opened.json()["session"]
        if opened.status_code != 503:
            print(f"no session: {opened.status_code} {opened.text[:300]}", flush=True)
            return None
        time.sleep(backoff_ms / 1e3)
    return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def report(load: Load, seconds: float, args: argparse.Namespace) -> dict:
    errors = sum(n for s, n in load.statuses.items() if s not in ("200", "503", "dropped"))
    rss = dict(load.rss)
    first = 200 if 200 in rss else min(rss, default=0)
    growth = {  # percent from request `first` to request 1000 (the acceptance) and to the last
        to: 100 * (rss[to] - rss[first]) / rss[first]
        for to in (1000, max(rss, default=0))
        if to in rss
    }
    lat = load.latencies_ms
    figures = {
        "mode": args.mode,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "queue_size": args.queue_size,
        "requests": load.done,
        "seconds": round(seconds, 1),
        "requests_per_s": round(load.done / seconds, 2),
        "p50_ms": round(statistics.median(lat), 1) if lat else None,
        "p99_ms": round(percentile(lat, 99), 1) if lat else None,
        "statuses": dict(load.statuses),
        "n_503": load.statuses.get("503", 0),
        "n_dropped": load.statuses.get("dropped", 0),
        "errors": errors,
        "rss_mib": {str(k): round(v, 1) for k, v in load.rss},
        "rss_growth_pct": {f"{first}-{to}": round(g, 2) for to, g in growth.items()},
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
    }
    print(
        f"{load.done} requests in {seconds:.1f} s ({figures['requests_per_s']} /s), "
        f"{args.clients} clients: p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms; "
        f"503: {figures['n_503']}; dropped frames: {figures['n_dropped']}; errors: {errors}"
    )
    for to, g in growth.items():
        print(f"server RSS {rss[first]:.1f} MiB at request {first} -> {rss[to]:.1f} MiB at "
              f"request {to}: growth {g:+.2f} % (limit {args.max_growth} %)")  # fmt: skip
    print(f"machine: {figures['cpu']}, {figures['cpus']} CPUs")
    return figures


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path, nargs="?", help="bundle to serve (omit with --url)")
    p.add_argument("--url", help="a running service (with --pid) instead of starting one")
    p.add_argument("--pid", type=int, help="process id of the service at --url (for RSS)")
    p.add_argument("--token-file", type=Path, help="bearer token of the service at --url")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=250, help="per client")
    p.add_argument("--mode", choices=("ground", "frames"), default="ground")
    p.add_argument("--task", default="segment", choices=("segment", "detect", "report"))
    p.add_argument("--image", type=Path, help="DICOM/PNG/JPEG to send (default: pydicom's "
                   "ultrasound example rgb_color, 240 x 320)")  # fmt: skip
    p.add_argument("--queue-size", type=int, default=8, help="the started server's queue")
    p.add_argument("--timeout", type=float, default=120.0, help="client timeout, s")
    p.add_argument("--backoff-ms", type=float, default=50.0, help="pause after a 503")
    p.add_argument("--max-growth", type=float, default=5.0, help="RSS growth limit, percent")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--server-log", type=Path, default=Path("/tmp/load_serve.server.log"),
                   help="the started server's output")  # fmt: skip
    args = p.parse_args(argv)
    if (args.bundle is None) == (args.url is None):
        p.error("give a BUNDLE to serve, or --url and --pid of a running service")
    if args.url and args.pid is None:
        p.error("--url needs --pid (the RSS is read from /proc/PID)")
    if args.image is None:
        from pydicom import examples

        args.image = Path(examples.get_path("rgb_color"))
    image = args.image.read_bytes()
    headers = {}
    if args.token_file:
        headers["Authorization"] = f"Bearer {args.token_file.read_text().strip()}"
    server = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        port = free_port()
        server = start_server(args.bundle, port, args.queue_size, args.server_log)
        url, pid = f"http://127.0.0.1:{port}", server.pid
    try:
        wait_ready(url, server, args.server_log)
        load = Load(pid, args.clients * args.requests)
        print(f"{url}: {args.clients} clients x {args.requests} requests ({args.mode}, "
              f"{args.image.name}, {len(image)} bytes); server pid {pid}", flush=True)  # fmt: skip
        t0 = time.perf_counter()
        threads = [
            threading.Thread(target=client, args=(url, args, image, load, headers))
            for _ in range(args.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        figures = report(load, time.perf_counter() - t0, args)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    growths = figures["rss_growth_pct"].values()
    ok = figures["errors"] == 0 and all(g < args.max_growth for g in growths)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
