"""One training process, pinned to one card. The job driver starts one per placement-group bundle."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict


def card_env(index: int) -> dict[str, str]:
    """Make the process see exactly the planned card. Ray hands out GPU ids by count, not by the card a
    bundle reserved, so zeromix stops Ray from masking and sets the visible device itself, numbered in
    PCI bus order as NVML numbers it."""
    return {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(index)}


class RankWorker:
    def __init__(self, card: dict):
        self.card = card

    def where(self) -> dict:
        """What this process runs on: the card it was promised and the device it actually sees."""
        import ray
        import torch

        on_gpu = torch.cuda.is_available()
        return {
            "card": f"{self.card['node']}/{self.card['index']}",
            "node_id": ray.get_runtime_context().get_node_id(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        }

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address and a free port for torch.distributed."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def run(self, config_json: str, rank: int, world_size: int, master_addr: str, master_port: int) -> dict:
        from workers.train import RankInfo, TrainConfig, main

        return asdict(main(TrainConfig.from_json(config_json), RankInfo(rank, world_size, master_addr, master_port)))
