"""What this machine can do fast, and how much memory a run took."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def resolve_precision(value: str, use_cpu: bool) -> str:
    """auto -> bf16 where the hardware runs it fast (CUDA bf16, CPU with AVX512-BF16/AMX)."""
    if value != "auto":
        return value
    if torch.cuda.is_available() and not use_cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "no"


# "1" makes `auto` precision act as on a CPU with native bf16, "0" as on one without: the
# bf16 path is then exercised (emulated: slower, but the same numbers) on any host, and a
# bf16 host can run what a host without it runs
FORCE_CPU_BF16 = "PEFTLAB_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them CPU bf16 is emulated, measured 2.7x slower than fp32
    on 2048^3 matmuls here (44 vs 118 GFLOP/s), although oneDNN reports bf16 as supported.
    PEFTLAB_CPU_BF16=1/0 overrides the detection."""
    forced = os.environ.get(FORCE_CPU_BF16, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _libc():
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    if not name or "musl" in name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim), between phases that
    change shapes: after an evaluation and at an epoch's end. Per step glibc keeps freed
    blocks for reuse, which is what makes steps fast; a fixed mmap threshold (peftlab's old
    setting) mapped and zeroed every tensor above 128 KiB afresh and cost 2.3x per step."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def set_mmap_threshold(size: int) -> None:
    """glibc's M_MMAP_THRESHOLD; used only by benchmarks/allocator.py to measure the old
    setting (PEFTLAB_MMAP_THRESHOLD) beside the default."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, size)


def precision_context(precision: str, device: torch.device | str):
    """Autocast as Accelerate applies it in training, for inference outside the loop: a run
    trained in bf16 keeps its frozen base in bf16 and its head in fp32, and only autocast
    makes the two meet in a matmul (and gives the numbers the run measured)."""
    from contextlib import nullcontext
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtypes[precision])


def peak_reserved_mb(device: torch.device) -> float | None:
    """What the CUDA caching allocator held at its peak (what nvidia-smi sees, minus the
    context); None on CPU, where RSS already counts everything."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_reserved(device) / 2**20


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: GPU max allocated, else the CPU's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
