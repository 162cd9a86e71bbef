"""A test double of NVML's Python API (`pynvml`, from nvidia-ml-py), for machines without an NVIDIA driver.

It answers the calls zeromix's probe makes with a real machine's values, read from a box file (JSON under
tests/data/nvml_boxes/), and raises `NVMLError` with NVML's own codes and messages where a real NVML raises:
no library, a feature the card lacks (NVLink on a GeForce 1080 Ti), an index past the last card.

Use it in-process with `use_box(path)`, or in a subprocess by putting this directory first on PYTHONPATH and
naming the box in ZEROMIX_TEST_NVML_BOX (how the network-namespace test gives each "host" its own cards).
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
_MESSAGES = {1: "Uninitialized", 2: "Invalid Argument", 3: "Not Supported", 9: "Driver Not Loaded",
             12: "NVML Shared Library Not Found", 13: "Function Not Found", 15: "GPU is lost"}

NVML_CLOCK_GRAPHICS, NVML_CLOCK_SM, NVML_CLOCK_MEM = 0, 1, 2
NVML_FEATURE_DISABLED, NVML_FEATURE_ENABLED = 0, 1
NVML_NVLINK_MAX_LINKS = 36
NVML_P2P_CAPS_INDEX_READ = 0
NVML_P2P_STATUS_OK = 0
NVML_P2P_STATUS_NOT_SUPPORTED = 5


class NVMLError(Exception):
    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"Unknown Error {self.value}")


_box: dict | None = None
_initialised = False


def use_box(path: str | os.PathLike | None) -> None:
    """Make this NVML answer as the machine described in `path` (None: as the environment names)."""
    global _box, _initialised
    _box, _initialised = (json.loads(open(path).read()) if path else None), False


def _machine() -> dict:
    global _box
    if _box is None:
        path = os.environ.get("ZEROMIX_TEST_NVML_BOX")
        _box = json.loads(open(path).read()) if path else {"missing": True}
    return _box


def _ready() -> dict:
    if not _initialised:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return _machine()


def _device(handle) -> dict:
    device = _ready()["devices"][handle.index]
    if device.get("lost"):
        raise NVMLError(NVML_ERROR_GPU_IS_LOST)  # what a card that fell off the bus answers to everything
    return device


def _supported(handle, function: str) -> dict:
    device = _device(handle)
    if function in device.get("unsupported", []):
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return device


def nvmlInit() -> None:
    global _initialised
    machine = _machine()
    if machine.get("missing"):
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    if machine.get("driver_not_loaded"):
        raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)
    _initialised = True


def nvmlShutdown() -> None:
    global _initialised
    _ready()
    _initialised = False


def nvmlSystemGetDriverVersion() -> str:
    return _ready()["driver_version"]


def nvmlSystemGetCudaDriverVersion() -> int:
    return _ready()["cuda_driver_version"]


def nvmlDeviceGetCount() -> int:
    return len(_ready()["devices"])


def nvmlDeviceGetHandleByIndex(index: int):
    if not 0 <= index < len(_ready()["devices"]):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return SimpleNamespace(index=index)


def nvmlDeviceGetName(handle) -> str:
    return _device(handle)["name"]


def nvmlDeviceGetUUID(handle) -> str:
    return _device(handle)["uuid"]


def nvmlDeviceGetPciInfo(handle):
    return SimpleNamespace(busId=_device(handle)["pci_bus_id"])


def nvmlDeviceGetMemoryInfo(handle):
    d = _device(handle)
    total, free = d["memory_total_mib"] * 1024**2, d["memory_free_mib"] * 1024**2
    return SimpleNamespace(total=total, free=free, used=total - free)


def nvmlDeviceGetCudaComputeCapability(handle) -> tuple[int, int]:
    major, minor = _device(handle)["compute_capability"]
    return major, minor


def nvmlDeviceGetNumGpuCores(handle) -> int:
    return _supported(handle, "nvmlDeviceGetNumGpuCores")["cuda_cores"]


def nvmlDeviceGetMaxClockInfo(handle, clock_type: int) -> int:
    clocks = _supported(handle, "nvmlDeviceGetMaxClockInfo")["max_clocks_mhz"]
    return clocks[{NVML_CLOCK_GRAPHICS: "graphics", NVML_CLOCK_SM: "sm", NVML_CLOCK_MEM: "mem"}[clock_type]]


def nvmlDeviceGetMemoryBusWidth(handle) -> int:
    return _supported(handle, "nvmlDeviceGetMemoryBusWidth")["memory_bus_bits"]


def nvmlDeviceGetPowerManagementLimit(handle) -> int:
    return _supported(handle, "nvmlDeviceGetPowerManagementLimit")["power_limit_mw"]


def nvmlDeviceGetMaxPcieLinkGeneration(handle) -> int:
    return _device(handle)["max_pcie_gen"]


def nvmlDeviceGetMaxPcieLinkWidth(handle) -> int:
    return _device(handle)["max_pcie_width"]


def nvmlDeviceGetP2PStatus(handle1, handle2, caps_index: int) -> int:
    pair = sorted((handle1.index, handle2.index))
    return next((status for a, b, status in _ready().get("p2p_read", []) if [a, b] == pair), NVML_P2P_STATUS_NOT_SUPPORTED)


def _link(handle, link: int) -> dict:
    links = _device(handle).get("nvlinks")
    if links is None:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)  # a card without NVLink
    if link >= len(links):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)  # past this card's last link
    return links[link]


def nvmlDeviceGetNvLinkState(handle, link: int) -> int:
    return _link(handle, link)["state"]


def nvmlDeviceGetNvLinkRemotePciInfo(handle, link: int):
    return SimpleNamespace(busId=_link(handle, link)["remote_bus_id"])
