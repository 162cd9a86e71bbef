"""The catalog resolves NVML names from old and new drivers, tells same-name variants apart by memory,
keeps unconfirmed cells marked, and estimates a card it does not list."""

import pytest

from orchestrator import catalog

# (name before driver R465 or None if the card is newer, name since R465, memory total NVML reports in MiB, catalog row)
REAL_NVML_NAMES = [
    ("GeForce GTX 1060 6GB", "NVIDIA GeForce GTX 1060 6GB", 6144, "GeForce GTX 1060 6GB"),
    ("GeForce GTX 1070", "NVIDIA GeForce GTX 1070", 8192, "GeForce GTX 1070"),
    ("GeForce GTX 1080", "NVIDIA GeForce GTX 1080", 8192, "GeForce GTX 1080"),
    ("GeForce GTX 1080 Ti", "NVIDIA GeForce GTX 1080 Ti", 11264, "GeForce GTX 1080 Ti"),
    ("TITAN X (Pascal)", "NVIDIA TITAN X (Pascal)", 12288, "NVIDIA TITAN X (Pascal)"),
    ("TITAN Xp", "NVIDIA TITAN Xp", 12288, "NVIDIA TITAN Xp"),
    ("TITAN V", "NVIDIA TITAN V", 12288, "NVIDIA TITAN V"),
    ("GeForce RTX 2060", "NVIDIA GeForce RTX 2060", 6144, "GeForce RTX 2060"),
    ("GeForce RTX 2070 SUPER", "NVIDIA GeForce RTX 2070 SUPER", 8192, "GeForce RTX 2070 SUPER"),
    ("GeForce RTX 2080 Ti", "NVIDIA GeForce RTX 2080 Ti", 11264, "GeForce RTX 2080 Ti"),
    ("TITAN RTX", "NVIDIA TITAN RTX", 24576, "NVIDIA TITAN RTX"),
    ("GeForce RTX 3060", "NVIDIA GeForce RTX 3060", 12288, "GeForce RTX 3060 12GB"),
    (None, "NVIDIA GeForce RTX 3060", 8192, "GeForce RTX 3060 8GB"),
    ("GeForce RTX 3080", "NVIDIA GeForce RTX 3080", 10240, "GeForce RTX 3080 10GB"),
    (None, "NVIDIA GeForce RTX 3080", 12288, "GeForce RTX 3080 12GB"),
    ("GeForce RTX 3090", "NVIDIA GeForce RTX 3090", 24576, "GeForce RTX 3090"),
    (None, "NVIDIA GeForce RTX 4060 Ti", 8188, "GeForce RTX 4060 Ti 8GB"),
    (None, "NVIDIA GeForce RTX 4060 Ti", 16380, "GeForce RTX 4060 Ti 16GB"),
    (None, "NVIDIA GeForce RTX 4090", 24564, "GeForce RTX 4090"),
    (None, "NVIDIA GeForce RTX 5060 Ti", 8151, "GeForce RTX 5060 Ti 8GB"),
    (None, "NVIDIA GeForce RTX 5060 Ti", 16311, "GeForce RTX 5060 Ti 16GB"),
    (None, "NVIDIA GeForce RTX 5090", 32607, "GeForce RTX 5090"),
    ("Tesla P40", "Tesla P40", 24576, "Tesla P40"),
    ("Tesla P100-PCIE-16GB", "Tesla P100-PCIE-16GB", 16384, "Tesla P100 PCIe 16GB"),
    ("Tesla V100-PCIE-32GB", "Tesla V100-PCIE-32GB", 32768, "Tesla V100 PCIe 32GB"),
    ("Tesla V100-SXM2-16GB", "Tesla V100-SXM2-16GB", 16384, "Tesla V100 SXM2 16GB"),
    ("Tesla T4", "Tesla T4", 15360, "Tesla T4"),
    ("RTX A6000", "NVIDIA RTX A6000", 49140, "NVIDIA RTX A6000"),
    ("A100-SXM4-40GB", "NVIDIA A100-SXM4-40GB", 40960, "NVIDIA A100 SXM4 40GB"),
    (None, "NVIDIA A100 80GB PCIe", 81920, "NVIDIA A100 PCIe 80GB"),
    (None, "NVIDIA L4", 23034, "NVIDIA L4"),
    (None, "NVIDIA L40S", 46068, "NVIDIA L40S"),
    (None, "NVIDIA RTX 6000 Ada Generation", 49140, "NVIDIA RTX 6000 Ada Generation"),
    (None, "NVIDIA H100 PCIe", 81559, "NVIDIA H100 PCIe"),
]


@pytest.mark.parametrize("old, new, memory_mib, row", REAL_NVML_NAMES, ids=[r[3] for r in REAL_NVML_NAMES])
def test_real_nvml_names_resolve_to_their_row(old, new, memory_mib, row):
    assert catalog.lookup(new, memory_mib).name == row
    if old:
        assert catalog.lookup(old, memory_mib).name == row


def test_more_than_twenty_cards_are_checked_in_both_formats():
    assert len({r for *_, r in REAL_NVML_NAMES}) >= 30 and sum(old is not None for old, *_ in REAL_NVML_NAMES) >= 20


def test_user_shorthand_and_ambiguity():
    assert catalog.lookup("RTX 3090") is catalog.lookup("NVIDIA GeForce RTX 3090")  # what users type
    assert catalog.lookup("NVIDIA GeForce RTX 3080") is None  # ambiguous without memory
    assert catalog.lookup("NVIDIA GeForce RTX 9999") is None


def test_the_catalog_covers_what_homelabs_buy():
    names = {s.name for s in catalog.all_specs()}
    for series in ("GTX 10", "RTX 20", "RTX 30", "RTX 40", "RTX 50", "TITAN"):
        assert any(series in n for n in names), series
    for card in ("Tesla P40", "Tesla P100 PCIe 16GB", "Tesla V100 PCIe 32GB", "Tesla T4", "NVIDIA RTX A4000", "NVIDIA RTX A5000",
                 "NVIDIA RTX A6000", "NVIDIA A10", "NVIDIA A100 PCIe 80GB", "NVIDIA L4", "NVIDIA L40S",
                 "NVIDIA RTX 6000 Ada Generation", "NVIDIA H100 PCIe"):
        assert card in names


def test_training_rates_follow_the_hardware():
    pascal, ampere = catalog.lookup("NVIDIA GeForce GTX 1080 Ti"), catalog.lookup("NVIDIA GeForce RTX 3090")
    assert pascal.matmul_tflops("fp16") == pascal.fp32_tflops  # no tensor cores: fp16 is no faster
    assert ampere.matmul_tflops("bf16") == 71.2  # GeForce: FP32-accumulate tensor rate, half the FP16-accumulate one
    assert catalog.lookup("NVIDIA RTX A6000").tensor_tflops_fp32acc > 2 * ampere.tensor_tflops_fp32acc  # professional: full rate
    assert "fp16_tc_dense_fp32acc_tflops" in catalog.lookup("NVIDIA GeForce RTX 5090").unconfirmed  # the `?` stays visible


def test_every_row_is_consistent():
    for spec in catalog.all_specs():
        assert spec.bf16 == spec.tf32 == (spec.compute_capability >= (8, 0)), spec.name
        assert spec.mem_bandwidth_gbs > 0 and spec.fp32_tflops > 0 and spec.vram_gib > 0 and spec.tdp_w > 0, spec.name
        assert (spec.tensor_tflops_fp32acc is None) == (spec.compute_capability < (7, 0)), spec.name  # tensor cores from Volta on
        if spec.tensor_tflops_fp32acc:
            assert spec.tensor_tflops_fp32acc > spec.fp32_tflops, spec.name
        assert spec.pcie_gen in (3.0, 4.0, 5.0) and spec.pcie_lanes in (8, 16), spec.name
        assert spec.nvlink == (spec.nvlink_bw_gbs > 0), spec.name
        assert spec.compute_capability in catalog.arch_rates(), spec.name
        assert catalog.arch_rates()[spec.compute_capability].architecture.split()[0] in spec.architecture, spec.name


def _nvml_estimate(name, memory_mib, cc, cores, sm_mhz, mem_mhz, bus_bits, watts=250.0, gen=4):
    return catalog.estimate_spec(name, memory_mib, cc, cuda_cores=cores, max_sm_clock_mhz=sm_mhz, max_mem_clock_mhz=mem_mhz,
                                 memory_bus_bits=bus_bits, power_limit_w=watts, pcie_gen=gen, pcie_lanes=16)


@pytest.mark.parametrize("name, memory, cc, cores, sm_mhz, mem_mhz, bus", [
    ("NVIDIA GeForce GTX 1080 Ti", 11264, (6, 1), 3584, 1911, 5505, 352),  # what a real 1080 Ti's NVML reports
    ("NVIDIA GeForce RTX 3090", 24576, (8, 6), 10496, 2100, 9751, 384),
])
def test_an_estimate_from_nvml_lands_near_the_checked_row(name, memory, cc, cores, sm_mhz, mem_mhz, bus):
    """The estimator's formulas, run on a known card's real NVML values, come within 25% of the table
    (NVML's max clock sits above the reference boost, so they run high, never low)."""
    row, guess = catalog.lookup(name, memory), _nvml_estimate(name, memory, cc, cores, sm_mhz, mem_mhz, bus)
    assert 1.0 <= guess.fp32_tflops / row.fp32_tflops < 1.25
    assert guess.mem_bandwidth_gbs == pytest.approx(row.mem_bandwidth_gbs, rel=0.01)
    if row.tensor_tflops_fp32acc:
        assert 1.0 <= guess.tensor_tflops_fp32acc / row.tensor_tflops_fp32acc < 1.25


def test_an_unknown_card_is_usable_with_its_estimate_marked():
    spec = _nvml_estimate("NVIDIA RTX PRO 4000 Blackwell", 24463, (12, 0), 8960, 2617, 1750, 192, watts=140, gen=5)
    assert spec.estimated and {"fp32_tflops", "tensor_tflops_fp32acc", "mem_bandwidth_gbs"} <= spec.unconfirmed
    assert spec.bf16 and spec.vram_gib == pytest.approx(23.9) and spec.sm_count == 70 and spec.tdp_w == 140
    assert spec.matmul_tflops("bf16") == pytest.approx(70 * 512 * 2617 / 1e6, rel=0.01)
    # no core count or clocks from an old driver: the slowest listed card of its compute capability stands in
    bare = catalog.estimate_spec("NVIDIA GeForce GTX 1050", 2048, (6, 1), cuda_cores=None, max_sm_clock_mhz=None,
                                 max_mem_clock_mhz=None, memory_bus_bits=None, power_limit_w=None, pcie_gen=None, pcie_lanes=None)
    slowest_pascal = min((s for s in catalog.all_specs() if s.compute_capability == (6, 1)), key=lambda s: s.fp32_tflops)
    assert bare.estimated and bare.fp32_tflops == slowest_pascal.fp32_tflops and bare.tensor_tflops_fp32acc is None
