"""Outer steps across boxes against synchronous data parallel: what they cost in quality, what they send.

Real DeepSpeed on this machine's CPU (gloo), three ranks of the homelab's 3-card plan (GTX 1080 Ti on attic; RTX 3090
and RTX 4090 on desk) with their planned micro-batches: once as one synchronous world, and as two boxes (attic,
desk) taking an outer step every H inner steps (DiLoCo's outer Nesterov SGD, lr 0.7, momentum 0.9; inner AdamW as
the job's). Same model, data, global batches and steps in every run. Prints each run's held-out loss (the final
global weights, on text none of the runs trained on) against the synchronous run's, and the bytes the box leaders
handed to the link between boxes (counted on that link). The link is not throttled here and the cards are not
emulated: timings are not the point of this bench (see the README's slow-link section for what is left to measure).

    .venv/bin/python bench/outer_steps.py [--steps 200] [--inner 10 50] [--wire fp32]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
from pathlib import Path

from orchestrator.cluster_config import load_cluster
from orchestrator.demo.task import TINY_LLAMA, write_demo_data
from orchestrator.inventory import snapshot_from_config
from orchestrator.launch import train_config, with_outer_steps
from orchestrator.model_facts import facts_from_config
from orchestrator.planner import make_plan
from workers.local_launch import run_local_ranks

from hetero_dp import BENCH_MODEL, trio_job

REPO = Path(__file__).resolve().parents[1]
MODEL = {**TINY_LLAMA, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 4, "max_position_embeddings": 128}


def held_out_loss(model_dir: Path, tokenizer_dir: Path, eval_path: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.data import collate, read_records, tokenize

    dataset = {"path": str(eval_path), "format": "jsonl", "text_field": "text", "prompt_field": None, "completion_field": None}
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    samples = tokenize(read_records(dataset), dataset, tokenizer, 32)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(samples), 64):
            batch = collate(samples[start: start + 64], tokenizer.pad_token_id)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            total += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch.labels[:, 1:].reshape(-1),
                                                       ignore_index=-100, reduction="sum").item()
            count += batch.loss_tokens
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--inner", type=int, nargs="+", default=[10, 50], help="inner steps per outer step (H)")
    parser.add_argument("--wire", choices=["fp32", "bf16", "int8"], default="fp32")
    parser.add_argument("--global-batch", type=int, default=24)
    parser.add_argument("--outer-lr", type=float, default=0.7)
    parser.add_argument("--outer-momentum", type=float, default=0.9)
    parser.add_argument("--wide", action="store_true", help="bench/hetero_dp.py's wider model (4 layers of 256) instead")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="zeromix-outer-"))
    model = BENCH_MODEL if args.wide else MODEL
    job = trio_job(work, model, args.steps, args.global_batch, pretrain_lines=3000, rebalance=False)
    model_dir = Path(job.model.path)
    held_out = write_demo_data(work / "held-out", seed=1, pretrain_lines=300, reverse_train=10, reverse_eval=5)["pretrain"]
    homelab = snapshot_from_config(load_cluster(REPO / "cluster.yaml"))
    plan = make_plan(job, facts_from_config(model), homelab, args.steps)
    nodes = list(dict.fromkeys(r.card.node for r in plan.ranks))
    plan = dataclasses.replace(plan, ranks=tuple(sorted(plan.ranks, key=lambda r: nodes.index(r.card.node))))  # box by box
    boxes = [sum(r.card.node == n for r in plan.ranks) for n in nodes]
    base = train_config(job, plan, "bench")
    print(f"{len(plan.ranks)} ranks: " + ", ".join(f"{r.card.node}/{r.card.short_name} micro {r.tuning.micro_batch}" for r in plan.ranks)
          + f", x{plan.grad_accum} accumulation; boxes {dict(zip(nodes, boxes))}; {args.steps} steps of {plan.global_batch} "
            f"sequences; {plan.n_params / 1e6:.2f}M parameters; ZeRO-{plan.zero.stage}, {plan.precision} on CPU\n")

    runs = {"synchronous": base}
    runs.update({f"outer H={h} ({args.wire}, lr {args.outer_lr:g}, mom {args.outer_momentum:g})": with_outer_steps(base, boxes, h, args.outer_lr, args.outer_momentum, args.wire) for h in args.inner})
    rows, sync_loss = [], None
    for name, config in runs.items():
        out = work / name.split()[0] / name.replace(" ", "_")
        ranks = run_local_ranks(dataclasses.replace(config, output_dir=str(out)))
        loss = held_out_loss(out / "final", model_dir, held_out)
        sync_loss = loss if sync_loss is None else sync_loss
        sent = sum(r["outer_bytes_sent"] for r in ranks)
        rows.append(f"{name:<42} {loss:>13.4f} {loss / sync_loss - 1:>+8.1%} {ranks[0]['last_loss']:>15.4f} {ranks[0]['outer_steps']:>11} "
                    f"{f'{sent:,}' if config.outer else '(not counted)':>18}")
    print(f"\n{'run':<42} {'held-out loss':>13} {'vs sync':>8} {'last train loss':>15} {'outer steps':>11} {'bytes across boxes':>18}")
    print("\n".join(rows))
    print("\nbytes across boxes: the payload every box leader handed to the link, summed (measured). The synchronous run's "
          "traffic crosses inside DeepSpeed's own collectives, not counted here.")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
