"""What the head knows about the cluster at one moment: nodes, their cards, and which job holds which card.

Plain frozen data, built at the edge (registry.py) and passed into the planner, never read from a global.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator import catalog
from orchestrator.cluster_config import ClusterConfig, declared_spec


def card_resource(node: str, index: int) -> str:
    """The Ray custom resource that stands for exactly one card; a placement-group bundle asks for it."""
    return f"zm_card_{node}_{index}"


@dataclass(frozen=True)
class Card:
    node: str
    index: int  # NVML / PCI-bus order on its node
    model: str  # NVML name
    vram_mib: int
    compute_capability: tuple[int, int]
    spec: catalog.GpuSpec | None  # None for a card the catalog does not know
    held_by: str | None = None  # job id holding it, if any

    @property
    def card_id(self) -> str:
        return f"{self.node}/{self.index}"

    @property
    def resource(self) -> str:
        return card_resource(self.node, self.index)

    @property
    def short_name(self) -> str:
        return self.spec.name if self.spec else self.model


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    ram_gb: float
    cpus: int
    link_gbit_per_s: float
    cards: tuple[Card, ...]
    simulated: bool


@dataclass(frozen=True)
class ClusterSnapshot:
    nodes: tuple[Node, ...]

    @property
    def cards(self) -> tuple[Card, ...]:
        return tuple(card for node in self.nodes for card in node.cards)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def with_holders(self, holders: dict[str, str]) -> ClusterSnapshot:
        """Mark cards (by resource name) as held by the given job ids."""
        def mark(card: Card) -> Card:
            return Card(**{**card.__dict__, "held_by": holders.get(card.resource)})

        return ClusterSnapshot(tuple(Node(**{**n.__dict__, "cards": tuple(mark(c) for c in n.cards)}) for n in self.nodes))


def snapshot_from_config(config: ClusterConfig, simulated: bool = True) -> ClusterSnapshot:
    """The cluster as cluster.yaml declares it; the simulated cluster registers exactly this."""
    nodes = []
    for entry in config.nodes:
        cards, index = [], 0
        for gpu in entry.gpus:
            spec = declared_spec(gpu)
            for _ in range(gpu.count):
                vram_mib = round((gpu.vram_gb or spec.vram_gib) * catalog.MIB_PER_GIB)
                cards.append(Card(entry.name, index, spec.nvml_name, vram_mib, spec.compute_capability, spec))
                index += 1
        nodes.append(Node(entry.name, entry.address, entry.ram_gb, entry.cpus, config.link_gbit_per_s(entry), tuple(cards), simulated))
    return ClusterSnapshot(tuple(nodes))


def node_to_record(node: Node) -> dict:
    """The registration record a node publishes (JSON); the catalog entry is looked up again on read."""
    return {
        "name": node.name, "address": node.address, "ram_gb": node.ram_gb, "cpus": node.cpus,
        "link_gbit_per_s": node.link_gbit_per_s, "simulated": node.simulated,
        "cards": [{"index": c.index, "model": c.model, "vram_mib": c.vram_mib, "compute_capability": list(c.compute_capability)} for c in node.cards],
    }


def node_from_record(record: dict) -> Node:
    cards = tuple(
        Card(record["name"], c["index"], c["model"], c["vram_mib"], tuple(c["compute_capability"]), catalog.lookup(c["model"], c["vram_mib"]))
        for c in record["cards"]
    )
    return Node(record["name"], record["address"], record["ram_gb"], record["cpus"], record["link_gbit_per_s"], cards, record["simulated"])
