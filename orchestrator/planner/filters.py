"""Card filters: each one small, each answering "can this card take part?" with a reason when it cannot.

They read only the card and the job (never live cluster state), so a plan can be asked "what if" questions.
"""

from __future__ import annotations

import functools
import re
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


@dataclass(frozen=True)
class TorchBuild:
    """One of PyTorch's CUDA builds and the kernels it ships (data/torch_builds.csv)."""

    name: str  # cu126, cu128, ...
    index_url: str
    archs: tuple[str, ...]  # torch.cuda.get_arch_list() of its Linux wheel


@functools.cache
def torch_builds() -> tuple[TorchBuild, ...]:
    return tuple(TorchBuild(r["build"], r["index_url"], tuple(r["archs"].split())) for r in catalog.data_rows("torch_builds.csv"))


def torch_runs_on(archs: tuple[str, ...], cc: tuple[int, int]) -> bool:
    """Whether a torch build with these `get_arch_list()` entries has kernels for a card: SASS for sm_XY runs on
    the same major version at an equal or higher minor; PTX (compute_XY) JIT-compiles for any later card."""
    for arch in archs:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)[a-z]?", arch)
        if not m:
            continue
        built = (int(m[2]), int(m[3]))
        if (m[1] == "sm" and built[0] == cc[0] and built[1] <= cc[1]) or (m[1] == "compute" and built <= cc):
            return True
    return False


def sm(cc: tuple[int, int]) -> str:
    return f"sm_{cc[0]}{cc[1]}"


def install_hint(cc: tuple[int, int]) -> str:
    """The pip command for a build that drives this card, and which builds do."""
    builds = [b for b in torch_builds() if torch_runs_on(b.archs, cc)]
    if not builds:
        return f"none of PyTorch's builds zeromix knows ({', '.join(b.name for b in torch_builds())}) has kernels for {sm(cc)}"
    return f"pip install torch --index-url {builds[-1].index_url}  (PyTorch's builds with {sm(cc)} kernels: {', '.join(b.name for b in builds)})"


def arch_span(archs: tuple[str, ...]) -> str:
    """A build's kernels in a few words: 'sm_50..sm_90', plus the PTX it carries."""
    sass = [a for a in archs if a.startswith("sm_")]
    ptx = [a for a in archs if a.startswith("compute_")]
    span = f"{sass[0]}..{sass[-1]}" if len(sass) > 1 else (sass[0] if sass else "no kernels")
    return span + (f" + PTX {' '.join(ptx)}" if ptx else "")


class TorchHasKernels:
    """Its node's torch must be a CUDA build with kernels for the card's architecture. Simulated nodes
    (maths on CPU) have nothing to check."""

    name = "torch build"

    def check(self, job: JobSpec | None, card: Card) -> Verdict:
        sw = card.software
        if sw is None:
            return OK
        if sw.torch_cuda is None:
            return Verdict(False, f"torch {sw.torch_version} on {card.node} is a CPU-only build; install a CUDA build there, e.g. "
                                  + install_hint(card.compute_capability))
        if torch_runs_on(sw.torch_archs, card.compute_capability):
            return OK
        return Verdict(False, f"torch {sw.torch_version} (CUDA {sw.torch_cuda}) on {card.node} has no kernels for {sm(card.compute_capability)} "
                              f"(it ships {' '.join(sw.torch_archs) or 'none'}); {install_hint(card.compute_capability)}")


FOUR_BIT_LOWEST_CC = (6, 0)  # bitsandbytes' 4-bit (NF4/FP4) kernels; LLM.int8 would need 7.5


@functools.cache
def _bitsandbytes_libraries() -> tuple[tuple[tuple[int, int], tuple[int, int]], ...]:
    """(CUDA version from which a bitsandbytes library is used, the lowest compute capability it has code for)."""
    rows = catalog.data_rows("bitsandbytes_cuda.csv")
    return tuple(sorted((_version(r["cuda_from"]), divmod(int(r["lowest_sm"]), 10)) for r in rows))


def _version(text: str) -> tuple[int, int]:
    major, minor = (text.split(".") + ["0"])[:2]
    return int(major), int(minor)


class FourBitKernels:
    """QLoRA runs bitsandbytes' 4-bit kernels on the card: compute capability 6.0+, bitsandbytes installed on its
    node, and a bitsandbytes library with code for it (chosen by torch's CUDA version: 12.8 has no sm_6x, 13.x
    starts at sm_75). A simulated node runs on the head's machine, where `zeromix submit` checks the install."""

    name = "method qlora"

    def check(self, job: JobSpec, card: Card) -> Verdict:
        if job.method != "qlora":
            return OK
        cc = card.compute_capability
        if cc < FOUR_BIT_LOWEST_CC:
            return Verdict(False, f"bitsandbytes' 4-bit kernels need compute capability 6.0+ ({sm(cc)} has none); use method lora or full here")
        sw = card.software
        if sw is None or sw.torch_cuda is None:
            return OK  # simulated, or a CPU-only build (TorchHasKernels says so)
        if not sw.bitsandbytes_version:
            return Verdict(False, f"bitsandbytes is not installed on {card.node}; there: pip install 'zeromix[qlora]'")
        lowest = max((low for since, low in _bitsandbytes_libraries() if since <= _version(sw.torch_cuda)), default=(0, 0))
        if cc < lowest:
            return Verdict(False, f"bitsandbytes' library for CUDA {sw.torch_cuda} has no code for {sm(cc)} (it starts at {sm(lowest)}); "
                                  f"install a torch build on an older CUDA on {card.node}: {install_hint(cc)}")
        return OK


def cards_its_build_cannot_drive(node) -> tuple[Card, ...]:
    """The cards of a box that its own torch build has no kernels for (a CPU-only build drives none)."""
    return tuple(c for c in node.cards if not TorchHasKernels().check(None, c).ok)


# Filters that depend only on the card, not on a job: `zeromix nodes` shows their verdict as "usable".
CARD_FILTERS = (TorchHasKernels(),)
DEFAULT_FILTERS = (NotHeld(), *CARD_FILTERS, AllowedModel(), MinVram(), MinComputeCapability(), SupportsPrecision(), FourBitKernels())


def usability(card: Card) -> Verdict:
    return next((v for v in (f.check(None, card) for f in CARD_FILTERS) if not v.ok), OK)
