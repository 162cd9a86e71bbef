"""The worker group: one RankWorker actor per placement-group bundle, a rendezvous, and the run.

Hand-made actors rather than Ray Train's TorchTrainer: Ray Train takes one `resources_per_worker` dict
for all workers, so it cannot ask each worker for its own card resource, and per-card pinning is the
point of zeromix.
"""

from __future__ import annotations

import re

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from workers.rank import RankWorker, card_env


class RankFailed(RuntimeError):
    pass


def actor_name(job_id: str, rank: int, card: dict) -> str:
    """What the Ray dashboard shows for a rank: its job, rank and card, e.g. zm-llama-3f2a1c-r1-rtx3090@desk."""
    model = re.sub(r"[^a-z0-9]", "", card["model"].lower().removeprefix("geforce ").removeprefix("nvidia "))
    return f"zm-{job_id}-r{rank}-{model}@{card['node']}"


class WorkerGroup:
    def __init__(self, placement_group, cards: list[dict], job_id: str):
        remote = ray.remote(RankWorker)
        self.cards = cards
        self.actors = []
        try:
            for i, card in enumerate(cards):
                self.actors.append(remote.options(
                    num_cpus=1, num_gpus=1, resources={card["resource"]: 1},
                    scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=i),
                    runtime_env={"env_vars": {**card_env(card["index"]), **card.get("env", {})}},
                    name=actor_name(job_id, i, card),
                ).remote(card))
        except BaseException:
            self.shutdown()
            raise

    def where(self) -> list[dict]:
        return ray.get([a.where.remote() for a in self.actors])

    def run(self, config_json: str) -> list[dict]:
        """Train on every rank; the first rank to fail stops the others (they would wait in a collective forever)."""
        addr, port = ray.get(self.actors[0].rendezvous.remote())
        world = len(self.actors)
        pending = {a.run.remote(config_json, rank, world, addr, port): rank for rank, a in enumerate(self.actors)}
        results: dict[int, dict] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            rank = pending.pop(done[0])
            try:
                results[rank] = ray.get(done[0])
            except Exception as err:
                self.shutdown()
                raise RankFailed(f"rank {rank} on {self.cards[rank]['node']}/{self.cards[rank]['index']} failed: {err}") from err
        return [results[r] for r in range(world)]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
