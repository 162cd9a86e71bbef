"""Host RAM is one box's, shared by every job placed on it. The planner counts one job's need (DeepSpeed's
accounting: offloaded optimizer states, the base a LoRA rank loads) against the box alone; this counts the jobs
placed together, so two offloading fine-tunes that each need 58 GiB do not both start on a 64 GB box. A plan
the planner accepted on a box with nothing else on it always starts there: this only keeps jobs apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.inventory import ClusterSnapshot
from orchestrator.planner import HOST_RAM_RESERVED, Plan
from orchestrator.planner.memory import GIB
from orchestrator.queue import JobRecord


@dataclass
class HostRam:
    capacity: dict[str, float]  # node -> bytes its jobs may use: its RAM less what the OS and data pipeline keep
    used: dict[str, float] = field(default_factory=dict)  # node -> bytes its active jobs' plans need (estimates)
    users: dict[str, list[str]] = field(default_factory=dict)  # node -> the active jobs with ranks there
    needs: dict[str, dict[str, float]] = field(default_factory=dict)  # job id -> node -> bytes its plan needs there

    @classmethod
    def in_use(cls, snapshot: ClusterSnapshot, active: list[JobRecord]) -> HostRam:
        ram = cls({node.name: node.ram_gb * GIB - HOST_RAM_RESERVED for node in snapshot.nodes})
        for record in active:
            ram._add(record.id, {node: gib * GIB for node, gib in (record.plan or {}).get("est_host_gib", {}).items()})
        return ram

    def crowded(self, plan: Plan) -> list[str]:
        """The plan's boxes whose RAM it would take past what jobs may use there, beside the jobs already on them."""
        return [node for node, need in plan.host_bytes_per_node.items()
                if self.users.get(node) and node in self.capacity and self.used.get(node, 0.0) + need > self.capacity[node]]

    def shortfall(self, plan: Plan) -> str | None:
        """Why this plan cannot start beside the jobs already on its boxes, one line; None when it can."""
        for node in self.crowded(plan):
            need, used = plan.host_bytes_per_node[node], self.used[node]
            return (f"host RAM on {node}: it needs about {need / GIB:.0f} GiB beside job(s) {', '.join(self.users[node])} using "
                    f"about {used / GIB:.0f} GiB of the {self.capacity[node] / GIB:.0f} GiB jobs may use there (estimates); "
                    "it waits until they end")
        return None

    def copy(self) -> HostRam:
        return HostRam(dict(self.capacity), dict(self.used), {node: list(jobs) for node, jobs in self.users.items()},
                       dict(self.needs))

    def without(self, job_id: str) -> HostRam:
        """As if that job had ended: for placing it again (a move) beside the others."""
        ram = HostRam(dict(self.capacity))
        for other, need in self.needs.items():
            if other != job_id:
                ram._add(other, need)
        return ram

    def take(self, job_id: str, plan: Plan) -> None:
        self._add(job_id, plan.host_bytes_per_node)

    def _add(self, job_id: str, need: dict[str, float]) -> None:
        self.needs[job_id] = need
        for node, amount in need.items():
            self.used[node] = self.used.get(node, 0.0) + amount
            self.users.setdefault(node, []).append(job_id)
