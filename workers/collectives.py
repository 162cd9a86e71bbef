"""The process group a rank joins, and every collective zeromix runs itself (DeepSpeed's engine runs its own).

On a card the group is NCCL's, and NCCL has no CPU collectives: a tensor handed to all-reduce or broadcast
must live on the rank's card, or the first step fails with "No backend type associated with device type
cpu". gloo, which the CPU simulation and the tests use, accepts tensors anywhere, so a CPU run cannot show
that mistake. Hence one door: `RankComm` is bound to the rank's device, makes the tensors it reduces there,
and refuses one that lives elsewhere with a message naming the rule, on CPU as on a card. No other module in
workers/ or orchestrator/ imports torch.distributed or deepspeed.comm (tests/test_collectives.py holds
that, and that every tensor made in workers/ names its device).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    master_addr: str
    master_port: int


class CollectiveOffDevice(RuntimeError):
    """A collective was handed a tensor that is not on the rank's device."""


@dataclass(frozen=True)
class RankComm:
    rank: int
    world: int
    device: torch.device

    @classmethod
    def join(cls, info: RankInfo) -> RankComm:
        """Join the job's process group: NCCL on the rank's card (each rank sees only its own card, so it is
        device 0), gloo on the CPU. The device is set before the group exists, so NCCL binds to it."""
        import torch

        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port),
                          RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK="0")
        device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
        if on_gpu:
            torch.cuda.set_device(device)
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def tensor(self, values, dtype) -> torch.Tensor:
        """Values as a tensor on this rank's device, ready for a collective."""
        import torch

        return torch.tensor(values, dtype=dtype, device=self.device)

    def zeros(self, shape, dtype) -> torch.Tensor:
        import torch

        return torch.zeros(shape, dtype=dtype, device=self.device)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce in place (sum over ranks); returns the tensor."""
        import torch.distributed as dist

        self._check(tensor, "sum")
        dist.all_reduce(tensor)
        return tensor

    def from_first(self, value):
        """Rank 0's `value` on every rank (a picklable object: what rank 0 alone decided, e.g. which
        checkpoint to load). Its bytes travel as a tensor on this rank's device."""
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.on_gpu:
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def leave(self) -> None:
        """Wait for every rank, then close the group (a rank that leaves early would break a peer's last collective)."""
        import torch.distributed as dist

        self.barrier()
        dist.destroy_process_group()

    def _check(self, tensor, what: str) -> None:
        if tensor.device != self.device:
            raise CollectiveOffDevice(
                f"{what}: a {tuple(tensor.shape)} {tensor.dtype} tensor on {tensor.device}, but this rank's collectives "
                f"run on {self.device}; NCCL has no CPU collectives, so every tensor a collective sees must be made on "
                f"the rank's device (RankComm.tensor / RankComm.zeros)")
