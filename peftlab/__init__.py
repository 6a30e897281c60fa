"""peftlab: fine-tune pre-trained models on your own data, measured and reproducible."""

import logging

__version__ = "0.1.0"

# bitsandbytes is imported by peft whenever it is installed, and on CPUs with AVX512-BF16 it
# logs a warning at import that an optional kernel package from the Hub is missing; its own
# CPU kernel runs instead. That line on every command, quantized or not, says nothing to act
# on offline, so the logger is raised to errors before anything imports bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
