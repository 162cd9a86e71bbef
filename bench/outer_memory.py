"""What an outer step holds in memory on each card, measured, beside the plan's estimate.

An outer step (workers/outer_steps.py) reads every trained weight whole in fp32, takes the box's delta, and loads
the new global weights on every card. On a card that can only be done a piece at a time: the model in fp32 is
twice its bf16 weights, on top of the model states a card already holds (a 1.5B full fine-tune in a box of two
24 GB cards holds about 16 GiB of them under ZeRO-2; the whole model in fp32 twice over would be 11.5 GiB more).
This bench trains a 13.7M-parameter Llama (4 layers of 512) on the homelab's 1080 Ti (one box) and 3090 + 4090 (the
other) in outer-step mode on this machine's CPU (real DeepSpeed ZeRO-2, gloo), and reports per rank the most memory
an outer step held above what the rank held before it (measured: Linux's resident high-water mark, reset before
each outer step; torch's allocator peak on a card), against the trained weights' size in fp32 and the plan's
estimate of the outer step's buffers on a card. A box leader's figure also counts what it keeps in host RAM for
the outer step (the delta, the other boxes' deltas as received, their weighted sum): on this CPU host and card are
one. The rank that leads no box holds only what a card holds. About a minute on 2 cores.

RESIDENT: glibc serves a freed block again without touching new pages, so the resident set would grow only by what
the outer step needs beyond the step's freed activations; the ranks run with MALLOC_MMAP_THRESHOLD_ at 64 KiB, so
every tensor of any size maps pages of its own and the high-water mark follows the live bytes, as a card's
allocator peak does.

    .venv/bin/python bench/outer_memory.py [--steps 6] [--inner 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

from orchestrator.cluster_config import load_cluster
from orchestrator.inventory import snapshot_from_config
from orchestrator.launch import train_config
from orchestrator.model_facts import facts_from_config
from orchestrator.planner import make_plan
from orchestrator.planner.memory import OUTER_BUCKET_ELEMENTS
from orchestrator.planner.outer import WIRE_BYTES
from workers.collectives import first_ranks
from workers.local_launch import run_local_ranks

from hetero_dp import trio_job
from slow_link import MODEL

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--inner", type=int, default=2, help="inner steps per outer step (H)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zeromix-outer-memory-"))
    job = trio_job(work, MODEL, args.steps, 6, pretrain_lines=200, rebalance=False,
                   sync={"mode": "outer", "inner_steps": args.inner, "wire": "fp32"})
    facts = facts_from_config(MODEL)
    plan = make_plan(job, facts, snapshot_from_config(load_cluster(REPO / "cluster.yaml")), args.steps)
    config = dataclasses.replace(train_config(job, plan, "outer-memory"), output_dir=str(work / "out"), checkpoint_every=0)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)  # the ranks' tensors get fresh pages, returned when freed (RESIDENT)
    ranks = run_local_ranks(config)
    leaders = set(first_ranks(config.boxes))
    weights = 4 * plan.trainable
    print(f"{plan.trainable / 1e6:.1f}M trained parameters: {weights / MIB:.1f} MiB in fp32; {args.steps} steps, an outer step "
          f"every {args.inner}; ZeRO-{plan.zero.stage} in each box, on this machine's CPU")
    deltas = len(config.boxes) * WIRE_BYTES["fp32"] * plan.trainable  # a leader's: its own delta and the others' received
    print(f"{'rank':<5}{'card':<20}{'role':<12}{'outer step, measured':>22}{'plan (estimate)':>18}   what the plan counts")
    for i, (rank, result) in enumerate(zip(plan.ranks, ranks)):
        peak = result["outer_peak_bytes"]
        measured = "not measured" if peak is None else f"{peak / MIB:.1f} MiB"
        leads = i in leaders
        estimate = rank.memory.outer_step + (deltas if leads else 0)
        what = "the card's buffers + every box's delta (host)" if leads else "the card's buffers"
        print(f"{i:<5}{rank.card.short_name:<20}{'box leader' if leads else 'card only':<12}{measured:>22}"
              f"{estimate / MIB:>14.1f} MiB   {what}")
    print(f"(the trained weights in fp32, once: {weights / MIB:.1f} MiB; the card's buffers: one weight, or one bucket of "
          f"{OUTER_BUCKET_ELEMENTS:,} values, in fp32)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
