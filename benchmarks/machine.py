"""What a benchmark ran on: CPU model and whether it has native bf16 (which decides what
`mixed_precision: auto` means), GPU, library versions; and which planner predicted."""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import torch

PLANNER_FILES = ("memory.py", "model_shape.py", "lm_loss.py")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine() -> dict:
    import accelerate
    import peft
    import transformers

    from peftlab.hardware import cpu_has_native_bf16
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "cpu_native_bf16": cpu_has_native_bf16(), "gpu": gpu,
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__}


def planner_fingerprint() -> str:
    """A hash of the planner's source: a prediction belongs to the planner that made it, and
    a changed planner means the benchmark runs again (predictions are never recomputed)."""
    package = Path(__file__).resolve().parents[1] / "peftlab"
    digest = hashlib.sha256()
    for name in PLANNER_FILES:
        digest.update((package / name).read_bytes())
    return digest.hexdigest()[:12]
