"""One training process, pinned to one card. The job driver starts one per placement-group bundle."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import socket

    from workers.collectives import RankInfo


def card_env(index: int) -> dict[str, str]:
    """Make the process see exactly the planned card. Ray hands out GPU ids by count, not by the card a
    bundle reserved, so zeromix stops Ray from masking and sets the visible device itself, numbered in
    PCI bus order as NVML numbers it."""
    return {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(index)}


def _nvml_card(index: int) -> dict | None:
    """What NVML says is at `index` on this machine (PCI bus order); None without NVML."""
    from workers.gpu_probe import probe_cards

    card = next((c for c in probe_cards().cards if c.index == index), None)
    if card is None:
        return None
    return {"name": card.name, "uuid": card.uuid, "pci_bus_id": card.pci_bus_id}


class RankWorker:
    def __init__(self, card: dict):
        self.card = card
        self.hosting: dict[int, socket.socket] = {}  # the sockets bound for the rendezvous this rank hosts, by port

    def where(self) -> dict:
        """What this process runs on. On a real node it is checked against the promised card: NVML's card at
        the visible index must have the promised UUID, and CUDA's device 0 must be that same card. Raises
        rather than train on the wrong card. (A simulated card was declared, not probed: nothing to check.)"""
        import ray
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = _nvml_card(int(visible)) if visible and visible.isdigit() else None
        promised = self.card["card"]
        real = bool(self.card.get("uuid"))
        if real and (seen is None or seen["uuid"] != self.card["uuid"]):
            found = f"{seen['name']} {seen['uuid']}" if seen else "no card"
            raise RuntimeError(f"{promised}: NVML index {visible} is {found}, the plan promised {self.card['model']} {self.card['uuid']}")
        device = "cpu"
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            device = props.name
            if real and f"GPU-{props.uuid}" != seen["uuid"]:
                raise RuntimeError(f"{promised}: CUDA device 0 is GPU-{props.uuid}, not the {seen['name']} ({seen['uuid']}) at NVML index {visible}")
        return {
            "card": promised,
            "node_id": ray.get_runtime_context().get_node_id(),
            "cuda_visible_devices": visible,
            "nvml_name": seen["name"] if seen else None,
            "uuid": seen["uuid"] if seen else None,
            "pci_bus_id": seen["pci_bus_id"] if seen else None,
            "device": device,
        }

    def rendezvous(self) -> tuple[str, int]:
        """This rank's address and a port for a rendezvous it hosts (its box's group, or the leaders' link): the
        port stays bound here until `run` listens on it."""
        import ray

        from workers.ports import bound_socket

        hosted = bound_socket()
        port = hosted.getsockname()[1]
        self.hosting[port] = hosted
        return ray.util.get_node_ip_address(), port

    def run(self, config_json: str, info: RankInfo) -> dict:
        from workers.train import TrainConfig, main

        return asdict(main(TrainConfig.from_json(config_json), info, self.hosting))
