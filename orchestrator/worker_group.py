"""The worker group: one RankWorker actor per placement-group bundle, a rendezvous, and the run.

Hand-made actors rather than Ray Train's TorchTrainer: Ray Train takes one `resources_per_worker` dict
for all workers, so it cannot ask each worker for its own card resource, and per-card pinning is the
point of zeromix.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from workers import job_records
from workers.collectives import first_ranks, rank_infos
from workers.rank import RankWorker, card_env
from workers.train import TrainConfig


ROOT_CAUSE_WAIT_S = 10  # after the first rank fails, how long the others may take to say why they failed too
MAX_COMEBACKS = 2  # outer steps: times a lost box's ranks are started again in one placement of the job
# ... and times its new actors are made again when they die before they run: made while Ray still counted its dead
# node alive, they die once it is declared dead; made after, they wait until Ray places the job's cards there again
START_TRIES = 3
# What a collective says when a peer vanished (gloo on CPU, NCCL on GPUs): a lost rank seen from a survivor.
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
             "Watchdog caught collective operation timeout", "remote process exited", "Socket Timeout",
             # outer steps (workers/collectives.BoxLink, workers/outer_steps.BoxesLost): a box never came, or the boxes left
             # cannot hold a lost box's share of the batch
             "did not reach outer step", "cannot take their share of the global batch", "lost before the boxes met")


def failure_kind(err: BaseException) -> str:
    """"oom": the card ran out of memory (torch.OutOfMemoryError); "lost": the rank's process or node died, or a
    collective lost its peer; "error": anything else (a bug, bad data), which a restart would only repeat."""
    cause = getattr(err, "cause", None)
    if type(cause).__name__ == "OutOfMemoryError" or "torch.OutOfMemoryError" in str(err):
        return "oom"
    if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError)) or any(s in str(err) for s in LOST_PEER):
        return "lost"
    return "error"


def describe(err: BaseException) -> str:
    """One line: a rank's own exception rather than Ray's wrapper around it (ray::RankWorker.run() (pid=...))."""
    cause = getattr(err, "cause", None) or err
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"[:300]


class RankFailed(RuntimeError):
    def __init__(self, message: str, kind: str, rank: int, card: dict):
        super().__init__(message)
        self.kind, self.rank, self.card = kind, rank, card

    @classmethod
    def of(cls, rank: int, card: dict, what: str, kind: str) -> RankFailed:
        return cls(f"rank {rank} on {card['node']}/{card['index']} failed: {what}", kind, rank, card)

    def record(self) -> dict:
        """What the driver posts (workers/job_records.py) and the scheduler decides a restart on."""
        return {"kind": self.kind, "rank": self.rank, "card": f"{self.card['node']}/{self.card['index']}", "node": self.card["node"],
                "detail": str(self).split(" failed: ", 1)[-1]}


def wait_for_cards(placement_group, cards: list[dict], timeout_s: float, every_s: float = 1.0) -> None:
    """Until the job's reserved cards are ready. A card whose node left after the reservation (unplugged while the
    job started) holds its bundle back until the node is back: that rank is lost, and the scheduler places the job
    again on the cards left, as for a node lost later; it is not the job's fault, to fail it for good."""
    deadline = time.monotonic() + timeout_s
    while not placement_group.wait(timeout_seconds=every_s):
        up = {resource for node in ray.nodes() if node["Alive"] for resource in node["Resources"]}
        gone = [(rank, card) for rank, card in enumerate(cards) if card["resource"] not in up]
        if gone:
            rank, card = gone[0]
            raise RankFailed.of(rank, card, f"its node {card['node']} left after the job's cards were reserved", "lost")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the job's reserved cards were not ready within {timeout_s:.0f} s, though Ray counts their nodes "
                               "alive; `ray status` shows the placement group, and `zeromix queue` the job")


def out_at_the_end(box_0: dict) -> set[int]:
    """The boxes out of an outer-step job when box 0 ended (box 0's leader's result): lost, and not let back in since
    (a box let back in at a meeting is also recorded as left there: its last life's share went untrained)."""
    last: dict[int, tuple[int, int]] = {}
    for back, changes in enumerate((box_0["boxes_left"], box_0["boxes_back"])):
        for change in changes:
            for box in change["boxes"]:
                last[box] = max(last.get(box, (-1, 0)), (change["step"], back))
    return {box for box, (_, back) in last.items() if not back}


def _root_cause(failures: dict[int, BaseException]) -> tuple[int, BaseException]:
    """Of the ranks' failures, the one that explains the others: an out-of-memory card, then a rank whose process
    or node died, then a survivor's broken collective."""
    def order(item):
        rank, err = item
        kind = failure_kind(err)
        died = isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError))
        return ({"oom": 0, "lost": 1 if died else 2}.get(kind, 3), rank)

    return min(failures.items(), key=order)


def other_failures(pending: dict, first: str) -> dict[int, BaseException]:
    """The other ranks' failures (`pending`: a rank's run -> the rank; `first`: the kind of the failure that came
    first), gathered for up to ROOT_CAUSE_WAIT_S (one may explain the first, a survivor's broken collective); none is
    waited for once a card's out of memory is in hand: `_root_cause` puts it first, and the others would only wait in
    their collectives until stopped (10 s more before each restart of an out-of-memory job)."""
    failures, kinds, waiting = {}, {first}, list(pending)
    deadline = time.monotonic() + ROOT_CAUSE_WAIT_S
    while waiting and "oom" not in kinds and (left := deadline - time.monotonic()) > 0:
        done, waiting = ray.wait(waiting, num_returns=1, timeout=left)
        for ref in done:
            try:
                ray.get(ref)
            except Exception as err:
                failures[pending[ref]] = err
                kinds.add(failure_kind(err))
    return failures


@dataclass
class _Run:
    """What WorkerGroup.run tracks while the ranks train."""

    config_json: str
    infos: list  # every rank's RankInfo (a box started again gets new ones)
    pending: dict  # a rank's run -> the rank
    results: dict = field(default_factory=dict)  # the rank -> its result
    lost: dict = field(default_factory=dict)  # outer steps: each box lost -> its life that was lost (RankInfo.life)
    coming: dict = field(default_factory=dict)  # a lost box's new leader's rendezvous -> the box
    tries: dict = field(default_factory=dict)  # a box -> times its ranks were made for its present life (START_TRIES)

    def ranks_of(self, box: int) -> list[int]:
        return [r for r, info in enumerate(self.infos) if info.box == box]


def actor_name(job_id: str, rank: int, card: dict) -> str:
    """What the Ray dashboard shows for a rank: its job, rank and card, e.g. zm-llama-3f2a1c-r1-rtx3090@desk."""
    model = re.sub(r"[^a-z0-9]", "", card["model"].lower().removeprefix("geforce ").removeprefix("nvidia "))
    return f"zm-{job_id}-r{rank}-{model}@{card['node']}"


class WorkerGroup:
    def __init__(self, placement_group, cards: list[dict], job_id: str):
        """`job_id`: this placement's Ray job id (`<id>-<attempt>` after the first), so a job placed again at once
        never meets its last placement's actors' names."""
        self.placement_group, self.cards, self.attempt = placement_group, cards, job_id
        self.actors = []
        try:
            for i in range(len(cards)):
                self.actors.append(self._actor(i))
        except BaseException:
            self.shutdown()
            raise

    def _actor(self, i: int, life: int = 0, made: int = 1):
        """Rank i's actor, on its bundle's card (`life`: times its box's ranks were started again, RankInfo.life;
        `made`: times its actor was made for that life, START_TRIES)."""
        card = self.cards[i]
        return ray.remote(RankWorker).options(
            num_cpus=1, num_gpus=1, resources={card["resource"]: 1},
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i),
            runtime_env={"env_vars": {**card_env(card["index"]), **card.get("env", {})}},
            name=actor_name(self.attempt, i, card) + (f"-life{life}" if life else "") + (f"-try{made}" if made > 1 else ""),
        ).remote(card)

    def where(self) -> list[dict]:
        return self._answers({rank: a.where.remote() for rank, a in enumerate(self.actors)})

    def _answers(self, calls: dict[int, object]) -> list:
        """Each rank's answer to a call made before training (rank -> the call). A rank whose actor or node died
        first (a node unplugged while the job starts) fails the job as lost, which the scheduler places again from its
        last checkpoint on the cards left; Ray's bare RayActorError would read as a bug and fail it for good."""
        answers = []
        for rank, call in calls.items():
            try:
                answers.append(ray.get(call))
            except (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError) as err:
                self.shutdown()
                raise RankFailed.of(rank, self.cards[rank], describe(err), "lost") from err
        return answers

    def run(self, config_json: str) -> list[dict | None]:
        """Train on every rank; the first rank to fail stops the others (they would wait in a collective forever).
        With outer steps, a box other than box 0 whose rank was lost (its process or node died, or a peer of its
        box did) is left out instead: its other ranks are stopped, the box leaders hear of it (the job's "lost"
        record) and go on without it from their next outer step. Its ranks are started again on the same cards (up
        to MAX_COMEBACKS times; on a node that died, once it is back), and ask back in. Box 0 holds the leaders'
        rendezvous and the checkpoints: losing it restarts the job, as a synchronous job's loss does. A rank whose
        box was lost and not let back in by the end has no result (None)."""
        config = TrainConfig.from_json(config_json)  # (outer steps: each box its own group, ranks box by box)
        meet = self._answers({first: self.actors[first].rendezvous.remote() for first in first_ranks(config.boxes)})
        outer_meet = self._answers({0: self.actors[0].rendezvous.remote()})[0] if config.outer else ("", 0)
        infos = rank_infos(config.boxes, meet, outer_meet)
        run = _Run(config_json, infos, {a.run.remote(config_json, info): rank for rank, (a, info) in enumerate(zip(self.actors, infos))})
        while run.pending:
            done, _ = ray.wait([*run.pending, *run.coming], num_returns=1)
            if done[0] in run.coming:
                self._back(run, run.coming.pop(done[0]), done[0])
                continue
            rank = run.pending.pop(done[0])
            try:
                run.results[rank] = ray.get(done[0])
            except Exception as err:
                box = infos[rank].box
                if config.outer and box and failure_kind(err) == "lost":
                    self._leave(run, box, err)
                    continue
                failures = {rank: err} | other_failures(run.pending, failure_kind(err))
                self.shutdown()
                rank, err = _root_cause(failures)
                raise RankFailed.of(rank, self.cards[rank], describe(err), failure_kind(err)) from err
            if config.outer and run.pending and all(r in run.results for r in range(config.boxes[0])):
                self._end_boxes_asking(run)  # box 0 ended the job: a box still asking back in will not be let in
        return [run.results.get(r) for r in range(len(self.actors))]

    def _leave(self, run: _Run, box: int, err: BaseException) -> None:
        """Stop what is left of a lost box (its ranks would wait in their box's collectives), tell the box leaders,
        and start its ranks again on their cards unless it has come back too often."""
        ranks = run.ranks_of(box)
        for ref, rank in list(run.pending.items()):
            if rank in ranks:
                del run.pending[ref]
                ray.kill(self.actors[rank])
        life = run.infos[ranks[0]].life
        run.lost[box] = life
        job_records.put(self.attempt, "lost", run.lost)
        cards = ", ".join(f"{self.cards[r]['node']}/{self.cards[r]['index']}" for r in ranks)
        again = life < MAX_COMEBACKS
        print(f"zeromix: box {box} ({cards}) was lost ({describe(err)}); the other boxes go on without it from their next outer step "
              "(or, where it was lost before the boxes first met, the job is placed again)"
              + ("; its ranks start again on those cards and ask back in" if again else ""), flush=True)
        if again:
            run.tries[box] = 0
            self._make_again(run, box)

    def _make_again(self, run: _Run, box: int) -> None:
        """New actors for a lost box's ranks, in its next life, on the same bundles; their leader's rendezvous answers
        once they run (on a node that died: when it is back and Ray has placed the job's cards there again)."""
        ranks = run.ranks_of(box)
        run.tries[box] += 1
        for r in ranks:
            ray.kill(self.actors[r])  # (one made before, if it lives on)
            self.actors[r] = self._actor(r, run.lost[box] + 1, run.tries[box])
        run.coming[self.actors[ranks[0]].rendezvous.remote()] = box

    def _back(self, run: _Run, box: int, rendezvous) -> None:
        """A lost box's new ranks run: start them, in the box's next life, asking back in."""
        try:
            addr, port = ray.get(rendezvous)
        except Exception as err:  # its actors died before they ran (its node was not yet known dead) or could not start
            if run.tries[box] < START_TRIES:
                print(f"zeromix: box {box}'s new ranks died before they ran ({describe(err)}); made again, try {run.tries[box] + 1} "
                      f"of {START_TRIES}: they start once Ray places the job's cards on that node again", flush=True)
                self._make_again(run, box)
                return
            print(f"zeromix: box {box} could not start again ({describe(err)}); the job goes on without it", flush=True)
            return
        for r in run.ranks_of(box):
            run.infos[r] = dataclasses.replace(run.infos[r], master_addr=addr, master_port=port, life=run.lost[box] + 1)
            run.pending[self.actors[r].run.remote(run.config_json, run.infos[r])] = r
        print(f"zeromix: box {box} started again; it joins at the next outer step", flush=True)

    def _end_boxes_asking(self, run: _Run) -> None:
        """Box 0 has ended: the other boxes end with it, at its last outer step; a box still asking back in then
        never will be let in: stopped (its ranks have no result), at once where box 0's record says it was out of the
        job at its end."""
        out = out_at_the_end(run.results[0])
        for ref, rank in list(run.pending.items()):
            if run.infos[rank].box in out:
                del run.pending[ref]
                ray.kill(self.actors[rank])
        done, _ = ray.wait(list(run.pending), num_returns=len(run.pending), timeout=ROOT_CAUSE_WAIT_S)
        for ref, rank in list(run.pending.items()):
            if ref not in done:
                del run.pending[ref]
                ray.kill(self.actors[rank])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
