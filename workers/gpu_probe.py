"""The node-side probe: this machine's cards through NVML, and the host and software that will drive them.

NVML is passed in (the real `pynvml` by default), so tests run this same code against a double of NVML's
API. A figure NVML does not support on a card (old drivers, GeForce limits) is recorded as unknown, never
guessed here; a machine without NVML (no driver) gives a clear message and zero cards.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass, field
from importlib import metadata
from itertools import combinations

from orchestrator.inventory import CardFacts, Software

MIB = 1024**2


@dataclass(frozen=True)
class HostFacts:
    hostname: str
    address: str  # this host's IP on the route to the head (loopback for a one-machine cluster)
    cpus: int
    ram_gb: float
    offload_dir: str
    disk_free_gb: float
    nic: str | None  # the interface that reaches the head
    nic_speed_mbit: int | None  # its link speed as the kernel reports it; None when unknown


@dataclass(frozen=True)
class NodeProbe:
    host: HostFacts
    software: Software
    cards: tuple[CardFacts, ...]
    p2p_pairs: tuple[tuple[int, int], ...] = ()
    nvlink_pairs: tuple[tuple[int, int], ...] = ()
    warnings: tuple[str, ...] = field(default=())


def _nvml():
    import pynvml

    return pynvml


def _optional(nvml, call, *args):
    """A figure this card or driver may not support: None instead of an error."""
    try:
        return call(*args)
    except nvml.NVMLError as err:
        if err.value in (nvml.NVML_ERROR_NOT_SUPPORTED, nvml.NVML_ERROR_INVALID_ARGUMENT, nvml.NVML_ERROR_FUNCTION_NOT_FOUND):
            return None
        raise


def _card(nvml, index: int) -> CardFacts:
    h = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(h)
    power_mw = _optional(nvml, nvml.nvmlDeviceGetPowerManagementLimit, h)
    return CardFacts(
        index=index,
        name=nvml.nvmlDeviceGetName(h),
        memory_total_mib=memory.total // MIB,
        memory_free_mib=memory.free // MIB,
        compute_capability=tuple(nvml.nvmlDeviceGetCudaComputeCapability(h)),
        uuid=nvml.nvmlDeviceGetUUID(h),
        pci_bus_id=nvml.nvmlDeviceGetPciInfo(h).busId,
        cuda_cores=_optional(nvml, nvml.nvmlDeviceGetNumGpuCores, h),
        max_sm_clock_mhz=_optional(nvml, nvml.nvmlDeviceGetMaxClockInfo, h, nvml.NVML_CLOCK_SM),
        max_mem_clock_mhz=_optional(nvml, nvml.nvmlDeviceGetMaxClockInfo, h, nvml.NVML_CLOCK_MEM),
        memory_bus_bits=_optional(nvml, nvml.nvmlDeviceGetMemoryBusWidth, h),
        power_limit_w=None if power_mw is None else power_mw / 1000,
        pcie_gen=_optional(nvml, nvml.nvmlDeviceGetMaxPcieLinkGeneration, h),
        pcie_width=_optional(nvml, nvml.nvmlDeviceGetMaxPcieLinkWidth, h),
    )


def _links(nvml, cards: list[CardFacts]) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    """Card pairs that can talk peer to peer over PCIe, and pairs joined by NVLink."""
    handles = {c.index: nvml.nvmlDeviceGetHandleByIndex(c.index) for c in cards}
    p2p = tuple((a.index, b.index) for a, b in combinations(cards, 2)
                if _optional(nvml, nvml.nvmlDeviceGetP2PStatus, handles[a.index], handles[b.index],
                             nvml.NVML_P2P_CAPS_INDEX_READ) == nvml.NVML_P2P_STATUS_OK)
    by_bus = {c.pci_bus_id.lower(): c.index for c in cards}
    nvlink = set()
    for card in cards:
        h = handles[card.index]
        for link in range(nvml.NVML_NVLINK_MAX_LINKS):
            state = _optional(nvml, nvml.nvmlDeviceGetNvLinkState, h, link)
            if state is None:
                break  # no NVLink on this card, or no more links
            if state == nvml.NVML_FEATURE_ENABLED:
                peer = by_bus.get(nvml.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId.lower())
                if peer is not None and peer != card.index:
                    nvlink.add(tuple(sorted((card.index, peer))))
    return p2p, tuple(sorted(nvlink))


@dataclass(frozen=True)
class NvmlView:
    """What NVML says about this machine's cards."""

    cards: tuple[CardFacts, ...] = ()
    p2p_pairs: tuple[tuple[int, int], ...] = ()
    nvlink_pairs: tuple[tuple[int, int], ...] = ()
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    warnings: tuple[str, ...] = ()  # why there are no cards, or which card could not be read


def probe_cards(nvml=None) -> NvmlView:
    try:
        nvml = nvml or _nvml()
        nvml.nvmlInit()
    except ImportError:
        return NvmlView(warnings=("pynvml is not installed (pip install nvidia-ml-py); no cards registered",))
    except nvml.NVMLError as err:
        return NvmlView(warnings=(f"NVML is not available ({err}): is the NVIDIA driver installed and loaded? No cards registered",))
    try:
        cards, warnings = [], []
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                cards.append(_card(nvml, index))
            except nvml.NVMLError as err:  # e.g. a card that fell off the bus: the others still register
                warnings.append(f"card {index} could not be read through NVML ({err}); not registered")
        p2p, nvlink = _links(nvml, cards)
        cuda = nvml.nvmlSystemGetCudaDriverVersion()
        return NvmlView(tuple(cards), p2p, nvlink, nvml.nvmlSystemGetDriverVersion(), f"{cuda // 1000}.{cuda % 1000 // 10}", tuple(warnings))
    finally:
        nvml.nvmlShutdown()


def software_facts(driver_version: str | None = None, cuda_driver_version: str | None = None) -> Software:
    import torch

    nccl = None
    if torch.cuda.is_available() or torch.version.cuda:
        try:
            nccl = ".".join(str(x) for x in torch.cuda.nccl.version())
        except (AttributeError, RuntimeError):
            nccl = None  # a build without NCCL (Windows, CPU)
    return Software(torch.__version__, torch.version.cuda, tuple(torch.cuda.get_arch_list()), nccl, installed_version("deepspeed"),
                    driver_version, cuda_driver_version, installed_version("bitsandbytes"))


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _route_interface(head_ip: str) -> tuple[str, str | None, int | None]:
    """This host's address toward the head, the interface it leaves by, and that link's speed (Mbit/s)."""
    import psutil

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((head_ip, 9))  # UDP connect sends nothing; it only picks the route
        local_ip = s.getsockname()[0]
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == local_ip for a in addresses):
            stats = psutil.net_if_stats().get(name)
            return local_ip, name, (stats.speed or None) if stats else None
    return local_ip, None, None


def host_facts(offload_dir: str, head_ip: str | None) -> HostFacts:
    import psutil

    os.makedirs(offload_dir, exist_ok=True)
    address, nic, speed = _route_interface(head_ip or "127.0.0.1")
    return HostFacts(socket.gethostname(), address, os.cpu_count() or 1, round(psutil.virtual_memory().total / 1024**3, 1), offload_dir,
                     round(shutil.disk_usage(offload_dir).free / 1024**3, 1), nic, speed)


def probe(offload_dir: str, head_ip: str | None = None, nvml=None) -> NodeProbe:
    """Everything a node registers about itself."""
    view = probe_cards(nvml)
    return NodeProbe(host_facts(offload_dir, head_ip), software_facts(view.driver_version, view.cuda_driver_version), view.cards,
                     view.p2p_pairs, view.nvlink_pairs, view.warnings)


def free_memory_mib(nvml=None) -> dict[int, int]:
    """Free memory per card index now, for `zeromix nodes`; empty without NVML."""
    return {c.index: c.memory_free_mib for c in probe_cards(nvml).cards}
