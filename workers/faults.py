"""Test-only fault injection: where the suite makes a rank fail, or wait, as a homelab would. Nothing a user
sets: ZEROMIX_FAULT holds entries separated by ";", each "<kind>:<arguments>", and a rank acts on those that
name its job (by the plan's job name), card or step, and only where the suite also set ARM_ENV (`environment`).

    kill-in-save:<step>                  rank 0 dies after every rank wrote the shards of that step's checkpoint,
                                         before they are moved into place (a power cut, an OOM kill)
    oom:<job>:<card>:<micro-batch>       that job's rank on that card raises torch.OutOfMemoryError while its
                                         micro-batch is larger (a card with less memory than the plan assumed)
    die:<job>:<card>:<step>[:<marker>]   that job's rank on that card is killed (SIGKILL) before the step (step 0:
                                         before it meets the job's other ranks; exchange-<step>: a box leader, in the
                                         outer step after that step, once the boxes met, before their exchange), as
                                         the kernel's OOM killer or a pulled plug ends it; with a marker file, once:
                                         it writes the file first, and a rank that finds it does not die
    hold:<job>:<step>:<release file>     that job's ranks wait before the step until the file exists (rank 0
                                         writes <release file>.waiting first): a test acts on a job paused at a
                                         known step instead of guessing how long training takes
"""

from __future__ import annotations

import os
import time
from pathlib import Path

FAULT_ENV = "ZEROMIX_FAULT"
# The second key: entries act only where the test suite also set this, so a stray ZEROMIX_FAULT in a user's
# environment (a copied shell profile, an old CI file) never kills or stalls a real job.
ARM_ENV, ARMED = "ZEROMIX_TEST_SUITE_ARMS_FAULTS", "yes, this is zeromix's test suite"
HOLD_DEADLINE_S = 600  # a test that never releases its hold must not leave a job waiting for ever


def environment(*entries: str) -> dict[str, str]:
    """What a test puts in the environment of the ranks it wants these faults in."""
    return {FAULT_ENV: ";".join(entries), ARM_ENV: ARMED}


def armed(kind: str) -> list[list[str]]:
    """The arguments of each armed entry of this kind (none unless the suite armed them)."""
    if os.environ.get(ARM_ENV) != ARMED:
        return []
    entries = [e.strip() for e in os.environ.get(FAULT_ENV, "").split(";") if e.strip()]
    return [e.split(":")[1:] for e in entries if e.split(":")[0] == kind]


def kill_in_save(step: int) -> None:
    if [str(step)] in armed("kill-in-save"):
        os.kill(os.getpid(), 9)


def out_of_memory(job: str, card: str, micro_batch: int) -> None:
    import torch

    for name, on, most in armed("oom"):
        if (name, on) == (job, card) and micro_batch > int(most):
            raise torch.OutOfMemoryError(f"CUDA out of memory on {card} (injected by {FAULT_ENV}: micro-batch {micro_batch} > {most})")


def die(job: str, card: str, step: int | str) -> None:
    for name, on, at, *marker in armed("die"):
        if (name, on, at) != (job, card, str(step)) or (marker and Path(":".join(marker)).exists()):
            continue
        if marker:
            Path(":".join(marker)).write_text(str(os.getpid()))
        os.kill(os.getpid(), 9)


def hold(job: str, step: int, rank: int) -> None:
    for name, at, release in ((a[0], a[1], ":".join(a[2:])) for a in armed("hold")):
        if (name, at) != (job, str(step)) or Path(release).exists():
            continue
        if rank == 0:
            Path(f"{release}.waiting").write_text(str(step))
        deadline = time.monotonic() + HOLD_DEADLINE_S
        while not Path(release).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"held before step {step} by {FAULT_ENV} for {HOLD_DEADLINE_S} s and never released ({release})")
            time.sleep(0.1)
