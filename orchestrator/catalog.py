"""The GPU spec catalog: `data/gpu_specs.csv` (sources in `data/gpu_specs_notes.md`) behind a small typed API.

A cell that ends in `?` in the CSV is unconfirmed; the value is kept and its field is listed in
`GpuSpec.unconfirmed`, so whatever prints it can say so.
"""

from __future__ import annotations

import csv
import difflib
import functools
from dataclasses import dataclass
from importlib import resources

MIB_PER_GIB = 1024


@dataclass(frozen=True)
class GpuSpec:
    name: str
    architecture: str
    compute_capability: tuple[int, int]
    vram_gib: float
    mem_bandwidth_gbs: float
    fp32_tflops: float
    # Tensor-core FP16/BF16 rate with FP32 accumulate (the rate training uses); None without tensor cores.
    tensor_tflops_fp32acc: float | None
    bf16: bool
    tf32: bool
    nvlink: bool
    nvlink_bw_gbs: float
    pcie_gen: float
    pcie_lanes: int
    tdp_w: float
    nvml_name: str
    nvml_name_pre_r465: str | None
    unconfirmed: frozenset[str]

    def matmul_tflops(self, precision: str) -> float:
        """Peak dense matmul rate for a training precision.

        fp16/bf16 use the tensor rate with FP32 accumulate. Cards without tensor cores (Pascal) run
        fp16 GEMMs at roughly their FP32 rate, so fp16 buys them memory, not time.
        """
        if precision in ("fp16", "bf16") and self.tensor_tflops_fp32acc is not None:
            return self.tensor_tflops_fp32acc
        return self.fp32_tflops


def _cell(row: dict[str, str], key: str, unconfirmed: set[str]) -> str:
    value = row[key].strip()
    if value.endswith("?"):
        unconfirmed.add(key)
        value = value[:-1]
    return value


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # "n/a (no tensor cores)" and the like


def _parse_row(row: dict[str, str]) -> GpuSpec:
    unsure: set[str] = set()
    cell = functools.partial(_cell, row, unconfirmed=unsure)
    major, minor = cell("compute_capability").split(".")
    pre = cell("nvml_name_pre_r465")
    return GpuSpec(
        name=cell("name"),
        architecture=cell("architecture"),
        compute_capability=(int(major), int(minor)),
        vram_gib=float(cell("vram_gib")),
        mem_bandwidth_gbs=float(cell("mem_bandwidth_gbs")),
        fp32_tflops=float(cell("fp32_tflops_boost")),
        tensor_tflops_fp32acc=_number(cell("fp16_tc_dense_fp32acc_tflops")),
        bf16=cell("bf16_supported") == "yes",
        tf32=cell("tf32_supported") == "yes",
        nvlink=cell("nvlink") == "yes",
        nvlink_bw_gbs=float(cell("nvlink_bw_gbs_bidir")),
        pcie_gen=float(cell("pcie_gen")),
        pcie_lanes=int(cell("pcie_lanes")),
        tdp_w=float(cell("tdp_w")),
        nvml_name=cell("nvml_name"),
        nvml_name_pre_r465=None if pre == "n/a" else pre,
        unconfirmed=frozenset(unsure),
    )


@functools.cache
def all_specs() -> tuple[GpuSpec, ...]:
    with resources.files("orchestrator").joinpath("data/gpu_specs.csv").open(newline="") as f:
        return tuple(_parse_row(row) for row in csv.DictReader(f))


def _key(name: str) -> str:
    """Drivers before R465 print "GeForce GTX 1080 Ti"; later ones prefix "NVIDIA ". Compare without
    either prefix, so a user may also write just "RTX 3090"."""
    key = " ".join(name.lower().split())
    return key.removeprefix("nvidia ").removeprefix("geforce ")


@functools.cache
def _by_key() -> dict[str, tuple[GpuSpec, ...]]:
    index: dict[str, list[GpuSpec]] = {}
    for spec in all_specs():
        for name in {spec.name, spec.nvml_name, spec.nvml_name_pre_r465}:
            if name:
                index.setdefault(_key(name), []).append(spec)
    return {k: tuple(dict.fromkeys(v)) for k, v in index.items()}


def candidates(name: str) -> tuple[GpuSpec, ...]:
    """Every catalog entry that answers to this name (same-name variants give more than one)."""
    return _by_key().get(_key(name), ())


def lookup(name: str, memory_mib: int | None = None) -> GpuSpec | None:
    """The catalog entry for an NVML or catalog name. Same-name variants (3060, 3080, 4060 Ti, ...)
    are told apart by total memory: NVML reports a little under the nominal size."""
    found = candidates(name)
    if len(found) <= 1 or memory_mib is None:
        return found[0] if len(found) == 1 else None
    return min(found, key=lambda s: abs(s.vram_gib * MIB_PER_GIB - memory_mib))


def suggest(name: str, limit: int = 3) -> list[str]:
    """Close catalog names, for "did you mean" hints."""
    names = sorted({s.nvml_name for s in all_specs()} | {s.name for s in all_specs()})
    return difflib.get_close_matches(name, names, n=limit, cutoff=0.5)
