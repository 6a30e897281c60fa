"""peftlab: fine-tune pre-trained models on your own data, measured and reproducible."""

import logging
import os

__version__ = "0.1.0"

# bitsandbytes is imported by peft whenever it is installed, and on CPUs with AVX512-BF16 it
# logs a warning at import that an optional kernel package from the Hub is missing; its own
# CPU kernel runs instead. That line on every command, quantized or not, says nothing to act
# on offline, so the logger is raised to errors before anything imports bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# With the `kernels` package (a transformers dependency since 5.25), the same lookup also logs
# that the kernel's publisher cannot be verified offline. Only that offline notice is dropped:
# the logger's other trust warnings (an unverified publisher, online) still reach the user.
logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: "because Hugging Face Hub is in offline mode" not in record.getMessage())

# oneDNN (bf16 matmuls on CPU) caches a primitive, with its buffers, per input shape, up to
# 1,024 of them. Length-grouped batches and evaluation bring new shapes all the time, so
# under bf16 a run's memory grew with every evaluation (a MiniLM LoRA run: 1,714 MB peak RSS;
# 1,334 MB with 64 entries, at the same step time: benchmarks/results/onednn_cache_cpu.json).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
