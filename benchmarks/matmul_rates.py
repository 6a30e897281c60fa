"""fp32 against bf16 matmul rates on this CPU: why `mixed_precision: auto` picks bf16 only
where the CPU has native bf16 (AVX512-BF16 or AMX), and fp32 elsewhere.

Usage: python benchmarks/matmul_rates.py [--size 2048] [--repeats 9]
Writes benchmarks/results/matmul_rates_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import machine

RESULTS = Path(__file__).parent / "results"


def rate(size: int, dtype: torch.dtype, repeats: int) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - tick)
    return 2 * size**3 / statistics.median(times[1:]) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    rates = {}
    for _ in range(3):  # interleaved: a neighbour slows both alike
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            rates.setdefault(name, []).append(rate(args.size, dtype, args.repeats))
    record = {"command": " ".join(["python benchmarks/matmul_rates.py", *sys.argv[1:]]),
              "size": args.size, "gflops": {k: [round(v, 1) for v in vs] for k, vs in
                                            rates.items()},
              "median_gflops": {k: round(statistics.median(vs), 1) for k, vs in rates.items()},
              "machine": machine()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "matmul_rates_cpu.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
