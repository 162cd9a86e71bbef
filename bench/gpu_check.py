"""`make gpu-check`: the GPU tier on this machine's card(s), and what it measured as JSON and Markdown.

Runs `pytest -m gpu` (tests/test_gpu.py: the rate probe beside the catalog and the estimate path, per-card
pinning, the tiny Llama over NCCL through the whole path, the memory and step-time models against the card)
with its figures sent to OUT (default gpu-check/), then writes OUT/gpu-check.json (this machine, the outcome of
every test, every figure) and OUT/gpu-check.md (the tables the README's "Measured on a real card" takes), and
prints the Markdown. Nothing is downloaded: the model configs and the tokenizer ship in the repository, and
Hugging Face is told to stay offline. Exit status: pytest's (2 where no card is visible).

    .venv/bin/python bench/gpu_check.py [--out DIR] [--budget-s 480]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict:
    """The card(s) and the software the figures were measured with."""
    import torch

    from workers.gpu_probe import probe_cards, software_facts

    view = probe_cards()
    sw = software_facts(view.driver_version, view.cuda_driver_version)
    return {"cards": [{"index": c.index, "name": c.name, "memory_mib": c.memory_total_mib, "compute_capability": list(c.compute_capability),
                       "max_sm_clock_mhz": c.max_sm_clock_mhz, "power_limit_w": c.power_limit_w} for c in view.cards],
            "driver": sw.driver_version, "cuda_driver": sw.cuda_driver_version, "torch": sw.torch_version, "torch_cuda": sw.torch_cuda,
            "nccl": sw.nccl_version, "deepspeed": sw.deepspeed_version, "archs": list(sw.torch_archs), "cpus": os.cpu_count(),
            "torch_sees": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}


def outcomes(junit: Path) -> list[dict]:
    """Each test's name and outcome (passed, failed, skipped with its reason) from pytest's JUnit XML."""
    if not junit.is_file():
        return []
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        verdict, why = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                verdict, why = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag], (found.get("message") or "")[:300]
        rows.append({"test": case.get("name"), "outcome": verdict, "seconds": float(case.get("time") or 0), "why": why})
    return rows


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return "-" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))

    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


def markdown(report: dict) -> str:
    m, f = report["machine"], report["figures"]
    cards = ", ".join(f"{c['name']} ({c['memory_mib'] / 1024:.0f} GiB, sm_{c['compute_capability'][0]}{c['compute_capability'][1]})" for c in m["cards"])
    counts = {k: sum(1 for o in report["tests"] if o["outcome"] == k) for k in ("passed", "failed", "error", "skipped")}
    parts = [f"Measured on {cards}; driver {m['driver']}, torch {m['torch']} (CUDA {m['torch_cuda']}), NCCL {m['nccl']}, "
             f"DeepSpeed {m['deepspeed']}; {report['date']}, `make gpu-check` in {report['seconds']:.0f} s: "
             + ", ".join(f"{n} {k}" for k, n in counts.items() if n) + "."]
    if f.get("rates"):
        parts.append("**Rate probe** (measured; the catalog's peak; the estimate path's figure from NVML, as a card the catalog "
                     "lacked would get; bar: estimate within 20% of measured)\n\n" + _table(
                         ["card", "figure", "measured", "catalog", "estimate", "estimate / measured"],
                         [[r["gpu"], r["figure"], r["measured"], r["catalog"], r["estimate"], r["estimate_over_measured"]] for r in f["rates"]]))
    if f.get("pinning"):
        parts.append("**Pinning**\n\n" + _table(["card", "plan promised", "the rank saw", "CUDA_VISIBLE_DEVICES"],
                                                 [[r["card"], r["promised_uuid"], r["seen_uuid"], r["cuda_visible_devices"]] for r in f["pinning"]]))
    if f.get("training"):
        parts.append("**The tiny Llama over NCCL, through `zeromix submit`**\n\n" + _table(
            ["job", "precision", "loss first -> last", "step (measured)", "step (estimate)"],
            [[r["job"], r["precision"], f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}", r["step_time_s"], r["est_step_s"]] for r in f["training"]]))
    if f.get("memory"):
        parts.append("**Memory and step time, planner's estimate against the card** (estimate without the CUDA context, "
                     "against torch's reserved peak, bar 10%; tensors alone against the allocated peak; step time: goal 25%)\n\n" + _table(
                         ["model", "method", "seq", "micro x accum", "settings", "est GiB", "reserved GiB", "est/reserved",
                          "est tensors GiB", "allocated GiB", "est/allocated", "est step s", "step s", "est/measured"],
                         [[r["model"], r["method"], r["seq_len"], f"{r['micro_batch']} x {r['grad_accum']}", r["settings"], r["est_gib"],
                           r["max_reserved_gib"], r["est_over_reserved"], r["est_tensors_gib"], r["max_allocated_gib"], r["est_over_allocated"],
                           r["est_step_s"], r["measured_step_s"], r["est_over_measured_step"]] for r in f["memory"]]))
    not_passed = [o for o in report["tests"] if o["outcome"] != "passed"]
    if not_passed:
        parts.append("**Not passed**\n\n" + _table(["test", "outcome", "why"], [[o["test"], o["outcome"], o["why"].replace("|", "/")] for o in not_passed]))
    return "\n\n".join(parts) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "gpu-check"), help="where the figures go (default: gpu-check/)")
    parser.add_argument("--budget-s", type=float, default=480, help="stop the tier after this long, keeping what it measured")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(f"zeromix gpu-check: no NVIDIA card visible to torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}); "
              "run it on a GPU box, with a CUDA build of torch (`make gpu-check` installs one where pip offers it)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures.json").unlink(missing_ok=True)
    junit = out / "junit.xml"
    env = {**os.environ, "ZEROMIX_GPU_CHECK_DIR": str(out), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.time()
    try:
        code = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "tests/test_gpu.py", f"--junitxml={junit}",
                               "-o", "timeout=300"], cwd=REPO, env=env, timeout=args.budget_s).returncode
    except subprocess.TimeoutExpired:
        print(f"zeromix gpu-check: stopped after its budget of {args.budget_s:.0f} s; the figures measured so far are kept", file=sys.stderr)
        code = 124
    figures = json.loads((out / "figures.json").read_text()) if (out / "figures.json").is_file() else {}
    report = {"date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - started, 1), "exit_status": code,
              "machine": machine(), "tests": outcomes(junit), "figures": figures}
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (out / "gpu-check.md").write_text(text)
    print(text)
    print(f"zeromix gpu-check: {out / 'gpu-check.json'} and {out / 'gpu-check.md'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
