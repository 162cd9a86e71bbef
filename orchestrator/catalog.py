"""The GPU spec catalog: `data/gpu_specs.csv` (sources in `data/gpu_specs_notes.md`) behind a small typed API.

A cell that ends in `?` in the CSV is unconfirmed; the value is kept and its field is listed in
`GpuSpec.unconfirmed`, so whatever prints it can say so. A card the table does not know gets a spec
estimated from what NVML reports (`estimate_spec`), marked `estimated` with every derived field unconfirmed.
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
    sm_count: int | None
    unconfirmed: frozenset[str]
    estimated: bool = False  # not a catalog row: rates derived from NVML's SM count and clocks

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
        sm_count=int(cell("sm_count")),
        unconfirmed=frozenset(unsure),
    )


def data_rows(filename: str) -> list[dict[str, str]]:
    with resources.files("orchestrator").joinpath("data", filename).open(newline="") as f:
        return list(csv.DictReader(f))


@functools.cache
def all_specs() -> tuple[GpuSpec, ...]:
    return tuple(_parse_row(row) for row in data_rows("gpu_specs.csv"))


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


@dataclass(frozen=True)
class ArchRates:
    architecture: str
    fp32_lanes_per_sm: int
    tensor_flop_per_clk_per_sm: int | None  # dense FP16/BF16 with FP32 accumulate; None without tensor cores


@functools.cache
def arch_rates() -> dict[tuple[int, int], ArchRates]:
    """Per-SM rates by compute capability (`data/arch_rates.csv`), for cards the table does not list."""
    table = {}
    for row in data_rows("arch_rates.csv"):
        major, minor = row["compute_capability"].split(".")
        tensor = row["tensor_fp32acc_flop_per_clk_per_sm"]
        table[(int(major), int(minor))] = ArchRates(row["architecture"], int(row["fp32_lanes_per_sm"]), None if tensor == "n/a" else int(tensor))
    return table


ESTIMATED_FIELDS = frozenset({"architecture", "mem_bandwidth_gbs", "fp32_tflops", "tensor_tflops_fp32acc", "pcie_gen", "pcie_lanes", "tdp_w"})


def estimate_spec(name: str, memory_mib: int, compute_capability: tuple[int, int], *, cuda_cores: int | None,
                  max_sm_clock_mhz: int | None, max_mem_clock_mhz: int | None, memory_bus_bits: int | None,
                  power_limit_w: float | None, pcie_gen: int | None, pcie_lanes: int | None) -> GpuSpec:
    """A spec for a card the table does not know, from what NVML reports about it.

    Rates are SM count x per-SM rate of its architecture x NVML's max SM clock; bandwidth is memory clock x
    bus width x 2 (NVML reports the DDR clock). Where NVML lacks a figure, the slowest catalog card of the
    same compute capability stands in. Every derived field is unconfirmed and `estimated` is set.
    """
    kin = min((s for s in all_specs() if s.compute_capability == compute_capability), key=lambda s: s.fp32_tflops, default=None)
    rates = arch_rates().get(compute_capability) or arch_rates().get(max(k for k in arch_rates() if k <= compute_capability))
    sms = cuda_cores // rates.fp32_lanes_per_sm if cuda_cores else (kin.sm_count if kin else None)
    if sms and max_sm_clock_mhz:
        fp32 = sms * rates.fp32_lanes_per_sm * 2 * max_sm_clock_mhz / 1e6
        tensor = sms * rates.tensor_flop_per_clk_per_sm * max_sm_clock_mhz / 1e6 if rates.tensor_flop_per_clk_per_sm else None
    elif kin:
        fp32, tensor = kin.fp32_tflops, kin.tensor_tflops_fp32acc
    else:
        raise ValueError(f"cannot estimate {name!r}: NVML gave no SM count or clock and no catalog card has compute capability {compute_capability}")
    if max_mem_clock_mhz and memory_bus_bits:
        bandwidth = max_mem_clock_mhz * 2 * memory_bus_bits / 8 / 1000
    else:
        bandwidth = kin.mem_bandwidth_gbs if kin else 100.0  # nothing better known; marked unconfirmed below
    at_least_ampere = compute_capability >= (8, 0)
    return GpuSpec(
        name=" ".join(name.split()), architecture=rates.architecture, compute_capability=compute_capability,
        vram_gib=round(memory_mib / MIB_PER_GIB, 1), mem_bandwidth_gbs=round(bandwidth, 1),
        fp32_tflops=round(fp32, 2), tensor_tflops_fp32acc=None if tensor is None else round(tensor, 1),
        bf16=at_least_ampere, tf32=at_least_ampere, nvlink=False, nvlink_bw_gbs=0.0,
        pcie_gen=float(pcie_gen or 3), pcie_lanes=pcie_lanes or 16, tdp_w=power_limit_w or (kin.tdp_w if kin else 250.0),
        nvml_name=name, nvml_name_pre_r465=None, sm_count=sms, unconfirmed=ESTIMATED_FIELDS, estimated=True,
    )
