"""What the head knows about the cluster at one moment: nodes, their cards and software, and which job
holds which card.

Plain frozen data. A node's facts come from the NVML probe on a real node (workers/gpu_probe.py) or from
cluster.yaml on the simulated cluster; both become the same `Node` and register the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

from orchestrator import catalog
from orchestrator.cluster_config import ClusterConfig, declared_spec


def card_resource(node: str, index: int) -> str:
    """The Ray custom resource that stands for exactly one card; a placement-group bundle asks for it."""
    return f"zm_card_{node}_{index}"


@dataclass(frozen=True)
class MeasuredRates:
    """What a short probe on the card achieved (workers/rate_probe.py), not the catalog's peak."""

    matmul_tflops: tuple[tuple[str, float], ...]  # (precision, TFLOPS) for each precision the card runs
    memory_gb_s: float  # device-memory copy bandwidth, bytes read + written
    host_to_device_gb_s: float | None  # pinned host -> card; None when the probed device is the host itself
    probed_at: float  # unix time
    probe_s: float  # how long the probe took

    def tflops(self, precision: str) -> float | None:
        return dict(self.matmul_tflops).get(precision)


@dataclass(frozen=True)
class CardFacts:
    """One card as NVML reports it (a declared card fills in what cluster.yaml and the catalog say)."""

    index: int  # NVML index = CUDA index under CUDA_DEVICE_ORDER=PCI_BUS_ID
    name: str  # NVML product name
    memory_total_mib: int
    memory_free_mib: int | None  # None for a declared card: nothing measured it
    compute_capability: tuple[int, int]
    uuid: str | None = None
    pci_bus_id: str | None = None
    cuda_cores: int | None = None
    max_sm_clock_mhz: int | None = None
    max_mem_clock_mhz: int | None = None
    memory_bus_bits: int | None = None
    power_limit_w: float | None = None
    pcie_gen: int | None = None
    pcie_width: int | None = None
    measured: MeasuredRates | None = None  # None: not probed (a declared card, a card torch cannot see)
    # How fast jobs really trained on this card, over the planner's estimate for them (1.3: 30% faster), from
    # their measured busy times (workers/rebalance.measured_speeds), averaged over jobs; None: no job has
    # measured it. The planner scales the card's rates by it. A new probe (join, `zeromix probe`) starts afresh.
    training_speed: float | None = None


@dataclass(frozen=True)
class Software:
    """What drives a node's cards. One job must run one torch/NCCL build on all of its nodes."""

    torch_version: str
    torch_cuda: str | None  # None: a CPU-only torch build
    torch_archs: tuple[str, ...]  # torch.cuda.get_arch_list(): sm_XY kernels and compute_XY PTX
    nccl_version: str | None
    deepspeed_version: str | None
    driver_version: str | None
    cuda_driver_version: str | None
    bitsandbytes_version: str | None = None  # for QLoRA (`zeromix[qlora]`); None: not installed

    @property
    def build(self) -> str:
        return f"torch {self.torch_version} / NCCL {self.nccl_version or 'none'}"


@dataclass(frozen=True)
class Card:
    node: str
    facts: CardFacts
    spec: catalog.GpuSpec  # the catalog row, or an estimate (`spec.estimated`) for a card the table lacks
    software: Software | None = None  # its node's; None on a simulated node (maths on CPU, nothing to check)
    held_by: str | None = None  # job id holding it, if any

    @property
    def index(self) -> int:
        return self.facts.index

    @property
    def model(self) -> str:
        return self.facts.name

    @property
    def vram_mib(self) -> int:
        return self.facts.memory_total_mib

    @cached_property  # read in the planner's inner loops
    def compute_capability(self) -> tuple[int, int]:
        return self.facts.compute_capability

    @cached_property  # read in the planner's inner loops: computed once per card
    def card_id(self) -> str:
        return f"{self.node}/{self.index}"

    @cached_property
    def resource(self) -> str:
        return card_resource(self.node, self.index)

    @property
    def short_name(self) -> str:
        return self.spec.name

    @property
    def warning(self) -> str | None:
        if not self.spec.estimated:
            return None
        return (f"{self.card_id} ({self.model}) is not in the catalog: its rates are estimated from NVML "
                f"(~{self.spec.fp32_tflops:g} FP32 TFLOPS, likely high by up to 20%); add it to orchestrator/data/gpu_specs.csv")


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    ram_gb: float
    cpus: int
    link_gbit_per_s: float
    cards: tuple[Card, ...]
    simulated: bool
    software: Software | None = None
    disk_free_gb: float | None = None  # under the offload dir
    nic: str | None = None  # the interface that reaches the head (NCCL_SOCKET_IFNAME)
    link_measured_gbit_per_s: float | None = None  # to the head, measured at join / `zeromix probe`
    p2p_pairs: tuple[tuple[int, int], ...] = ()  # card index pairs with PCIe peer-to-peer
    nvlink_pairs: tuple[tuple[int, int], ...] = ()
    warnings: tuple[str, ...] = ()  # about the node itself, e.g. no NVML; cards carry their own (`Card.warning`)


@dataclass(frozen=True)
class ClusterSnapshot:
    nodes: tuple[Node, ...]

    @property
    def cards(self) -> tuple[Card, ...]:
        return tuple(card for node in self.nodes for card in node.cards)

    def node(self, name: str) -> Node:
        return self._by_name[name]

    @cached_property
    def _by_name(self) -> dict[str, Node]:  # the planner asks for nodes by name thousands of times per plan
        return {n.name: n for n in self.nodes}

    def with_holders(self, holders: dict[str, str]) -> ClusterSnapshot:
        """Mark cards (by resource name) as held by the given job ids."""
        def mark(node: Node) -> Node:
            return dataclasses.replace(node, cards=tuple(dataclasses.replace(c, held_by=holders.get(c.resource)) for c in node.cards))

        return ClusterSnapshot(tuple(mark(n) for n in self.nodes))

    def with_memory_caps(self, caps_mib: dict[str, int]) -> ClusterSnapshot:
        """At most `caps_mib[card id]` MiB free on those cards: what one job learnt by running out of memory there."""
        def cap(card: Card) -> Card:
            if card.card_id not in caps_mib:
                return card
            free = min(caps_mib[card.card_id], card.facts.memory_free_mib or card.vram_mib)
            return dataclasses.replace(card, facts=dataclasses.replace(card.facts, memory_free_mib=free))

        return ClusterSnapshot(tuple(dataclasses.replace(n, cards=tuple(cap(c) for c in n.cards)) for n in self.nodes)) if caps_mib else self


def card_spec(facts: CardFacts) -> catalog.GpuSpec:
    """The catalog row for a card, or an estimate from its NVML facts (marked `estimated`)."""
    return catalog.lookup(facts.name, facts.memory_total_mib) or catalog.estimate_spec(
        facts.name, facts.memory_total_mib, facts.compute_capability, cuda_cores=facts.cuda_cores,
        max_sm_clock_mhz=facts.max_sm_clock_mhz, max_mem_clock_mhz=facts.max_mem_clock_mhz,
        memory_bus_bits=facts.memory_bus_bits, power_limit_w=facts.power_limit_w, pcie_gen=facts.pcie_gen, pcie_lanes=facts.pcie_width)


def build_node(name: str, address: str, ram_gb: float, cpus: int, link_gbit_per_s: float, cards: list[CardFacts], *,
               simulated: bool, software: Software | None = None, **extra) -> Node:
    """The one way a Node is made, from probed or declared card facts."""
    built = tuple(Card(name, facts, card_spec(facts), software) for facts in cards)
    return Node(name, address, ram_gb, cpus, link_gbit_per_s, built, simulated, software, **extra)


def snapshot_from_config(config: ClusterConfig, simulated: bool = True) -> ClusterSnapshot:
    """The cluster as cluster.yaml declares it; the simulated cluster registers exactly this."""
    nodes = []
    for entry in config.nodes:
        declared = []
        for gpu in entry.gpus:
            spec = declared_spec(gpu)
            for _ in range(gpu.count):
                vram_mib = round((gpu.vram_gb or spec.vram_gib) * catalog.MIB_PER_GIB)
                declared.append(CardFacts(len(declared), spec.nvml_name, vram_mib, None, spec.compute_capability))
        nodes.append(build_node(entry.name, entry.address, entry.ram_gb, entry.cpus, config.link_gbit_per_s(entry), declared,
                                simulated=simulated, nic=entry.nic))
    return ClusterSnapshot(tuple(nodes))


def node_to_record(node: Node) -> dict:
    """The registration record a node publishes (JSON). Specs are not stored: they are looked up again on read."""
    record = {f.name: getattr(node, f.name) for f in dataclasses.fields(Node) if f.name != "cards"}
    record["software"] = dataclasses.asdict(node.software) if node.software else None
    record["cards"] = [dataclasses.asdict(c.facts) for c in node.cards]
    return record


def node_from_record(record: dict) -> Node:
    fields = dict(record)
    sw = fields.pop("software")
    software = Software(**{**sw, "torch_archs": tuple(sw["torch_archs"])}) if sw else None
    cards = [CardFacts(**{**c, "compute_capability": tuple(c["compute_capability"]), "measured": _measured(c.get("measured"))})
             for c in fields.pop("cards")]
    fields["p2p_pairs"] = tuple(tuple(p) for p in fields["p2p_pairs"])
    fields["nvlink_pairs"] = tuple(tuple(p) for p in fields["nvlink_pairs"])
    fields["warnings"] = tuple(fields["warnings"])
    return build_node(fields.pop("name"), fields.pop("address"), fields.pop("ram_gb"), fields.pop("cpus"), fields.pop("link_gbit_per_s"),
                      cards, simulated=fields.pop("simulated"), software=software, **fields)


def _measured(record: dict | None) -> MeasuredRates | None:
    if not record:
        return None
    return MeasuredRates(**{**record, "matmul_tflops": tuple((p, float(r)) for p, r in record["matmul_tflops"])})
