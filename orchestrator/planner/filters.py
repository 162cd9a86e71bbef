"""Card filters: each one small, each answering "can this card take part?" with a reason when it cannot.

They read only the card and the job (never live cluster state), so a plan can be asked "what if" questions.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator import catalog
from orchestrator.inventory import Card
from orchestrator.jobspec import JobSpec


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""


OK = Verdict(True)


class NotHeld:
    name = "free"

    def check(self, job: JobSpec, card: Card) -> Verdict:
        return OK if card.held_by is None else Verdict(False, f"held by job {card.held_by}")


class AllowedModel:
    name = "gpus.models"

    def check(self, job: JobSpec, card: Card) -> Verdict:
        allowed = job.gpus.models
        if not allowed:
            return OK
        wanted = {spec for name in allowed for spec in catalog.candidates(name)}
        return OK if card.spec in wanted else Verdict(False, f"not in gpus.models ({', '.join(allowed)})")


class MinVram:
    name = "gpus.min_vram_gb"

    def check(self, job: JobSpec, card: Card) -> Verdict:
        need = job.gpus.min_vram_gb
        if need is None or card.vram_mib >= need * 1024:
            return OK
        return Verdict(False, f"{card.vram_mib / 1024:.0f} GB < gpus.min_vram_gb {need:g}")


class MinComputeCapability:
    name = "gpus.min_compute_capability"

    def check(self, job: JobSpec, card: Card) -> Verdict:
        need = job.gpus.min_compute_capability
        have = card.compute_capability[0] + card.compute_capability[1] / 10
        if need is None or have >= need - 1e-9:
            return OK
        return Verdict(False, f"compute capability {have:.1f} < {need:g}")


class SupportsPrecision:
    """An explicit precision the card cannot run. `auto` never excludes a card: the group's precision adapts."""

    name = "precision"

    def check(self, job: JobSpec, card: Card) -> Verdict:
        major = card.compute_capability[0]
        if job.precision == "bf16" and major < 8:
            return Verdict(False, "bf16 needs compute capability >= 8.0 (older cards only emulate it, very slowly)")
        if job.precision == "fp16" and major < 7:
            return Verdict(False, "DeepSpeed refuses fp16 on Pascal (sm_6x), and it is no faster than fp32 there")
        return OK


DEFAULT_FILTERS = (NotHeld(), AllowedModel(), MinVram(), MinComputeCapability(), SupportsPrecision())
