"""Each box's network link is shared by every job whose ranks span boxes. The planner times one job's
collectives over a link it has alone; two such jobs through the same box each get about half of it, so their
collectives take twice as long while both run (the simulator charges exactly that). This counts who uses each
link, so the policy can price a plan across boxes at what it will really cost: its own slower steps, and the
time it adds to the jobs already on those links. Estimates, from the plans' own figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.planner import Plan
from orchestrator.queue import JobRecord


@dataclass(frozen=True)
class LinkUser:
    job_id: str
    nodes: frozenset[str]
    network_share: float  # of its step, the collectives over the network (est_comm_s / est_step_s)
    rest_s: float  # what is left of its run at its planned pace (an estimate)


@dataclass
class NetworkLinks:
    users: dict[str, list[LinkUser]] = field(default_factory=dict)  # node -> the jobs across boxes with ranks there

    @classmethod
    def in_use(cls, active: list[JobRecord], now: float) -> NetworkLinks:
        links = cls()
        for record in active:
            plan = record.plan or {}
            nodes = frozenset(rank["node"] for rank in plan.get("ranks", ()))
            if len(nodes) > 1 and plan.get("est_step_s"):
                links._add(LinkUser(record.id, nodes, plan.get("est_comm_s", 0.0) / plan["est_step_s"],
                                    max(0.0, (record.est_end or now) - now)))
        return links

    def sharing(self, plan: Plan) -> int:
        """How many jobs across boxes, this one included, would share the busiest of its boxes' links (1 when the
        plan stays inside one box: it uses no link)."""
        nodes = _nodes(plan)
        return 1 + max((len(self.users.get(n, ())) for n in nodes), default=0) if len(nodes) > 1 else 1

    def stretch(self, plan: Plan) -> float:
        """Its steps' time with the links shared, over the planner's time for them alone."""
        return 1.0 + (self.sharing(plan) - 1) * network_share(plan)

    def added_s(self, plan: Plan, run_s: float) -> float:
        """The time a plan that runs `run_s` would add to the jobs already on its links: while both run, each of
        them has one more sharer, so its collectives take longer by about their time alone."""
        nodes = _nodes(plan)
        if len(nodes) <= 1:
            return 0.0
        others = {u.job_id: u for n in nodes for u in self.users.get(n, ())}
        return sum(min(u.rest_s, run_s) * u.network_share for u in others.values())

    def busy_nodes(self) -> set[str]:
        return {node for node, users in self.users.items() if users}

    def take(self, job_id: str, plan: Plan, rest_s: float) -> None:
        nodes = _nodes(plan)
        if len(nodes) > 1:
            self._add(LinkUser(job_id, nodes, network_share(plan), rest_s))

    def copy(self) -> NetworkLinks:
        return NetworkLinks({node: list(users) for node, users in self.users.items()})

    def _add(self, user: LinkUser) -> None:
        for node in user.nodes:
            self.users.setdefault(node, []).append(user)


def network_share(plan: Plan) -> float:
    return plan.step.comm_s / plan.step.step_s if plan.step.step_s else 0.0


def _nodes(plan: Plan) -> frozenset[str]:
    return frozenset(r.card.node for r in plan.ranks)
