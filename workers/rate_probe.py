"""What a card achieves, measured in a few seconds: matmul TFLOPS at each precision it runs, device-memory
bandwidth, and host->device copy bandwidth; and, for a node that joins, the link to the head.

Device-agnostic torch code: on a GPU node it probes each card (`cuda:i`, matched to NVML by UUID); on a
CPU-only machine the same code probes the CPU, which is how the tests exercise it. A catalog gives peaks;
these are what this card, in this box, with this driver and cooling, actually reaches.
"""

from __future__ import annotations

import dataclasses
import time

from orchestrator.inventory import CardFacts, MeasuredRates
from workers.gpu_probe import NodeProbe

PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SECONDS_PER_FIGURE = 0.25  # each figure is the best of repeats within about this long: the probe stays in seconds
LARGEST_MATMUL = 8192
COPY_BYTES = {"cuda": 256 * 1024**2, "cpu": 64 * 1024**2}
UNMEASURED = "the planner uses catalog rates for it"  # ends every warning about a card left unmeasured
LINK_PROBE_BYTES = 64 * 1024**2
LINK_PROBE_TIMEOUT_S = 60  # 64 MiB take 0.6 s on 1 GbE, 6 s on 100 Mbit/s


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(device, work, budget_s: float = SECONDS_PER_FIGURE) -> float:
    """The fastest of repeated runs (the least disturbed), at least three, within `budget_s`."""
    work()
    _sync(device)  # warm-up: kernels chosen, memory touched
    best, spent, runs = float("inf"), 0.0, 0
    while runs < 3 or spent < budget_s:
        started = time.perf_counter()
        work()
        _sync(device)
        took = time.perf_counter() - started
        best, spent, runs = min(best, took), spent + took, runs + 1
    return best


def matmul_tflops(device, dtype, budget_s: float = SECONDS_PER_FIGURE) -> float:
    """Square matmuls, grown until one takes 20 ms (small ones measure launch overhead and caches, not the
    card), up to LARGEST_MATMUL."""
    import torch

    n = 512
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        seconds = _best_seconds(device, lambda: a @ b, budget_s)
        if seconds > 0.02 or n >= LARGEST_MATMUL:
            return 2 * n**3 / seconds / 1e12
        n *= 2


def copy_gb_per_s(source, target, budget_s: float = SECONDS_PER_FIGURE) -> float:
    """Bytes read plus bytes written per second by one large copy."""
    seconds = _best_seconds(target.device, lambda: target.copy_(source, non_blocking=True), budget_s)
    moved = source.numel() * source.element_size() * (2 if source.device == target.device else 1)
    return moved / seconds / 1e9


def runs_precision(device, precision: str) -> bool:
    """Precisions a card can train in: fp16 on compute capability 5.3+, bf16 on 8.0+ (not emulated); the host
    runs all three (slowly, where it lacks the instructions: the figure says so)."""
    import torch

    if device.type != "cuda" or precision == "fp32":
        return True
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor) >= ((8, 0) if precision == "bf16" else (5, 3))


def measure(device_name: str, budget_s: float = SECONDS_PER_FIGURE) -> MeasuredRates:
    """Probe one device ("cpu" or "cuda:N"), each figure the best within `budget_s` (a shared or boosting CPU
    needs longer than a card for a steady figure: bench/step_time_accuracy.py gives it 2 s)."""
    import torch

    device = torch.device(device_name)
    started = time.perf_counter()
    rates = tuple((p, round(matmul_tflops(device, getattr(torch, dtype), budget_s), 3))
                  for p, dtype in PRECISIONS.items() if runs_precision(device, p))
    n = COPY_BYTES[device.type] // 4
    memory = copy_gb_per_s(torch.ones(n, device=device), torch.empty(n, device=device), budget_s)
    h2d = None
    if device.type == "cuda":
        host = torch.ones(n, device="cpu", pin_memory=True)
        h2d = round(copy_gb_per_s(host, torch.empty(n, device=device), budget_s), 2)
        del host
        torch.cuda.empty_cache()
    return MeasuredRates(rates, round(memory, 1), h2d, time.time(), round(time.perf_counter() - started, 2))


def measure_cards(cards: tuple[CardFacts, ...]) -> tuple[dict[int, MeasuredRates], list[str]]:
    """Each card torch can see, matched to its NVML record by UUID (CUDA's order and CUDA_VISIBLE_DEVICES may
    differ from NVML's). A card torch cannot see keeps catalog rates; the warnings say which and why."""
    import torch

    if not cards:
        return {}, []
    if not torch.cuda.is_available():
        return {}, [f"this torch build ({torch.__version__}) cannot use the cards, so none was measured: {UNMEASURED}"]
    by_uuid = {str(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())}
    measured, warnings = {}, []
    for card in cards:
        cuda_index = by_uuid.get((card.uuid or "").removeprefix("GPU-"))
        if cuda_index is None:
            warnings.append(f"card {card.index} is not visible to torch (CUDA_VISIBLE_DEVICES?), so not measured: {UNMEASURED}")
            continue
        try:
            measured[card.index] = measure(f"cuda:{cuda_index}")
        except RuntimeError as err:  # out of memory on a card in use, a driver fault: the card still registers
            warnings.append(f"card {card.index} could not be measured ({str(err).splitlines()[0]}): {UNMEASURED}")
    return measured, warnings


def with_measured_rates(probe: NodeProbe) -> NodeProbe:
    """A node's probe with each card's measured rates (and a warning for each card left unmeasured)."""
    measured, warnings = measure_cards(probe.cards)
    cards = tuple(dataclasses.replace(c, measured=measured.get(c.index)) for c in probe.cards)
    return dataclasses.replace(probe, cards=cards, warnings=probe.warnings + tuple(warnings))


def link_gbit_per_s(from_node: str) -> float:
    """Achieved Gbit/s from `from_node` to this driver's node: the time to pull LINK_PROBE_BYTES made there
    through Ray's object manager (the best of two). A lower bound on what NCCL reaches on the same wire."""
    import numpy as np
    import ray

    from workers.registration import NODE_LABEL

    make = ray.remote(num_cpus=0)(lambda n: np.ones(n, dtype=np.uint8)).options(label_selector={NODE_LABEL: from_node})
    try:
        ray.get(make.remote(1), timeout=LINK_PROBE_TIMEOUT_S)  # a worker there, started
        best = float("inf")
        for _ in range(2):
            ref = make.remote(LINK_PROBE_BYTES)
            ray.wait([ref], fetch_local=False, timeout=LINK_PROBE_TIMEOUT_S)  # made there, not yet here
            started = time.perf_counter()
            ray.get(ref, timeout=LINK_PROBE_TIMEOUT_S)
            best = min(best, time.perf_counter() - started)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"the link probe from {from_node} did not finish in {LINK_PROBE_TIMEOUT_S} s: is that node up "
                           "(`zeromix nodes`) and the network between them working? `zeromix probe` measures again") from None
    return LINK_PROBE_BYTES * 8 / best / 1e9
