"""Reserve -> launch: the plan becomes a placement group (one bundle per chosen card) and a Ray job.

The scheduler calls `submit` for a job it has placed. Reserve happens before the Ray job is submitted, and
anything that fails after it releases the cards again. `stop` (cancel) and the job's own exit release them
too; the scheduler's rounds catch a driver that died without doing so.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import secrets
import shlex
import sys

from orchestrator.cluster_runtime import ClusterState
from orchestrator.errors import ZeromixError
from orchestrator.jobspec import JobSpec
from orchestrator.planner import Plan
from orchestrator.planner.memory import OUTER_BUCKET_ELEMENTS
from orchestrator.registry import KV_NAMESPACE, live_placement_groups, placement_group_name
from workers.train import TrainConfig

RESERVE_TIMEOUT_S = 30
HTTP_TIMEOUT_S = 30  # one request to the Jobs API
AGENT_WAIT_S = 60
AGENT_RETRY_S = 1.0
LOG_WAIT_S = 15  # a job's log the Jobs API failed to give (it has, right after a node left) is asked for again this long
METADATA_KEY = "zeromix_job"  # present on every job zeromix submits
ID_KEY = "zeromix_id"  # the queue's job id, the same for every placement of the job
CONFIG_KEY_ENV = "ZEROMIX_TRAIN_CONFIG_KEY"  # where in Ray's KV store the job's driver finds its train config


def new_job_id(job: JobSpec) -> str:
    return f"{job.name}-{secrets.token_hex(3)}"


CHECKPOINT_EVERY_S = 600  # a job that says nothing loses at most about this much training to a lost node


def checkpoint_every(job: JobSpec, plan: Plan) -> int:
    """The job's own cadence, else the steps in about CHECKPOINT_EVERY_S of training at the plan's estimated step
    time (0, only at the end, when the whole run is shorter)."""
    if job.checkpoint_every is not None:
        return job.checkpoint_every
    steps = max(1, round(CHECKPOINT_EVERY_S / plan.step.step_s))
    return steps if steps < plan.total_steps else 0


def train_config(job: JobSpec, plan: Plan, job_id: str) -> TrainConfig:
    config = TrainConfig(
        job_id=job_id, model_init=job.model.init, model_path=job.model.path,
        tokenizer_path=job.model.tokenizer or job.model.path,
        dataset=job.dataset.model_dump(), method=job.method,
        lora={**job.lora_config.model_dump(), "target_modules": list(plan.lora_targets)},
        four_bit=dataclasses.asdict(plan.four_bit) if plan.four_bit else {},
        seq_len=job.seq_len, micro_batches=tuple(r.tuning.micro_batch for r in plan.ranks), grad_accum=plan.grad_accum,
        total_steps=plan.total_steps, ds_configs=tuple(plan.ds_configs(job)),
        activation_checkpointing=tuple(r.tuning.activation_checkpointing for r in plan.ranks), output_dir=job.output_dir,
        checkpoint_every=checkpoint_every(job, plan), keep_last=job.keep_last, seed=job.seed,
        micro_batch_caps=tuple(r.micro_cap for r in plan.ranks) if job.rebalance and len(plan.ranks) > 1 else (),
        report_to=tuple(job.report_to), plan=plan.summary(), loss_chunk_tokens=plan.loss_chunk_tokens,
    )
    if plan.outer:  # the plan lists its ranks box by box
        o = plan.outer
        return with_outer_steps(config, [n for _, n in o.boxes], o.inner_steps, o.outer_lr, o.outer_momentum, o.wire,
                                caps=tuple(r.micro_cap for r in plan.ranks))
    return config


def with_outer_steps(config: TrainConfig, boxes: list[int], inner_steps: int, outer_lr: float, outer_momentum: float,
                     wire: str, bucket_elements: int = OUTER_BUCKET_ELEMENTS, caps: tuple[int, ...] = ()) -> TrainConfig:
    """The run as outer steps across boxes (workers/outer_steps.py): `boxes` ranks per box, the config's ranks
    listed box by box. Each box is a DeepSpeed world of its own, so each rank's batch-size check counts its box's
    ranks. A box may still correct its own split while training: its tuner keeps the box's share of the global batch,
    so the other boxes' slices of it do not move. `bucket_elements`: how many of the new global weights a card
    takes at a time (the plan counts OUTER_BUCKET_ELEMENTS). `caps`: every rank's largest micro-batch, within which
    the boxes left take the share of a box that is lost (default: the run's own caps; none: a lost box restarts the job)."""
    if sum(boxes) != len(config.micro_batches):
        raise ValueError(f"boxes {boxes} hold {sum(boxes)} ranks; the run has {len(config.micro_batches)}")
    per_rank = [size for size in boxes for _ in range(size)]
    ds = tuple({**c, "train_batch_size": c["train_micro_batch_size_per_gpu"] * c["gradient_accumulation_steps"] * n}
               for c, n in zip(config.ds_configs, per_rank))
    outer = {"boxes": list(boxes), "inner_steps": inner_steps, "outer_lr": outer_lr, "outer_momentum": outer_momentum, "wire": wire,
             "bucket_elements": bucket_elements, "caps": list(caps or config.micro_batch_caps), "planned": list(config.micro_batches)}
    return dataclasses.replace(config, ds_configs=ds, outer=outer)


def trains(job: JobSpec) -> str:
    """What the job's checkpoints are of (workers/checkpoint.what_it_trains)."""
    from orchestrator.model_facts import read_config
    from workers.checkpoint import what_it_trains

    return what_it_trains(read_config(job.model.path), job.method, job.lora_config.r)


def reserve(job_id: str, plan: Plan):
    """A detached placement group holding exactly the planned cards, or an error and nothing held."""
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [{"CPU": 1, "GPU": 1, r.card.resource: 1} for r in plan.ranks]
    group = placement_group(bundles, strategy="PACK", name=placement_group_name(job_id), lifetime="detached")
    if not group.wait(timeout_seconds=RESERVE_TIMEOUT_S):
        remove_placement_group(group)
        cards = ", ".join(r.card.card_id for r in plan.ranks)
        raise ZeromixError(f"could not reserve {cards} within {RESERVE_TIMEOUT_S} s (taken by another job meanwhile?); nothing is held, try again")
    return group


def release(job_id: str) -> bool:
    """Free the job's cards. Idempotent: False when nothing was held."""
    import ray.util
    from ray.util.placement_group import remove_placement_group

    if job_id not in live_placement_groups():
        return False
    remove_placement_group(ray.util.get_placement_group(placement_group_name(job_id)))
    return True


def jobs_client(state: ClusterState):
    """The head's Jobs API client, one per address and token (each new one asks the server for its version)."""
    from orchestrator.cluster_runtime import token_file

    if state.dashboard_url is None:
        raise ZeromixError("job commands run on the head: its dashboard and Jobs API listen on its loopback only")
    token = token_file().read_text() if token_file().exists() else ""
    return _client(state.dashboard_url, hashlib.sha256(token.encode()).hexdigest())


class JobsApiError(RuntimeError):
    """The Jobs API answered with an error status (Ray's own client raises a bare RuntimeError holding the text)."""

    def __init__(self, status: int, text: str):
        super().__init__(f"Request failed with status code {status}: {text}.")
        self.status = status


@functools.lru_cache(maxsize=8)
def _client(url: str, token_digest: str):
    """Ray's client sends its requests with no timeout: a Jobs API that stopped answering would hold the scheduler's
    round, a cancel or a follow for ever. Each request here gives up after HTTP_TIMEOUT_S, as a RuntimeError (what
    callers already treat as "did not answer")."""
    import requests
    from ray.job_submission import JobSubmissionClient

    class Client(JobSubmissionClient):
        def _raise_error(self, r):
            raise JobsApiError(r.status_code, r.text)

        def _do_request(self, method, endpoint, **kwargs):
            kwargs.setdefault("timeout", HTTP_TIMEOUT_S)
            try:
                return super()._do_request(method, endpoint, **kwargs)
            except requests.RequestException as err:
                raise RuntimeError(f"the Jobs API at {url} did not answer within {HTTP_TIMEOUT_S} s ({type(err).__name__})") from None

    return Client(url)


def submit(state: ClusterState, job: JobSpec, plan: Plan, job_id: str, ray_job_id: str | None = None) -> str:
    """Reserve the plan's cards and start the Ray job (as `ray_job_id`: a job placed again after a restart gets
    a new one); on any failure nothing stays held."""
    attempt = ray_job_id or job_id
    reserve(job_id, plan)
    try:
        store_train_config(job_id, attempt, dataclasses.replace(train_config(job, plan, job_id), trains=trains(job), attempt=attempt))
        _submit_when_agent_ready(
            jobs_client(state),
            submission_id=attempt,
            # Ray runs the entrypoint through a shell: only this interpreter's path goes in it, quoted; every field
            # of the job travels as JSON in Ray's KV store, never as shell text.
            entrypoint=shlex.join([sys.executable, "-m", "orchestrator.job_driver"]),
            entrypoint_num_cpus=0,
            runtime_env={"env_vars": {CONFIG_KEY_ENV: config_key(job_id, attempt)}},
            metadata={METADATA_KEY: job.name, ID_KEY: job_id, "job_name": plan.title, "zeromix_plan": json.dumps(plan.summary()),
                      "zeromix_priority": str(job.priority), "zeromix_output_dir": job.output_dir},
        )
    except BaseException:
        release(job_id)
        forget_train_configs(job_id)
        raise
    return job_id


def config_key(job_id: str, attempt: str) -> str:
    return f"train-config/{job_id}/{attempt}"


def store_train_config(job_id: str, attempt: str, config: TrainConfig) -> None:
    """The whole train config, by reference: in an environment variable it would hit Linux's 128 KiB cap on one
    variable at about 60 ranks (the plan and one DeepSpeed config per rank)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(config_key(job_id, attempt), config.to_json(), namespace=KV_NAMESPACE)


def load_train_config(key: str) -> TrainConfig:
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
    if raw is None:
        raise ZeromixError(f"no train config under {key} in Ray's KV store (the job was stopped, or the head restarted); "
                           "the scheduler places the job again")
    return TrainConfig.from_json(raw.decode())


def forget_train_configs(job_id: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(config_key(job_id, ""), del_by_prefix=True, namespace=KV_NAMESPACE)


def _submit_when_agent_ready(client, **job) -> None:
    """Right after `up`, the head's job agent may not have registered yet and Ray answers 500 "No available
    agent"; that one error is worth waiting out (AGENT_WAIT_S), any other is not."""
    from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_fixed

    def no_agent_yet(err: BaseException) -> bool:
        return isinstance(err, JobsApiError) and err.status == 500 and "No available agent" in str(err)

    for attempt in Retrying(retry=retry_if_exception(no_agent_yet), stop=stop_after_delay(AGENT_WAIT_S), wait=wait_fixed(AGENT_RETRY_S), reraise=True):
        with attempt:
            client.submit_job(**job)


@dataclasses.dataclass(frozen=True)
class JobLog:
    """A Ray job's whole log, or why there is none: Ray does not know the job (`missing`), or its Jobs API kept failing."""

    text: str | None = None
    missing: bool = False
    error: str | None = None


def job_log(client, ray_job_id: str) -> JobLog:
    """Ray's answer "does not exist" (404) is final; any other failure is asked again for LOG_WAIT_S: right after a
    node was unplugged the Jobs API once answered 500 for a running job's log, and the next call worked."""
    from tenacity import RetryError, Retrying, retry_if_exception, stop_after_delay, wait_fixed

    def unknown(err: BaseException) -> bool:
        return isinstance(err, JobsApiError) and err.status == 404

    try:
        for attempt in Retrying(retry=retry_if_exception(lambda err: isinstance(err, RuntimeError) and not unknown(err)),
                                stop=stop_after_delay(LOG_WAIT_S), wait=wait_fixed(AGENT_RETRY_S)):
            with attempt:
                return JobLog(text=client.get_job_logs(ray_job_id))
    except RetryError as failed:
        err = failed.last_attempt.exception()
        last_line = str(err).strip().rstrip(".").splitlines()[-1]  # Ray's 500 carries a whole traceback
        return JobLog(error=f"{last_line[:300]} (asked for {LOG_WAIT_S} s)")
    except JobsApiError:  # only "does not exist" is not asked again
        return JobLog(missing=True)


def list_jobs(state: ClusterState) -> list:
    return sorted((j for j in jobs_client(state).list_jobs() if METADATA_KEY in (j.metadata or {})), key=lambda j: j.start_time or 0)


def stop(state: ClusterState, job_id: str) -> None:
    """Stop every Ray job of this queue job that still runs (one per placement), and free its cards.
    Idempotent: a job Ray never saw is fine."""
    client = jobs_client(state)
    for info in client.list_jobs():
        if (info.metadata or {}).get(ID_KEY) == job_id and not info.status.is_terminal():
            try:
                client.stop_job(info.submission_id)
            except RuntimeError:
                pass  # it ended meanwhile
    release(job_id)
    forget_train_configs(job_id)
