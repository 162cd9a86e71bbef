"""Outer steps across boxes against synchronous data parallel: what they cost in quality, what they send.

Real DeepSpeed on this machine's CPU (gloo), three ranks of the homelab's 3-card plan (GTX 1080 Ti on attic; RTX 3090
and RTX 4090 on desk) with their planned micro-batches: once as one synchronous world, and as two boxes (desk,
attic) taking an outer step every H inner steps (the job spec's defaults: outer lr 1, no momentum; --outer-lr 0.7
--outer-momentum 0.9 for DiLoCo's). Same model, data, global batches and steps in every run. Prints each run's
held-out loss (the final global weights, on text none of the runs trained on) and the share of those held-out copy/sort
lines it completes exactly (greedy, after " ="), each against the synchronous run's, and the bytes the box leaders sent
across the link (counted on it); --seeds N repeats every run with N seeds and adds their means, paired by seed. --demo runs the demo's two jobs instead (the scratch
model, synchronous or with outer steps, then LoRA on 'rev') and prints the 'rev' exact match and the loss on the
held-out words' completions (--steps, --larger and --lr change the scratch run's length, model and learning rate); --finetune keeps the
scratch model synchronous and runs the LoRA stage across both boxes, over several seeds. The link is not throttled
and the cards are not emulated: timings are not the point of this bench (bench/slow_link.py's are).

    .venv/bin/python bench/outer_steps.py [--steps 200] [--inner 10 50] [--wire fp32] [--wide | --finetune] [--seeds 1]
                                          [--demo [--larger] [--lr 3e-3]]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import shutil
import statistics
import tempfile
from pathlib import Path

from orchestrator.cluster_config import load_cluster
from orchestrator.demo.task import TINY_LLAMA, write_demo_data
from orchestrator.inventory import snapshot_from_config
from orchestrator.launch import train_config, with_outer_steps
from orchestrator.model_facts import facts_from_config
from orchestrator.planner import make_plan
from workers.local_launch import run_local_ranks

from hetero_dp import BENCH_MODEL, TRIO, model_dir_with, trio_job

REPO = Path(__file__).resolve().parents[1]
MODEL = {**TINY_LLAMA, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 4, "max_position_embeddings": 128}


def held_out_loss(model_dir: Path, tokenizer_dir: Path, eval_path: Path, adapter_dir: Path | None = None) -> float:
    """Mean loss per token on `eval_path`: its text, or with an adapter (a LoRA run's) the completions of its prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.data import collate, read_records, tokenize
    from workers.loss import whole_logits_loss

    fields = {"text_field": None, "prompt_field": "prompt", "completion_field": "completion"} if adapter_dir else \
        {"text_field": "text", "prompt_field": None, "completion_field": None}
    dataset = {"path": str(eval_path), "format": "jsonl", **fields}
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    samples = tokenize(read_records(dataset), dataset, tokenizer, 32)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(samples), 64):
            batch = collate(samples[start: start + 64], tokenizer.pad_token_id)
            total += whole_logits_loss(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels).item()
            count += batch.loss_tokens
    return total / count


def as_prompts(text_path: Path, prompts: Path) -> Path:
    """The held-out `copy`/`sort` lines ("sort dcab = abcd") as prompts and completions split after " =": the
    pretraining text's own downstream check (the demo's `rev` check, on the instructions it trained on)."""
    import json

    with prompts.open("w") as f:
        for line in text_path.read_text().splitlines():
            prompt, completion = json.loads(line)["text"].split(" =", 1)
            f.write(json.dumps({"prompt": f"{prompt} =", "completion": completion}) + "\n")
    return prompts


def held_out_exact_match(model_dir: Path, tokenizer_dir: Path, prompts: Path) -> float:
    """The share of `prompts` (`as_prompts`) whose greedy completion is exactly right."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.demo.task import exact_match

    return exact_match(AutoModelForCausalLM.from_pretrained(str(model_dir)), AutoTokenizer.from_pretrained(str(tokenizer_dir)), prompts)


def _demo_run(job, out: Path, sync: dict, data_path: Path, model_path: Path, **fields) -> tuple[Path, float]:
    """One of the demo's jobs as `make demo` plans it on the homelab (with `fields` changed), run on local ranks:
    its final model and last training loss."""
    job = job.model_copy(update={"output_dir": str(out), "report_to": [], "sync": job.sync.model_copy(update=sync),
                                 "dataset": job.dataset.model_copy(update={"path": str(data_path)}),
                                 "model": job.model.model_copy(update={"path": str(model_path)}), **fields})
    from orchestrator.model_facts import read_config

    plan = make_plan(job, facts_from_config(read_config(job.model.path)), _homelab(), job.max_steps)
    ranks = run_local_ranks(train_config(job, plan, out.name))
    return out / "final", ranks[0]["last_loss"]


@functools.cache
def _homelab():
    return snapshot_from_config(load_cluster(REPO / "cluster.yaml"))


def _sync(inner_steps: int | None, outer_lr: float, outer_momentum: float, wire: str) -> dict:
    return {"mode": "outer", "inner_steps": inner_steps, "outer_lr": outer_lr, "outer_momentum": outer_momentum, "wire": wire} \
        if inner_steps else {"mode": "synchronous"}


def _demo_data(work: Path):
    from orchestrator.demo import LORA_JOB, SCRATCH_JOB
    from orchestrator.jobspec import load_job

    data = write_demo_data(work / "data")
    held_out = write_demo_data(work / "held-out", seed=1, pretrain_lines=300, reverse_train=10, reverse_eval=5)["pretrain"]
    return data, held_out, load_job(REPO / SCRATCH_JOB, check_files=False), load_job(REPO / LORA_JOB, check_files=False)


def demo_task(inner: list[int], outer_lr: float, outer_momentum: float, wire: str, seeds: int, steps: int | None,
              model: dict | None, lr: float | None) -> None:
    """The demo's two jobs as `make demo` runs them on the homelab (a tiny Llama from scratch on the 1080 Ti and the
    3090, then LoRA on `rev` on the 3090 and 4090), the first synchronous and with outer steps at each H, each with
    `seeds` seeds (both jobs take the seed): the scratch run's held-out loss, and after the LoRA stage the `rev`
    exact match and the loss on the held-out words' completions (the downstream check that seeds move less).
    `steps` lengthens the scratch run (its cosine schedule follows): H = 50 meets 3 times in the demo's 150 steps,
    a run `inner_steps: auto` would give H <= 18. `model` (a Llama config) replaces the demo's tiny one, keeping
    its tokenizer; `lr` the scratch job's peak learning rate."""
    from orchestrator.demo import _accuracies

    work = Path(tempfile.mkdtemp(prefix="zeromix-outer-demo-"))
    data, held_out, scratch_job, lora_job = _demo_data(work)
    steps = steps or scratch_job.max_steps
    optimizer = scratch_job.optimizer.model_copy(update={"lr": lr or scratch_job.optimizer.lr})
    model_dir = model_dir_with(work / "model", model) if model else REPO / "jobs" / "examples" / "tiny-llama"
    results = {}  # H (None: synchronous) -> [(exact match, held-out loss, rev completions' loss)] by seed
    for h in [None, *inner]:
        for seed in range(seeds):
            scratch, _ = _demo_run(scratch_job, work / f"h{h}" / f"seed{seed}" / "scratch", _sync(h, outer_lr, outer_momentum, wire),
                                   data["pretrain"], model_dir, seed=seed, max_steps=steps, optimizer=optimizer)
            lora, _ = _demo_run(lora_job, work / f"h{h}" / f"seed{seed}" / "lora", _sync(None, 0, 0, wire), data["reverse-train"], scratch, seed=seed)
            results.setdefault(h, []).append((_accuracies(scratch, lora, data["reverse-eval"])[1], held_out_loss(scratch, scratch, held_out),
                                              held_out_loss(scratch, scratch, data["reverse-eval"], adapter_dir=lora)))
    print(f"\nthe demo's task{' with a ' + format(facts_from_config(model).n_params / 1e6, '.2f') + 'M-parameter Llama' if model else ''}: the scratch run ({steps} steps, lr {optimizer.lr:g}) as below, then LoRA on 'rev' (synchronous, one box), {seeds} seed(s); "
          "'rev' exact match on 100 held-out words; mean (standard deviation)")
    _print_seeds(results, "scratch run", ["held-out loss", "rev held-out loss"], outer_lr, outer_momentum, wire)
    shutil.rmtree(work, ignore_errors=True)


def finetune_task(inner: list[int], outer_lr: float, outer_momentum: float, wire: str, seeds: int) -> None:
    """Fine-tuning a trained model, zeromix's own case: the demo's scratch model (trained synchronously, once), then
    its LoRA job on `rev` across both boxes (the 1080 Ti; the 3090 and 4090; ZeRO-2), synchronous and with outer
    steps at each H, each with `seeds` seeds (the LoRA stage's exact match moves by 10-20 points between seeds):
    the `rev` exact match and the loss on the held-out words' completions (the exact match's smoother companion)."""
    from orchestrator.demo import _accuracies

    work = Path(tempfile.mkdtemp(prefix="zeromix-outer-finetune-"))
    data, _, scratch_job, lora_job = _demo_data(work)
    scratch, _ = _demo_run(scratch_job, work / "scratch", _sync(None, 0, 0, wire), data["pretrain"], REPO / "jobs" / "examples" / "tiny-llama")
    across = {"gpus": lora_job.gpus.model_copy(update={"count": 3, "models": TRIO}),
              "deepspeed": lora_job.deepspeed.model_copy(update={"zero_stage": 2})}
    results = {}  # H (None: synchronous) -> [(exact match, loss on the held-out completions)] by seed
    for h in [None, *inner]:
        for seed in range(seeds):
            lora, _ = _demo_run(lora_job, work / f"h{h}" / f"seed{seed}", _sync(h, outer_lr, outer_momentum, wire), data["reverse-train"],
                                scratch, seed=seed, **across)
            results.setdefault(h, []).append((_accuracies(scratch, lora, data["reverse-eval"])[1],
                                              held_out_loss(scratch, scratch, data["reverse-eval"], adapter_dir=lora)))
    print(f"\nthe demo's scratch model (synchronous), then LoRA on 'rev' across both boxes, {seeds} seed(s); 'rev' exact match on 100 "
          "held-out words; mean (standard deviation)")
    _print_seeds(results, "LoRA run", ["rev held-out loss"], outer_lr, outer_momentum, wire)
    shutil.rmtree(work, ignore_errors=True)


def _print_seeds(results: dict, run: str, loss_names: list[str], outer_lr: float, outer_momentum: float, wire: str,
                 accuracy: str = "rev exact match") -> None:
    """Per H: the exact match and each loss over seeds, and each seed's difference to the synchronous run's (paired)."""
    print(f"{'outer steps in the ' + run:<38} {accuracy:>16} {'paired vs sync':>16}"
          + "".join(f" {name:>17} {'paired vs sync':>16}" for name in loss_names))
    sync = results[None]
    for h, runs in results.items():
        name = "none: synchronous" if h is None else f"H={h} ({wire}, lr {outer_lr:g}, mom {outer_momentum:g})"
        em_paired = [100 * (a[0] - b[0]) for a, b in zip(runs, sync)]
        losses = ""
        for i in range(1, len(loss_names) + 1):
            paired = [100 * (a[i] / b[i] - 1) for a, b in zip(runs, sync)]
            losses += f" {_mean_sd([r[i] for r in runs], ''):>17} {_mean_sd(paired, '%'):>16}"
        print(f"{name:<38} {_mean_sd([100 * r[0] for r in runs], '%'):>16} {_mean_sd(em_paired, 'pt'):>16}{losses}")
        by_seed = "".join(f" {' '.join(f'{r[i]:.3f}' for r in runs):>17} {'':>16}" for i in range(1, len(loss_names) + 1))
        print(f"{'  by seed':<38} {' '.join(f'{r[0]:.0%}' for r in runs):>16} {'':>16}{by_seed}")


def _mean_sd(values: list[float], unit: str) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3g}{unit} ({sd:.2g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="steps of the run (default 200; with --demo the scratch job's, 150)")
    parser.add_argument("--inner", type=int, nargs="+", default=[10, 50], help="inner steps per outer step (H)")
    parser.add_argument("--wire", choices=["fp32", "bf16", "int8"], default="fp32")
    parser.add_argument("--global-batch", type=int, default=24)
    parser.add_argument("--outer-lr", type=float, default=1.0)
    parser.add_argument("--outer-momentum", type=float, default=0.0)
    parser.add_argument("--wide", action="store_true", help="bench/hetero_dp.py's wider model (4 layers of 256) instead")
    parser.add_argument("--larger", action="store_true", help="with --demo: this bench's model (2 layers of 128) in place of the demo's")
    parser.add_argument("--lr", type=float, help="the run's learning rate (default 1e-3, constant; with --demo the scratch job's "
                                                 "peak, 3e-3, cosine)")
    parser.add_argument("--demo", action="store_true", help="the demo's two jobs instead (scratch, then LoRA on 'rev')")
    parser.add_argument("--finetune", action="store_true", help="the demo's LoRA stage across both boxes with outer steps instead")
    parser.add_argument("--seeds", type=int, help="seeds per mode (default 1; with --demo or --finetune 5)")
    args = parser.parse_args()
    args.seeds = args.seeds or (5 if args.demo or args.finetune else 1)
    if args.demo:
        return demo_task(args.inner, args.outer_lr, args.outer_momentum, args.wire, args.seeds, args.steps, MODEL if args.larger else None, args.lr)
    if args.finetune:
        return finetune_task(args.inner, args.outer_lr, args.outer_momentum, args.wire, args.seeds)

    args.steps = args.steps or 200
    work = Path(tempfile.mkdtemp(prefix="zeromix-outer-"))
    model = BENCH_MODEL if args.wide else MODEL
    job = trio_job(work, model, args.steps, args.global_batch, pretrain_lines=3000, rebalance=False)
    job = job.model_copy(update={"optimizer": job.optimizer.model_copy(update={"lr": args.lr or job.optimizer.lr})})
    model_dir = Path(job.model.path)
    held_out = write_demo_data(work / "held-out", seed=1, pretrain_lines=300, reverse_train=10, reverse_eval=5)["pretrain"]
    prompts = as_prompts(held_out, work / "held-out" / "prompts.jsonl")
    plan = make_plan(job, facts_from_config(model), _homelab(), args.steps)
    nodes = list(dict.fromkeys(r.card.node for r in plan.ranks))
    plan = dataclasses.replace(plan, ranks=tuple(sorted(plan.ranks, key=lambda r: nodes.index(r.card.node))))  # box by box
    boxes = [sum(r.card.node == n for r in plan.ranks) for n in nodes]
    base = train_config(job, plan, "bench")
    print(f"{len(plan.ranks)} ranks: " + ", ".join(f"{r.card.node}/{r.card.short_name} micro {r.tuning.micro_batch}" for r in plan.ranks)
          + f", x{plan.grad_accum} accumulation; boxes {dict(zip(nodes, boxes))}; {args.steps} steps of {plan.global_batch} "
            f"sequences at lr {job.optimizer.lr:g} ({job.optimizer.schedule}); {plan.n_params / 1e6:.2f}M parameters; ZeRO-{plan.zero.stage}, {plan.precision} on CPU\n")

    runs = {None: base, **{h: with_outer_steps(base, boxes, h, args.outer_lr, args.outer_momentum, args.wire) for h in args.inner}}
    rows, results = [], {}  # H (None: synchronous) -> [(held-out exact match, held-out loss)] by seed
    for seed in range(args.seeds):
        for h, config in runs.items():
            name = f"outer H={h} ({args.wire}, lr {args.outer_lr:g}, mom {args.outer_momentum:g})" if h else "synchronous"
            out = work / f"seed{seed}" / name.split()[0] / name.replace(" ", "_")
            ranks = run_local_ranks(dataclasses.replace(config, output_dir=str(out), seed=seed))
            loss, right = held_out_loss(out / "final", model_dir, held_out), held_out_exact_match(out / "final", model_dir, prompts)
            results.setdefault(h, []).append((right, loss))
            sync_right, sync_loss = results[None][seed]
            sent = sum(r["outer_bytes_sent"] for r in ranks)
            rows.append(f"{name:<42} {seed:>4} {loss:>13.4f} {loss / sync_loss - 1:>+8.1%} {right:>12.0%} {100 * (right - sync_right):>+8.1f} "
                        f"{ranks[0]['last_loss']:>15.4f} {ranks[0]['outer_steps']:>11} {f'{sent:,}' if config.outer else '(not counted)':>18}")
    print(f"\n{'run':<42} {'seed':>4} {'held-out loss':>13} {'vs sync':>8} {'exact match':>12} {'pt':>8} {'last train loss':>15} "
          f"{'outer steps':>11} {'bytes across boxes':>18}")
    print("\n".join(rows))
    print("\nexact match: held-out copy/sort lines completed exactly after ' ='; pt: its difference to the synchronous run's, in "
          "points. Bytes across boxes: the payload every box leader handed to the link, summed (measured); the synchronous "
          "run's traffic crosses inside DeepSpeed's own collectives, not counted here.")
    if args.seeds > 1:
        print(f"\nover {args.seeds} seeds, paired with the synchronous run of the same seed; mean (standard deviation)")
        _print_seeds(results, f"{args.steps}-step run", ["held-out loss"], args.outer_lr, args.outer_momentum, args.wire, accuracy="copy/sort match")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
