"""`zeromix advise`: before buying a card, which cards (alone, or two in one box) can run this job, in which
configuration, how fast and how efficiently. Pure: the planner run on imagined pools, no cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations_with_replacement

from orchestrator import catalog
from orchestrator.cluster_config import ClusterConfig
from orchestrator.errors import InputError
from orchestrator.inventory import snapshot_from_config
from orchestrator.jobspec import JobSpec
from orchestrator.model_facts import ModelFacts
from orchestrator.planner import NoPlacement, Plan, make_plan

PAIRED_CARDS = 12  # pairs are formed from the best this many single cards


METHODS = ("qlora", "lora", "full")  # what `--method all` compares


@dataclass(frozen=True)
class Advice:
    cards: tuple[str, ...]  # catalog names; two for a pair in one box
    plan: Plan | None  # None: it cannot run the job
    why_not: str | None
    method: str = "lora"

    @property
    def tokens_per_s(self) -> float:
        return self.plan.step.tokens_per_s if self.plan else 0.0

    @property
    def tokens_per_joule(self) -> float:
        """At TDP: an upper bound on the power drawn, so a lower bound on tokens per joule."""
        if not self.plan:
            return 0.0
        return self.tokens_per_s / sum(r.card.spec.tdp_w for r in self.plan.ranks)

    def summary(self) -> dict:
        p = self.plan
        return {
            "cards": list(self.cards), "method": self.method, "fits": p is not None, "why_not": self.why_not,
            "zero_stage": p.zero.stage if p else None,
            "offload": p.offload if p else None,
            "precision": p.precision if p else None, "activation_checkpointing": p.checkpointing if p else None,
            "micro_batches": [r.tuning.micro_batch for r in p.ranks] if p else None, "grad_accum": p.grad_accum if p else None,
            "est_tokens_per_s": round(self.tokens_per_s, 1), "est_tokens_per_joule": round(self.tokens_per_joule, 3),
        }


def _job(facts: ModelFacts, method: str, seq_len: int, batch: int) -> JobSpec:
    return JobSpec.model_validate({
        "name": "advise", "model": {"path": "."}, "dataset": {"path": ".", "text_field": "text"}, "method": method,
        "seq_len": seq_len, "global_batch_size": batch, "max_steps": 1, "output_dir": ".",
    })


def _try(job: JobSpec, facts: ModelFacts, cards: tuple[catalog.GpuSpec, ...], host_ram_gb: float) -> Advice:
    box = {"name": "box", "address": "10.0.0.1", "ram_gb": host_ram_gb,
           "gpus": [{"model": s.nvml_name, "vram_gb": s.vram_gib} for s in cards]}
    pool = snapshot_from_config(ClusterConfig.model_validate({"head": {"address": "10.0.0.1"}, "nodes": [box]}))
    names = tuple(s.name for s in cards)
    try:
        plan = make_plan(job.model_copy(update={"gpus": job.gpus.model_copy(update={"count": len(cards)})}), facts, pool, 1, suggest=False)
    except NoPlacement as err:
        return Advice(names, None, str(err).removeprefix(f"no placement for job {job.name!r}: "), job.method)
    return Advice(tuple(r.card.short_name for r in plan.ranks), plan, None, job.method)  # in rank order, as the micro-batches are


def advise(facts: ModelFacts, method: str, seq_len: int, batch: int, host_ram_gb: float, card_names: list[str] | None = None) -> list[Advice]:
    """Every single card, then pairs of the best, ranked: those that run the job first, fastest first. `method`
    "all": each of QLoRA, LoRA and full fine-tuning, on each card set, in one ranking."""
    specs = list(catalog.all_specs()) if not card_names else [_spec(name) for name in card_names]
    rows = []
    for each in (METHODS if method == "all" else (method,)):
        job = _job(facts, each, seq_len, batch)
        singles = [_try(job, facts, (s,), host_ram_gb) for s in specs]
        ranked = sorted(zip(specs, singles), key=lambda pair: (-pair[1].tokens_per_s, -pair[0].vram_gib))
        best = [spec for spec, _ in ranked[:PAIRED_CARDS]] if not card_names else specs
        rows += singles + [_try(job, facts, pair, host_ram_gb) for pair in combinations_with_replacement(best, 2)]
    return sorted(rows, key=lambda a: (a.plan is None, -a.tokens_per_s, len(a.cards), a.cards, METHODS.index(a.method)))


def _spec(name: str) -> catalog.GpuSpec:
    found = catalog.candidates(name)
    if len(found) != 1:
        hint = ", ".join(repr(s.name) for s in found) if found else ", ".join(repr(n) for n in catalog.suggest(name)) or "see `zeromix nodes`"
        raise InputError("command line", "--cards", name, f"one catalog card per name; {'which of' if found else 'did you mean'} {hint}?")
    return found[0]
