"""How long the planner takes for one job over pools of 8, 64 and 256 cards (target: under 100 ms at 64).

The pools are homelab-like: nodes of 2 to 4 mixed cards (GTX 1080 Ti to RTX 4090) on 1 GbE, a few on
10 GbE. The job is a LoRA fine-tune of Llama-3.2-1B at 1024 tokens, global batch 512 (its config from tests/data). Each
figure is the median of repeated runs of `make_plan` in this process (pure Python: no Ray, no torch).

    .venv/bin/python bench/planning_time.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from orchestrator.cluster_config import ClusterConfig
from orchestrator.inventory import snapshot_from_config
from orchestrator.jobspec import JobSpec
from orchestrator.model_facts import facts_from_config
from orchestrator.planner import make_plan

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "orchestrator" / "data" / "model_configs" / "llama-3.2-1b" / "config.json"
BOXES = [  # the kinds of boxes a homelab grows, repeated round-robin
    ["NVIDIA GeForce GTX 1080 Ti", "NVIDIA GeForce RTX 2080 Ti"],
    ["NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 4090"],
    ["NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 3080 Ti"],
    ["NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4070 Ti SUPER", "NVIDIA GeForce RTX 4060 Ti", "NVIDIA GeForce RTX 3060"],
]


def pool(cards: int):
    nodes, left, i = [], cards, 0
    while left > 0:
        box = BOXES[i % len(BOXES)][:left]
        gpus = [{"model": m, **({"vram_gb": 12} if m.endswith("RTX 3060") else {}), **({"vram_gb": 16} if m.endswith("4060 Ti") else {})} for m in box]
        nodes.append({"name": f"n{i}", "address": f"10.0.{i // 250}.{i % 250 + 1}", "ram_gb": 128, "gpus": gpus,
                      **({"link": "10GbE"} if i % 5 == 0 else {})})
        left, i = left - len(box), i + 1
    return snapshot_from_config(ClusterConfig.model_validate({"head": {"address": "10.0.0.1"}, "nodes": nodes}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    facts = facts_from_config(json.loads(MODEL.read_text()))
    job = JobSpec.model_validate({"name": "bench", "model": {"path": "m"}, "dataset": {"path": "d", "text_field": "text"},
                                  "method": "lora", "seq_len": 1024, "global_batch_size": 512, "max_steps": 100, "output_dir": "o"})
    print(f"planning one LoRA job for {facts.model_type} ({facts.n_params:,} parameters), median of {args.repeat} runs (measured)")
    print(f"{'cards':>6} {'nodes':>6} {'time':>10}  plan")
    for cards in (8, 64, 256):
        snapshot = pool(cards)
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            plan = make_plan(job, facts, snapshot, 100)
            times.append(time.perf_counter() - start)
        chosen = len(plan.ranks)
        print(f"{cards:>6} {len(snapshot.nodes):>6} {statistics.median(times) * 1000:>8.1f} ms  {chosen} cards, {plan.settings}, "
              f"{plan.precision}, est. {plan.step.tokens_per_s:,.0f} tokens/s")


if __name__ == "__main__":
    main()
