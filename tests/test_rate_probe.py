"""Measured card rates: the probe's own code run on the CPU (it is device-agnostic), the record that carries
its figures to the head, and the planner preferring a measured rate to the catalog's."""

import dataclasses
import json
import math

import pytest

from orchestrator.inventory import MeasuredRates, node_from_record, node_to_record
from orchestrator.planner import make_plan, step_time
from tests.conftest import NVML_BOXES
from orchestrator.model_facts import facts_from_config
from tests.helpers import model_config, pool
from tests.helpers import scenario as job

LLAMA_1B = facts_from_config(model_config("llama-3.2-1b"))
from workers import gpu_probe, rate_probe


@pytest.fixture(scope="module")
def cpu_rates() -> MeasuredRates:
    return rate_probe.measure("cpu")


def test_probing_the_cpu_measures_every_precision_memory_and_no_pcie_in_seconds(cpu_rates):
    rates = dict(cpu_rates.matmul_tflops)
    assert set(rates) == {"fp32", "fp16", "bf16"}  # the host runs all three (however slowly)
    assert all(0 < r < 100 and math.isfinite(r) for r in rates.values())
    assert 0 < cpu_rates.memory_gb_s < 2000
    assert cpu_rates.host_to_device_gb_s is None  # the probed device is the host: no PCIe in between
    assert cpu_rates.probe_s < 60  # seconds, not minutes


def test_a_measured_card_survives_the_registry_record(cpu_rates):
    node = pool(("box", 64, ["RTX 3090", "RTX 4090"])).nodes[0]
    card = node.cards[0]
    measured = dataclasses.replace(card, facts=dataclasses.replace(card.facts, measured=cpu_rates))
    node = dataclasses.replace(node, cards=(measured, node.cards[1]), link_measured_gbit_per_s=0.94)
    back = node_from_record(json.loads(json.dumps(node_to_record(node))))
    assert back.cards[0].facts.measured == cpu_rates and back.cards[1].facts.measured is None
    assert back.link_measured_gbit_per_s == 0.94


def _with_measured(snapshot, card_id: str, tflops: dict[str, float], h2d: float | None = None):
    def update(card):
        if card.card_id != card_id:
            return card
        rates = MeasuredRates(tuple(tflops.items()), 900.0, h2d, 0.0, 3.0)
        return dataclasses.replace(card, facts=dataclasses.replace(card.facts, measured=rates))

    return dataclasses.replace(snapshot, nodes=tuple(dataclasses.replace(n, cards=tuple(update(c) for c in n.cards)) for n in snapshot.nodes))


def test_the_planner_uses_a_measured_rate_and_says_which_rate_is_which():
    """Two 3090s on paper; one measures half the other's rate (a hot, throttled card): it gets fewer samples,
    and the plan says its rate is measured and the other's the catalog's."""
    homelab = pool(("box", 64, ["RTX 3090", "RTX 3090"]))
    spec = job(method="lora", global_batch_size=48, precision="bf16", gpus={"count": 2})
    even = make_plan(spec, LLAMA_1B, homelab, 100)
    assert [r.tuning.micro_batch for r in even.ranks] == [24, 24] or even.grad_accum > 1
    catalog = homelab.cards[0].spec.matmul_tflops("bf16")
    throttled = _with_measured(homelab, "box/1", {"fp32": 17.0, "bf16": catalog / 2 / step_time.MEASURED_RATE_EFFICIENCY * step_time.ASSUMED_EFFICIENCY})
    plan = make_plan(spec, LLAMA_1B, throttled, 100)
    ranks = {r.card.card_id: r for r in plan.ranks}
    assert (ranks["box/0"].rate_source, ranks["box/1"].rate_source) == ("catalog", "measured")
    assert ranks["box/1"].rate_tflops == pytest.approx(ranks["box/0"].rate_tflops / 2)
    share = ranks["box/1"].tuning.micro_batch / (ranks["box/0"].tuning.micro_batch + ranks["box/1"].tuning.micro_batch)
    assert share == pytest.approx(1 / 3, abs=0.05)
    assert plan.summary()["ranks"][1]["rate_source"] == "measured"


def test_a_measured_pcie_link_and_network_link_replace_the_line_rates():
    two_boxes = pool(("a", 64, ["RTX 3090"]), ("b", 64, ["RTX 3090"]))
    node = two_boxes.nodes[1]
    assert step_time.network_gb_per_s(node) == pytest.approx(1 / 8 * step_time.LINK_EFFICIENCY)  # 1 GbE on paper
    assert step_time.network_gb_per_s(dataclasses.replace(node, link_measured_gbit_per_s=0.4)) == pytest.approx(0.05)
    card = _with_measured(two_boxes, "b/0", {"fp32": 30.0}, h2d=6.1).cards[1]
    assert step_time.pcie_gb_per_s(card) == 6.1
    assert step_time.pcie_gb_per_s(two_boxes.cards[0]) == pytest.approx(16 * 1.969 * step_time.LINK_EFFICIENCY)  # the 3090: gen 4 x16
    # a precision the probe did not measure (bf16 on this card) falls back to the catalog
    assert step_time.rate_source(card, "bf16") == "catalog" and step_time.rate_source(card, "fp32") == "measured"


def test_cards_this_torch_cannot_drive_are_registered_unmeasured_with_a_warning(nvml, tmp_path):
    """The NVML double is a real box's cards; this machine's torch is a CPU build, so nothing is measured and
    the planner keeps the catalog's rates for them."""
    nvml.use_box(NVML_BOXES / "desk_3090_4090.json")
    found = rate_probe.with_measured_rates(gpu_probe.probe(str(tmp_path), nvml=nvml))
    assert len(found.cards) == 2 and all(c.measured is None for c in found.cards)
    assert found.warnings[-1].endswith(rate_probe.UNMEASURED) and "cannot use the cards" in found.warnings[-1]


@pytest.mark.cluster
def test_the_link_probe_pulls_bytes_from_another_node(connected):
    """Against the session cluster: the driver pulls from a node other than its own (loopback here, so the
    figure is only checked to be a real, finite rate)."""
    import ray

    from workers.registration import NODE_LABEL

    mine = ray.get_runtime_context().get_node_id()
    other = next(n["Labels"][NODE_LABEL] for n in ray.nodes() if n["Alive"] and n["NodeID"] != mine and NODE_LABEL in n["Labels"])
    gbit = rate_probe.link_gbit_per_s(other)
    assert 0.1 < gbit < 10_000 and math.isfinite(gbit)


@pytest.mark.cluster
def test_probe_on_a_simulated_cluster_says_there_is_nothing_to_measure(connected):
    from tests.conftest import zeromix

    refused = zeromix("probe", check=False)
    assert refused.returncode != 0 and "declared in cluster.yaml, not real: nothing to measure" in refused.stderr
    listing = json.loads(zeromix("nodes", "--json").stdout)
    assert {r["rates"] for r in listing["cards"]} == {"catalog"}
