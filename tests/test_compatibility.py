"""Software compatibility: a card whose node's torch has no kernels for it, or whose node runs a different
torch/NCCL build than the job's other nodes, is never placed, and the plan says why and how to fix it."""

import dataclasses

import pytest

from orchestrator.inventory import CardFacts, ClusterSnapshot, Software, build_node
from orchestrator.planner import make_plan
from orchestrator.planner.filters import cards_its_build_cannot_drive, torch_builds, torch_runs_on, usability
from tests.helpers import TINY
from tests.helpers import spec as job

# torch.cuda.get_arch_list() of PyTorch's Linux wheels (orchestrator/data/torch_builds.csv)
BUILDS = {b.name: b.archs for b in torch_builds()}
CU126, CU128, CU130 = BUILDS["cu126"], BUILDS["cu128"], BUILDS["cu130"]


def software(version: str, cuda: str | None, archs: tuple[str, ...], nccl: str | None = "2.27.3") -> Software:
    return Software(version, cuda, archs, nccl, "0.19.8", "570.133.07", "12.8")


@pytest.mark.parametrize("archs, cc, runs", [
    (CU126, (6, 1), True),   # sm_60 SASS runs on 6.1
    (CU128, (6, 1), False),  # Pascal dropped from CUDA 12.8 builds
    (CU128, (7, 0), False),  # so was Volta (2.11)
    (CU128, (8, 9), True),   # sm_86 SASS runs on 8.9 (same major, higher minor)
    (CU126, (12, 0), False), # no sm_12x and no PTX: a 5090 needs CUDA 12.8+
    (CU130, (12, 1), True),  # PTX for compute_120 JIT-compiles on later cards
    (("sm_90a",), (9, 0), True),
    ((), (8, 6), False),
])
def test_arch_lists(archs, cc, runs):
    assert torch_runs_on(archs, cc) is runs


def node(name: str, sw: Software | None, *cards: tuple[str, int, tuple[int, int]]):
    facts = [CardFacts(i, model, mib, mib, cc, uuid=f"GPU-{name}-{i}") for i, (model, mib, cc) in enumerate(cards)]
    return build_node(name, f"10.0.0.{len(name)}", 64, 16, 10.0, facts, simulated=False, software=sw)


PASCAL = ("NVIDIA GeForce GTX 1080 Ti", 11264, (6, 1))
AMPERE = ("NVIDIA GeForce RTX 3090", 24576, (8, 6))
ADA = ("NVIDIA GeForce RTX 4090", 24564, (8, 9))
BLACKWELL = ("NVIDIA GeForce RTX 5090", 32607, (12, 0))


def test_pascal_under_a_cuda_12_8_build_is_unusable_with_the_fix():
    attic = node("attic", software("2.13.0+cu128", "12.8", CU128), PASCAL, AMPERE)
    pascal, ampere = attic.cards
    verdict = usability(pascal)
    assert not verdict.ok
    assert "has no kernels for sm_61" in verdict.reason and "cu126" in verdict.reason and "sm_75" in verdict.reason
    assert usability(ampere).ok
    plan = make_plan(job(), TINY, ClusterSnapshot((attic,)), 10)
    assert [r.card.card_id for r in plan.ranks] == ["attic/1"]
    assert any(x.card_id == "attic/0" and "no kernels for sm_61" in x.reason for x in plan.rejected)


def test_a_cpu_only_torch_makes_every_card_of_its_node_unusable():
    box = node("box", software("2.13.0+cpu", None, (), nccl=None), AMPERE)
    assert "CPU-only build" in usability(box.cards[0]).reason


def test_nodes_on_different_builds_never_share_a_job():
    desk = node("desk", software("2.13.0+cu128", "12.8", CU128, nccl="2.27.3"), AMPERE, ADA)
    attic = node("attic", software("2.13.0+cu126", "12.6", CU126, nccl="2.26.2"), PASCAL, AMPERE)
    plan = make_plan(job(gpus={"count": 2}), TINY, ClusterSnapshot((attic, desk)), 10)
    assert {r.card.node for r in plan.ranks} == {"desk"}  # the build with the most compute behind it
    left_out = {x.card_id: x.reason for x in plan.rejected}
    assert set(left_out) == {"attic/0", "attic/1"}
    assert "attic runs torch 2.13.0+cu126 / NCCL 2.26.2, the job's other nodes torch 2.13.0+cu128 / NCCL 2.27.3" in left_out["attic/1"]
    # one build everywhere (cu126 runs all three architectures): no card is left out for its software
    cu126 = software("2.13.0+cu126", "12.6", CU126, nccl="2.26.2")
    one_build = ClusterSnapshot((node("attic", cu126, PASCAL, AMPERE), node("desk", cu126, AMPERE, ADA)))
    assert not any("torch" in x.reason for x in make_plan(job(gpus={"count": 2}), TINY, one_build, 10).rejected)


def test_records_round_trip_through_the_registry_format():
    from orchestrator.inventory import node_from_record, node_to_record

    attic = node("attic", software("2.13.0+cu126", "12.6", CU126), PASCAL, AMPERE)
    attic = dataclasses.replace(attic, p2p_pairs=((0, 1),), warnings=("w",))
    assert node_from_record(node_to_record(attic)) == attic


def test_peer_to_peer_stays_on_only_where_every_pair_has_it():
    cu128 = software("2.13.0+cu128", "12.8", CU128)
    bridged = dataclasses.replace(node("lab", cu128, AMPERE, AMPERE), nvlink_pairs=((0, 1),))
    plan = make_plan(job(gpus={"count": 2}), TINY, ClusterSnapshot((bridged,)), 10)
    assert [r.env for r in plan.ranks] == [{}, {}]  # two NVLinked 3090s in one box: NCCL may use P2P
    mixed = node("desk", cu128, AMPERE, ADA)  # the probe found no P2P pair (a 4090 has none)
    plan = make_plan(job(gpus={"count": 2}), TINY, ClusterSnapshot((mixed,)), 10)
    assert [r.env for r in plan.ranks] == [{"NCCL_P2P_DISABLE": "1"}] * 2


def test_a_pascal_box_on_cu126_and_a_blackwell_box_on_cu130_never_share_a_job():
    """No build drives both a 1080 Ti and a 5090 (cu126 has no sm_120, CUDA 13 no sm_61): each box runs its own,
    and a job runs on one of them, the other's cards listed as left out with the reason."""
    attic = node("attic", software("2.13.0+cu126", "12.6", CU126, nccl="2.26.2"), PASCAL, AMPERE)
    desk = node("desk", software("2.13.0+cu130", "13.0", CU130, nccl="2.27.7"), BLACKWELL)
    assert not cards_its_build_cannot_drive(attic) and not cards_its_build_cannot_drive(desk)
    plan = make_plan(job(gpus={"min": 1}), TINY, ClusterSnapshot((attic, desk)), 10)
    placed = {r.card.node for r in plan.ranks}
    assert len(placed) == 1  # one build
    left_out = {x.card_id: x.reason for x in plan.rejected if "torch" in x.reason}
    other = ({"attic/0", "attic/1"} if placed == {"desk"} else {"desk/0"})
    assert set(left_out) == other and all("the job's other nodes torch" in r for r in left_out.values())
    # the same cards on the other box's build: the build cannot drive them, and the plan says which build would
    pascal_on_cu130 = node("attic", software("2.13.0+cu130", "13.0", CU130), PASCAL, AMPERE)
    assert [c.card_id for c in cards_its_build_cannot_drive(pascal_on_cu130)] == ["attic/0"]
    assert "has no kernels for sm_61" in usability(pascal_on_cu130.cards[0]).reason and "builds with sm_61 kernels: cu126)" in usability(pascal_on_cu130.cards[0]).reason
    blackwell_on_cu126 = node("desk", software("2.13.0+cu126", "12.6", CU126), BLACKWELL)
    verdict = usability(blackwell_on_cu126.cards[0])
    assert "no kernels for sm_120" in verdict.reason and "builds with sm_120 kernels: cu128, cu130)" in verdict.reason


def test_zeromix_nodes_says_per_box_which_build_it_runs_and_what_it_cannot_drive():
    from orchestrator.cli.render import box_build, node_row

    attic = node("attic", software("2.13.0+cu130", "13.0", CU130, nccl="2.27.7"), PASCAL, AMPERE)
    assert box_build(attic) == ("attic: torch 2.13.0+cu130 (CUDA 13.0, kernels sm_75..sm_120 + PTX compute_120), NCCL 2.27.7; "
                                "cannot drive attic/0 GTX 1080 Ti (sm_61)")
    assert node_row(attic)["cannot_drive"] == ["attic/0"]
    desk = node("desk", software("2.13.0+cu126", "12.6", CU126, nccl="2.26.2"), AMPERE, ADA)
    assert box_build(desk).endswith("(CUDA 12.6, kernels sm_50..sm_90), NCCL 2.26.2; drives all 2 card(s)")
    cpu = node("box", software("2.13.0+cpu", None, (), nccl=None), AMPERE)
    assert box_build(cpu) == "box: torch 2.13.0+cpu (CPU-only), NCCL none; cannot drive box/0 RTX 3090 (sm_86)"
    assert box_build(node("head", software("2.13.0+cpu", None, (), nccl=None))).endswith("; no cards")


def test_the_readme_build_table_agrees_with_the_builds_kernels():
    """README: which card needs which build. Each cell is checked against the arch lists the planner uses."""
    from tests.conftest import REPO

    text = (REPO / "README.md").read_text()
    table = text[text.index("| cards | compute capability |"):].split("\n\n", 1)[0].splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[2:] == list(BUILDS)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert len(rows) >= 7
    for cells in rows:
        cc = tuple(int(x) for x in cells[1].split("."))
        for build, cell in zip(header[2:], cells[2:]):
            assert cell == ("yes" if torch_runs_on(BUILDS[build], cc) else "no"), (cells[0], build)
