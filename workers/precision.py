"""What a rank can really run: the plan's precision, adjusted only where this device cannot run it."""

from __future__ import annotations

import copy
import logging

log = logging.getLogger("zeromix.precision")


def planned_precision(ds_config: dict) -> str:
    if ds_config["bf16"]["enabled"]:
        return "bf16"
    return "fp16" if ds_config["fp16"]["enabled"] else "fp32"


def runnable_ds_config(ds_config: dict, on_gpu: bool) -> tuple[dict, str]:
    """DeepSpeed refuses fp16 on its CPU accelerator. In a simulated cluster (cards declared, maths on CPU)
    an fp16 plan therefore runs in fp32, and says so; on a real card the plan is used unchanged."""
    precision = planned_precision(ds_config)
    if on_gpu or precision != "fp16":
        return ds_config, precision
    log.warning("fp16 was planned for this card, but this rank runs on CPU where DeepSpeed has no fp16: running fp32")
    adjusted = copy.deepcopy(ds_config)
    adjusted["fp16"]["enabled"] = False
    return adjusted, "fp32 (fp16 planned; CPU simulation)"
