"""Two jobs on one mixed node each get their own card, and each worker runs on the card it was promised; a worker
that dies before it answers fails its placement as lost; a card out of memory is reported without waiting for the
other ranks.

A two-node simulated cluster (a CPU-only head, and "attic" with a GTX 1080 Ti at index 0 and an RTX 3090 at
index 1) runs with the NVML double answering as that box, so a worker can report what NVML shows at the
device index zeromix made visible to it.
"""

import json

import pytest
import yaml

from tests.conftest import free_port, nvml_box_env, submitted_id, wait_for_state, zeromix

pytestmark = pytest.mark.cluster


def test_two_jobs_get_the_two_cards_of_one_mixed_node(tmp_path, demo_data, isolated_home):
    cluster = {
        "head": {"address": "10.0.0.1", "port": free_port(), "dashboard_port": free_port()},
        "nodes": [{"name": "head", "address": "10.0.0.1", "ram_gb": 8, "cpus": 1},
                  {"name": "attic", "address": "10.0.0.2", "ram_gb": 32, "cpus": 4,
                   "gpus": [{"model": "NVIDIA GeForce GTX 1080 Ti"}, {"model": "NVIDIA GeForce RTX 3090"}]}],
    }
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    env = nvml_box_env("attic_1080ti_3090")
    zeromix("up", "--simulate", str(tmp_path / "cluster.yaml"), env=env, timeout=180)
    try:
        common = ["--set", f"dataset.path={demo_data['pretrain']}", "--set", "max_steps=3", "--set", "gpus.count=1", "--set", "report_to=[]"]
        first = submitted_id(zeromix("submit", "jobs/examples/tiny-llama-scratch.yaml", *common, "--set", f"output_dir={tmp_path / 'a'}",
                                     "--set", "gpus.models=[RTX 3090]", env=env).stdout)
        second = submitted_id(zeromix("submit", "jobs/examples/tiny-llama-scratch.yaml", *common, "--set", f"output_dir={tmp_path / 'b'}",
                                      "--set", "gpus.models=[GTX 1080 Ti]", env=env).stdout)
        assert (wait_for_state(first, ("succeeded", "failed")), wait_for_state(second, ("succeeded", "failed"))) == ("succeeded", "succeeded")
        (a,), (b,) = (json.loads((tmp_path / d / "zeromix-result.json").read_text())["ranks"] for d in ("a", "b"))
        assert (a["card"], a["cuda_visible_devices"], a["nvml_name"], a["pci_bus_id"]) == (
            "attic/1", "1", "NVIDIA GeForce RTX 3090", "00000000:02:00.0")
        assert (b["card"], b["cuda_visible_devices"], b["nvml_name"], b["pci_bus_id"]) == (
            "attic/0", "0", "NVIDIA GeForce GTX 1080 Ti", "00000000:01:00.0")
        assert (a["precision"], b["precision"]) == ("bf16", "fp32")  # each card's own tuning
        _a_rank_that_dies_before_it_answers_is_lost(tmp_path)
        _a_card_out_of_memory_is_reported_without_waiting_for_the_other_ranks()
    finally:
        zeromix("down", env=env)


def _a_rank_that_dies_before_it_answers_is_lost(tmp_path):
    """(On the same cluster, now idle.) A rank's actor that dies before it says where it runs, as when its node is
    unplugged while the job starts, fails the placement as lost, which the scheduler places again from the job's
    last checkpoint; Ray's bare RayActorError would read as a bug and fail the job for good. Its group is stopped."""
    import ray
    from ray.util.placement_group import remove_placement_group

    from orchestrator import cluster_runtime, registry
    from orchestrator.launch import reserve
    from orchestrator.model_facts import facts_from_config, read_config
    from orchestrator.planner import make_plan
    from orchestrator.worker_group import RankFailed, WorkerGroup
    from tests.conftest import TINY_LLAMA
    from tests.helpers import spec

    cluster_runtime.connect()
    plan = make_plan(spec(name="dies-first", gpus={"count": 1, "models": ["RTX 3090"]}, output_dir=str(tmp_path / "c")),
                     facts_from_config(read_config(str(TINY_LLAMA))), registry.snapshot(), 10)
    promised = plan.summary()["ranks"][0]
    group = reserve("dies-first", plan)
    workers = WorkerGroup(group, [promised], "dies-first")
    try:
        ray.kill(workers.actors[0])
        with pytest.raises(RankFailed) as failed:
            workers.where()
        assert (failed.value.kind, failed.value.rank, promised["card"]) == ("lost", 0, "attic/1"), failed.value
        assert str(failed.value).startswith("rank 0 on attic/1 failed: ") and workers.actors == []
    finally:
        workers.shutdown()
        remove_placement_group(group)


def _a_card_out_of_memory_is_reported_without_waiting_for_the_other_ranks():
    """(On the same cluster, idle.) Once a rank has failed, the job's driver gathers the others' failures, for up to
    ROOT_CAUSE_WAIT_S, since one of them may explain the first (a survivor's broken collective came first). A card out
    of memory explains them all: with one in hand it stops gathering at once, rather than wait on ranks stuck in
    their collectives, which would only delay the job's restart with a smaller micro-batch. Ray tasks stand in for
    the ranks: one stuck, one that runs out of memory after the first failure."""
    import time

    import ray
    import torch

    from orchestrator import worker_group

    @ray.remote(num_cpus=0)
    def runs_out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (a test's)")

    @ray.remote(num_cpus=0)
    def stuck_in_a_collective():
        time.sleep(3600)

    window = 120  # the gathering's bound here; waited out only if the driver wrongly waits for the stuck rank
    stuck = stuck_in_a_collective.remote()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(worker_group, "ROOT_CAUSE_WAIT_S", window)
            started = time.monotonic()
            assert worker_group.other_failures({stuck: 1}, "oom") == {}  # the first failure was the card's own
            out_of_memory = runs_out_of_memory.remote()
            failures = worker_group.other_failures({out_of_memory: 1, stuck: 2}, "lost")
            gathered_s = time.monotonic() - started
        assert list(failures) == [1] and worker_group.failure_kind(failures[1]) == "oom", failures
        assert gathered_s < window / 2, f"the driver waited {gathered_s:.0f} s for a rank stuck in its collective"
    finally:
        ray.cancel(stuck, force=True)
