"""A stateful fuzzer of the controller: hypothesis writes programs of submits (good and broken specs), cancels,
Ray calls that fail, jobs Ray loses, ranks that fail in each way, cards out of memory, nodes leaving and coming
back, model directories vanishing and scheduler restarts, over the real Scheduler, QueueStore and gain policy with
Ray's double (tests/controller_world.py). After every step the invariants below hold; at the end, once the faults
stop, every job ends within a bounded number of rounds.

Derandomised (the same programs on every run). A failure prints the shortest program hypothesis found; to look
at other programs, `pytest tests/test_controller_fuzz.py -p no:cacheprovider --hypothesis-seed=N`."""

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from orchestrator.job_states import ACTIVE, TERMINAL, is_valid_history
from orchestrator.queue import LIVE, StaleTransition
from orchestrator.scheduler import MAX_ATTEMPTS, MAX_RESTARTS, Ending
from tests.controller_world import World

PROGRAMS = 1000
STEPS_PER_PROGRAM = 30
NODES = ("attic", "desk", "closet")
MODELS = ("tiny-llama", "qwen2.5-0.5b")
BROKEN = ({"deepspeed": {"zero_stage": 0}}, {"batch_size": 16}, {"seq_len": 4})  # stored specs today's schema refuses
ROOT = Path(tempfile.mkdtemp(prefix="zeromix-fuzz-"))


class Controller(RuleBasedStateMachine):
    @initialize(first=st.lists(st.tuples(st.sampled_from(MODELS), st.integers(1, 3)), min_size=1, max_size=4))
    def start(self, first):
        """A homelab with a few jobs queued already, so that every program has jobs to run and to break."""
        self.world = World.make(Path(tempfile.mkdtemp(dir=ROOT)))
        self.jobs: list[str] = []
        for model, cards in first:
            self.submit(model, cards, 0, 2000, None)

    # ------------------------------------------------------------------------------------------- the user
    @rule(model=st.sampled_from(MODELS), cards=st.integers(1, 3), priority=st.sampled_from((-10, 0, 10)),
          steps=st.sampled_from((20, 2000)), stored=st.sampled_from((None,) * 5 + BROKEN))
    def submit(self, model, cards, priority, steps, stored):
        """A job as `zeromix submit` stores it; now and then as an older zeromix stored it (`stored`: its fields
        that today's schema refuses)."""
        method = {"method": "lora"} if model != "tiny-llama" else {}
        spec = self.world.spec(model, gpus={"count": cards}, priority=priority, max_steps=steps, **method)
        old = {**spec.model_dump(mode="json", exclude_unset=True), **stored} if stored else None
        self.jobs.append(self.world.submit(spec, stored=old))

    @precondition(lambda self: self.jobs)
    @rule(which=st.integers(0, 99))
    def cancel(self, which):
        """As `zeromix cancel`: the queue first, then Ray (which may be down: the scheduler frees the cards later)."""
        job = self.jobs[which % len(self.jobs)]
        try:
            self.world.store.transition(job, LIVE, "cancelled", "cancelled by the user")
        except StaleTransition:
            return
        try:
            self.world.ray.stop(job)
        except RuntimeError:
            pass

    @rule(model=st.sampled_from(MODELS))
    def a_model_directory_vanishes(self, model):
        shutil.rmtree(self.world.model_dir(model), ignore_errors=True)

    # -------------------------------------------------------------------------------------- Ray and the homelab
    @rule(down=st.booleans())
    def the_jobs_api_fails_to_start(self, down):
        self.world.ray.fail_start = down

    @rule(down=st.booleans())
    def the_jobs_api_fails_to_stop(self, down):
        self.world.ray.fail_stop = down

    @precondition(lambda self: self.running())
    @rule(which=st.integers(0, 99), how=st.sampled_from(("succeeded", "bug", "lost", "oom", "vanished", "stopped")))
    def a_running_job_ends(self, which, how):
        job = self.running()[which % len(self.running())]
        card = self.world.store.get(job).cards[0]
        self.world.ray.endings[job] = {
            "succeeded": Ending("succeeded", "finished"),
            "bug": Ending("failed", f"rank 0 on {card} failed: ValueError: bad data"),
            "lost": Ending("failed", f"rank 0 on {card} was lost (its process or node died, or a collective lost it): gone", retryable=True),
            "oom": Ending("failed", f"rank 0 on {card} ran out of memory: CUDA out of memory", retryable=True, out_of_memory=card),
            "vanished": Ending("failed", "lost: Ray has no record of it (the head restarted?)", retryable=True),
            "stopped": Ending("cancelled", "stopped in Ray"),
        }[how]
        if how in ("vanished", "stopped"):
            self.world.ray.reservations.pop(job, None)

    @rule(node=st.sampled_from(NODES))
    def a_node_is_unplugged(self, node):
        """Its cards leave the cluster, and each job running on them is reported lost by its driver."""
        self.world.ray.unplugged.add(node)
        for job in self.running():
            if any(card.startswith(f"{node}/") for card in self.world.store.get(job).cards):
                self.world.ray.endings.setdefault(job, Ending("failed", f"rank 0 on {node}/0 was lost: node died", retryable=True))

    @rule(node=st.sampled_from(NODES))
    def a_node_comes_back(self, node):
        self.world.ray.unplugged.discard(node)

    @rule()
    def the_scheduler_restarts(self):
        self.world.restart_scheduler()

    @rule(rounds=st.integers(1, 3), seconds=st.sampled_from((1, 600, 7200)))
    def rounds_pass(self, rounds, seconds):
        for _ in range(rounds):
            self.world.clock.now += seconds
            self.world.scheduler.tick()
            assert not self.world.store.jobs(("placing",)), "a job was left placing after a round"
            if not self.world.ray.fail_stop:  # Ray answers: whatever it holds belongs to an active job
                active = {r.id for r in self.world.store.jobs(ACTIVE)}
                assert set(self.world.ray.reservations) <= active, "Ray holds cards for a job the queue has ended"

    # ------------------------------------------------------------------------------------------ invariants
    def running(self) -> list[str]:
        return [r.id for r in self.world.store.jobs(("running",))]

    @invariant()
    def no_card_is_held_twice_and_only_active_jobs_hold_cards(self):
        store, ray = self.world.store, self.world.ray
        active = {r.id: r for r in store.jobs(ACTIVE)}
        holds = store.holds()
        assert set(holds.values()) <= set(active), f"a job that is not placing or running holds cards: {holds}"
        held = {job: {c for c, j in holds.items() if j == job} for job in active}
        assert all(set(record.cards) <= held[job] for job, record in active.items())
        assert all(held[job] == set(record.cards) for job, record in active.items() if record.state != "running"), \
            "only a running job (moved for them) holds cards beyond its own"
        reserved = [res for resources in ray.reservations.values() for res in resources]
        assert len(reserved) == len(set(reserved)), f"Ray gave one card to two jobs: {ray.reservations}"

    @invariant()
    def every_history_is_a_path_through_the_state_table_within_the_limits(self):
        store = self.world.store
        for job in self.jobs:
            moves = [(e.source, e.target) for e in store.events(job)]
            assert is_valid_history(moves), f"{job}: {moves}"
            assert store.returns(job, "running") <= MAX_RESTARTS, f"{job} restarted too often: {moves}"
            assert sum(1 for s, t in moves if (s, t) in (("placing", "queued"), ("placing", "failed"))) <= MAX_ATTEMPTS, moves

    def teardown(self):
        """The faults stop: Ray answers, every node is back, and each running job finishes. Every job then ends
        within a bounded number of rounds (it starts, fails with its reason, or was cancelled)."""
        world = getattr(self, "world", None)
        if world is None:
            return
        world.ray.fail_start = world.ray.fail_stop = False
        world.ray.unplugged.clear()
        for _ in range(2 * len(self.jobs) + 3):
            for job in self.running():
                world.ray.endings.setdefault(job, Ending("succeeded", "finished"))
            world.clock.now += 60
            world.scheduler.tick()
        left = {r.id: (r.state, r.reason) for r in world.store.jobs() if r.state not in TERMINAL}
        assert not left, f"jobs that never ended once the faults stopped: {left}"
        world.store.close()
        shutil.rmtree(world.root, ignore_errors=True)


Controller.TestCase.settings = settings(max_examples=PROGRAMS, stateful_step_count=STEPS_PER_PROGRAM, derandomize=True,
                                        deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_the_controller_keeps_its_invariants_under_any_program = Controller.TestCase
