"""The node probe, run against a double of NVML's API that answers as real machines do."""

import json
from pathlib import Path

import torch

from orchestrator import catalog
from workers import gpu_probe
from workers.registration import node_from_probe

BOXES = Path(__file__).parent / "data" / "nvml_boxes"


def test_a_1080ti_and_3090_box(nvml, tmp_path):
    nvml.use_box(BOXES / "attic_1080ti_3090.json")
    probe = gpu_probe.probe(str(tmp_path / "offload"), head_ip="127.0.0.1", nvml=nvml)

    pascal, ampere = probe.cards
    assert (pascal.index, pascal.name, pascal.pci_bus_id) == (0, "NVIDIA GeForce GTX 1080 Ti", "00000000:01:00.0")
    assert (ampere.index, ampere.name, ampere.pci_bus_id) == (1, "NVIDIA GeForce RTX 3090", "00000000:02:00.0")
    assert ampere.uuid.startswith("GPU-") and pascal.uuid != ampere.uuid
    assert (pascal.memory_total_mib, pascal.memory_free_mib, pascal.compute_capability) == (11264, 11172, (6, 1))
    assert (ampere.memory_total_mib, ampere.memory_free_mib, ampere.compute_capability) == (24576, 24253, (8, 6))
    assert (ampere.cuda_cores, ampere.max_sm_clock_mhz, ampere.max_mem_clock_mhz, ampere.memory_bus_bits) == (10496, 2100, 9751, 384)
    assert (pascal.power_limit_w, ampere.power_limit_w) == (250.0, 350.0)
    assert (ampere.pcie_gen, ampere.pcie_width) == (3, 8)  # a 3090 in a PCIe 3.0 board, x8/x8
    assert probe.p2p_pairs == () and probe.nvlink_pairs == ()  # GeForce across architectures: no peer-to-peer, no bridge
    assert (probe.software.driver_version, probe.software.cuda_driver_version) == ("570.133.07", "12.8")
    assert probe.warnings == ()

    node = node_from_probe(probe, "attic", "127.0.0.1", None)
    assert [c.spec.name for c in node.cards] == ["GeForce GTX 1080 Ti", "GeForce RTX 3090"]
    assert [c.resource for c in node.cards] == ["zm_card_attic_0", "zm_card_attic_1"]
    assert not any(c.spec.estimated for c in node.cards)


def test_nvlink_bridge_and_an_old_driver(nvml, tmp_path):
    nvml.use_box(BOXES / "two_3090_nvlink.json")
    probe = gpu_probe.probe(str(tmp_path), nvml=nvml)
    assert probe.nvlink_pairs == ((0, 1),) and probe.p2p_pairs == ((0, 1),)
    assert probe.cards[0].cuda_cores is None  # this driver lacks the call: unknown, not guessed
    assert probe.software.cuda_driver_version == "12.2"


def test_a_box_without_nvml_gives_zero_cards_and_says_why(nvml, tmp_path):
    nvml.use_box(BOXES / "no_driver.json")
    probe = gpu_probe.probe(str(tmp_path), nvml=nvml)
    assert probe.cards == ()
    assert "NVML is not available (NVML Shared Library Not Found)" in probe.warnings[0]
    assert "driver" in probe.warnings[0]
    node = node_from_probe(probe, "nas", "127.0.0.1", None)
    assert node.cards == () and node.warnings == probe.warnings


def test_a_card_the_catalog_lacks_is_registered_with_an_estimate(nvml, tmp_path):
    box = json.loads((BOXES / "attic_1080ti_3090.json").read_text())
    box["devices"][1].update(name="NVIDIA RTX PRO 4000 Blackwell", memory_total_mib=24463, compute_capability=[12, 0], cuda_cores=8960,
                             max_clocks_mhz={"graphics": 2617, "sm": 2617, "mem": 1750}, memory_bus_bits=192, power_limit_mw=140000)
    (tmp_path / "box.json").write_text(json.dumps(box))
    nvml.use_box(tmp_path / "box.json")
    node = node_from_probe(gpu_probe.probe(str(tmp_path), nvml=nvml), "lab", "127.0.0.1", None)
    unknown = node.cards[1]
    assert unknown.spec.estimated and unknown.spec.bf16 and unknown.spec.tdp_w == 140
    assert "not in the catalog" in unknown.warning and "estimated" in unknown.warning
    assert node.cards[0].warning is None


def test_host_and_software_facts(tmp_path):
    facts = gpu_probe.host_facts(str(tmp_path / "offload"), head_ip="127.0.0.1")
    assert facts.cpus >= 1 and facts.ram_gb > 0 and facts.disk_free_gb > 0
    assert facts.nic == "lo"  # the head is this machine
    software = gpu_probe.software_facts()
    assert software.torch_version == torch.__version__ and software.torch_archs == tuple(torch.cuda.get_arch_list())
    assert software.torch_cuda == torch.version.cuda
    assert software.deepspeed_version is not None


def test_the_real_pynvml_on_this_machine_does_not_crash(tmp_path):
    """Whatever this machine has (CI has no driver), the probe answers: cards, or none and why."""
    probe = gpu_probe.probe(str(tmp_path))
    assert probe.cards or "NVML is not available" in probe.warnings[0]


def test_catalog_spec_for_probed_variants(nvml, tmp_path):
    box = json.loads((BOXES / "attic_1080ti_3090.json").read_text())
    box["devices"][1].update(name="NVIDIA GeForce RTX 3060", memory_total_mib=8192, compute_capability=[8, 6])
    (tmp_path / "box.json").write_text(json.dumps(box))
    nvml.use_box(tmp_path / "box.json")
    node = node_from_probe(gpu_probe.probe(str(tmp_path), nvml=nvml), "lab", "127.0.0.1", None)
    assert node.cards[1].spec is catalog.lookup("GeForce RTX 3060 8GB")


def test_a_card_that_fell_off_the_bus_is_skipped_and_the_others_register(nvml, tmp_path):
    box = json.loads((BOXES / "attic_1080ti_3090.json").read_text())
    box["devices"][0]["lost"] = True
    (tmp_path / "box.json").write_text(json.dumps(box))
    nvml.use_box(tmp_path / "box.json")
    probe = gpu_probe.probe(str(tmp_path), nvml=nvml)
    assert [c.name for c in probe.cards] == ["NVIDIA GeForce RTX 3090"] and probe.cards[0].index == 1
    assert probe.warnings == ("card 0 could not be read through NVML (GPU is lost); not registered",)
