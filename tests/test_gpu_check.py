"""`make gpu-check`'s report, rendered here from the figures a GPU run writes: a GPU run is rare and its time
costly, so a renderer that breaks on its first real figures must break here first. (The figures' own
correctness is the GPU tier's business, tests/test_gpu.py.)"""

import json
import subprocess
import sys

import pytest
import torch

from bench.gpu_check import REPO, markdown, outcomes

# One row per section, keyed as tests/test_gpu.py writes them.
FIGURES = {
    "rates": [{"card": "gpu-box/0", "gpu": "NVIDIA H200", "figure": "matmul bf16 TFLOPS", "measured": 781.2, "catalog": None,
               "estimate": 1070.5, "estimate_over_measured": 1.37}],
    "pinning": [{"card": "gpu-box/0", "promised_uuid": "GPU-1", "seen_uuid": "GPU-1", "cuda_visible_devices": "0", "device": "NVIDIA H200"}],
    "training": [{"job": "ZeRO-2 full", "card": "gpu-box/0", "precision": "bf16", "device": "NVIDIA H200", "first_loss": 3.7,
                  "last_loss": 2.1, "step_time_s": 0.05, "est_step_s": 0.01}],
    "memory": [{"model": "llama-3.2-1b", "method": "lora", "seq_len": 512, "micro_batch": 4, "grad_accum": 1,
                "settings": "ZeRO-2, offload none, bf16, checkpointing off", "est_gib": 4.1, "max_reserved_gib": 4.3,
                "est_over_reserved": 0.953, "est_tensors_gib": 3.5, "max_allocated_gib": 3.6, "est_over_allocated": 0.972,
                "est_step_s": 0.1, "measured_step_s": 0.12, "est_over_measured_step": 0.833, "step_goal_met": True}],
}


def test_the_report_renders_every_section(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite><testcase name="test_a" time="1.5"/>'
                     '<testcase name="test_b" time="2"><failure message="estimate 1070.5 vs measured 781.2 | far"/></testcase>'
                     '<testcase name="test_c" time="0"><skipped message="does not fit"/></testcase></testsuite></testsuites>')
    tests = outcomes(junit)
    assert [(t["test"], t["outcome"]) for t in tests] == [("test_a", "passed"), ("test_b", "failed"), ("test_c", "skipped")]
    machine = {"cards": [{"index": 0, "name": "NVIDIA H200", "memory_mib": 143771, "compute_capability": [9, 0]}], "driver": "570.1",
               "torch": "2.13.0+cu130", "torch_cuda": "13.0", "nccl": "2.27.7", "deepspeed": "0.19.8"}
    text = markdown({"date": "2026-12-04", "seconds": 412.0, "machine": machine, "tests": tests, "figures": FIGURES})
    assert "Measured on NVIDIA H200 (140 GiB, sm_90)" in text and "1 passed, 1 failed, 1 skipped" in text
    for expected in ("| NVIDIA H200 | matmul bf16 TFLOPS | 781.2 | - | 1070.5 | 1.37 |", "| gpu-box/0 | GPU-1 | GPU-1 | 0 |",
                     "| ZeRO-2 full | bf16 | 3.700 -> 2.100 |", "| llama-3.2-1b | lora | 512 | 4 x 1 |",
                     "| test_b | failed | estimate 1070.5 vs measured 781.2 / far |"):
        assert expected in text, expected
    json.dumps(FIGURES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a card is visible here: gpu-check would run the whole GPU tier")
def test_without_a_card_it_says_so_in_one_line():
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", "/nonexistent-never-made"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("zeromix gpu-check: no NVIDIA card visible to torch") and done.stderr.count("\n") == 1
