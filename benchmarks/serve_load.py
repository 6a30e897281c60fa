"""Load test of `peftlab serve`: N concurrent clients on loopback, micro-batching against
batch size 1, interleaved in one invocation.

Each configuration is a fresh `peftlab serve RUN --max-batch B` process; the clients (threads
of this process, one keep-alive connection each) send one text per request to /v1/classify
and time it. Rounds rotate the order of the configurations. Reported per configuration:
p50 and p99 latency, requests per second, status codes (a 5xx is a failure), and the batch
sizes the server really formed (from its /info).

Usage: python benchmarks/serve_load.py RUN [--requests 1000] [--concurrency 16]
       [--batches 1,32] [--rounds 3] [--tag serve_load_cpu]
Writes benchmarks/results/<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import machine

RESULTS = Path(__file__).parent / "results"
TEXTS_FILE = Path(__file__).resolve().parents[1] / "peftlab" / "quickstart" / "support_tickets.csv"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(run_dir: str, max_batch: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "peftlab", "serve", run_dir, "--port",
                                str(port), "--max-batch", str(max_batch)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit(f"server for {run_dir} did not start")


def client(port: int, texts: list[str], jobs: list[int], latencies: list, statuses: dict,
           lock: threading.Lock) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for job in jobs:
        body = json.dumps({"text": texts[job % len(texts)]})
        start = time.perf_counter()
        connection.request("POST", "/v1/classify", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        elapsed = time.perf_counter() - start
        with lock:
            latencies.append(elapsed)
            statuses[response.status] = statuses.get(response.status, 0) + 1


def load(port: int, texts: list[str], requests: int, concurrency: int) -> dict:
    latencies, statuses, lock = [], {}, threading.Lock()
    shares = [list(range(i, requests, concurrency)) for i in range(concurrency)]
    threads = [threading.Thread(target=client, args=(port, texts, share, latencies, statuses,
                                                     lock)) for share in shares]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"requests": len(latencies), "seconds": round(wall, 3),
            "requests_per_second": round(len(latencies) / wall, 1),
            "p50_ms": round(1000 * ordered[len(ordered) // 2], 1),
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "server_errors": sum(v for k, v in statuses.items() if k >= 500)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a classification run folder")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tag", default="serve_load_cpu")
    args = parser.parse_args()
    with TEXTS_FILE.open(encoding="utf-8") as file:
        texts = [row["text"] for row in csv.DictReader(file)]
    batches = [int(b) for b in args.batches.split(",")]
    records = []
    for round_index in range(args.rounds):
        order = batches[round_index % len(batches):] + batches[:round_index % len(batches)]
        for max_batch in order:
            process, port = start_server(args.run, max_batch)
            try:
                load(port, texts, 2 * args.concurrency, args.concurrency)  # warm-up
                record = {"round": round_index, "max_batch": max_batch,
                          **load(port, texts, args.requests, args.concurrency)}
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                connection.request("GET", "/info")
                record["batches"] = json.loads(connection.getresponse().read())["batches"]
            finally:
                process.terminate()
                process.wait(30)
            records.append(record)
            print(json.dumps(record), flush=True)
    summary = {}
    for max_batch in batches:
        mine = [r for r in records if r["max_batch"] == max_batch]
        summary[max_batch] = {key: {"median": statistics.median(r[key] for r in mine),
                                    "min": min(r[key] for r in mine),
                                    "max": max(r[key] for r in mine)}
                              for key in ("requests_per_second", "p50_ms", "p99_ms")}
        summary[max_batch]["server_errors"] = sum(r["server_errors"] for r in mine)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(
        {"command": " ".join(["python benchmarks/serve_load.py", *sys.argv[1:]]),
         "machine": machine(), "records": records, "summary": summary}, indent=2))
    lines = ["| max batch | requests/s | p50 latency | p99 latency | 5xx | mean batch formed |",
             "|---|---|---|---|---|---|"]
    for max_batch, s in summary.items():
        cells = [f"{s[k]['median']:,.1f} ({s[k]['min']:,.1f}-{s[k]['max']:,.1f})"
                 for k in ("requests_per_second", "p50_ms", "p99_ms")]
        formed = statistics.median(r["batches"]["mean_size"] for r in records
                                   if r["max_batch"] == max_batch)
        lines.append(f"| {max_batch} | {cells[0]} | {cells[1]} ms | {cells[2]} ms | "
                     f"{s['server_errors']} | {formed:.1f} |")
    (RESULTS / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
