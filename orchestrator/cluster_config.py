"""`cluster.yaml`: the homelab's nodes, their cards and the links between them."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from orchestrator import catalog
from orchestrator.errors import InputError
from orchestrator.schema import StrictModel, load_yaml

# Nominal line rates; the planner applies its own efficiency factor (1 GbE moves ~0.11 GB/s in practice).
LINK_GBIT_PER_S = {"1GbE": 1.0, "2.5GbE": 2.5, "5GbE": 5.0, "10GbE": 10.0, "25GbE": 25.0, "40GbE": 40.0, "100GbE": 100.0}
LinkName = Literal["1GbE", "2.5GbE", "5GbE", "10GbE", "25GbE", "40GbE", "100GbE"]


class GpuEntry(StrictModel):
    model: str = Field(description="The card's name as NVML reports it, e.g. 'NVIDIA GeForce RTX 3090'.")
    count: int = Field(1, ge=1, le=16)
    vram_gb: float | None = Field(None, gt=0, description="Only needed to tell same-name variants apart.")


class NodeEntry(StrictModel):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    address: str
    ram_gb: float = Field(gt=0)
    cpus: int = Field(8, ge=1)
    gpus: list[GpuEntry] = Field(default_factory=list)
    link: LinkName | None = Field(None, description="This node's link to the others; defaults to network.link.")
    nic: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,15}$",
                            description="The network interface that reaches the other nodes (NCCL_SOCKET_IFNAME), e.g. enp3s0.")

    @field_validator("address")
    @classmethod
    def _ip(cls, value: str) -> str:
        ipaddress.ip_address(value)  # raises ValueError with a clear text
        return value


class HeadEntry(StrictModel):
    address: str
    port: int = Field(6379, ge=1024, le=65535)
    dashboard_port: int = Field(8265, ge=1024, le=65535)


class NetworkEntry(StrictModel):
    link: LinkName = "1GbE"


class ClusterConfig(StrictModel):
    name: str = "homelab"
    head: HeadEntry
    network: NetworkEntry = NetworkEntry()
    nodes: list[NodeEntry] = Field(min_length=1)

    @property
    def head_node(self) -> NodeEntry:
        return next(n for n in self.nodes if n.address == self.head.address)

    def link_gbit_per_s(self, node: NodeEntry) -> float:
        return LINK_GBIT_PER_S[node.link or self.network.link]


def load_cluster(path: str | Path) -> ClusterConfig:
    config = load_yaml(path, ClusterConfig)
    _check_semantics(str(path), config)
    return config


def _check_semantics(source: str, config: ClusterConfig) -> None:
    addresses = [n.address for n in config.nodes]
    if config.head.address not in addresses:
        raise InputError(source, "head.address", config.head.address, f"it must be the address of one of the nodes: {', '.join(addresses)}")
    for i, node in enumerate(config.nodes):
        first = next(k for k, n in enumerate(config.nodes) if n.name == node.name)
        if first != i:
            raise InputError(source, f"nodes[{i}].name", node.name, f"node names must be unique; nodes[{first}] is already {node.name!r}")
        for j, gpu in enumerate(node.gpus):
            field = f"nodes[{i}].gpus[{j}].model"
            found = catalog.candidates(gpu.model)
            if not found:
                hint = ", ".join(repr(s) for s in catalog.suggest(gpu.model)) or "see orchestrator/data/gpu_specs.csv"
                raise InputError(source, field, gpu.model, f"not a card in the catalog; did you mean {hint}?")
            if len(found) > 1 and gpu.vram_gb is None:
                sizes = ", ".join(f"{s.vram_gib:g}" for s in found)
                raise InputError(source, field, gpu.model, f"several cards share this name; add vram_gb (one of {sizes}) to say which")


def declared_spec(gpu: GpuEntry) -> catalog.GpuSpec:
    """The catalog entry for a cluster.yaml card entry (already checked by `load_cluster`)."""
    memory_mib = round(gpu.vram_gb * catalog.MIB_PER_GIB) if gpu.vram_gb else None
    spec = catalog.lookup(gpu.model, memory_mib)
    assert spec is not None, "load_cluster checks every model against the catalog"
    return spec
