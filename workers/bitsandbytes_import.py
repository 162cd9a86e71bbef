"""Import bitsandbytes without its call to the Hugging Face Hub.

On a CPU with AVX-512 BF16 (AMD Zen 4 and later, Intel Sapphire Rapids: a common homelab CPU beside a 4090),
importing bitsandbytes 0.50 asks the Hub for a kernel (`kernels.get_kernel("kernels-community/quantization-
bitsandbytes")`, for 4-bit matrix-vector products on the CPU). PEFT imports bitsandbytes whenever it adds LoRA
adapters, so every LoRA and QLoRA rank made that request at its start: on a box online it downloads native code
into the training process, on one offline it fails after a second or, behind a firewall that drops packets, after
a network timeout, and either way it logged "Failed to load CPU gemm_4bit_forward from kernels-community: ...",
which reads as a fault. No job uses that kernel: training dequantises 4-bit weights (on a card, the CUDA backend
does the work), and bitsandbytes falls back to its own code without it. Nodes do not download (jobspec: a model
is a local directory or already in the local cache), so the import runs with the Hub in offline mode, and the two
lines that would say the kernel was skipped are not logged.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

KERNEL_REPO = "kernels-community/quantization-bitsandbytes"
# Where bitsandbytes says it failed to load the kernel, and where kernels says offline mode skips its publisher check.
LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


def import_bitsandbytes() -> None:
    """Import bitsandbytes, if it is installed, with no request to the Hub; a no-op once it is imported."""
    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    from huggingface_hub import constants

    loggers = [logging.getLogger(name) for name in LOGGERS]
    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True  # read by kernels at the call (kernels/_internals/load.py)
    for logger in loggers:
        logger.addFilter(_about_the_kernel)
    try:
        importlib.import_module("bitsandbytes")
    finally:
        constants.HF_HUB_OFFLINE = offline
        for logger in loggers:
            logger.removeFilter(_about_the_kernel)


def _about_the_kernel(record: logging.LogRecord) -> bool:
    """False (drop it) for a record about the skipped kernel; every other record passes."""
    return KERNEL_REPO not in record.getMessage()
