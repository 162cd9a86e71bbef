"""Checkpoints a crash cannot corrupt. DeepSpeed writes every rank's shards of a save into a staging directory;
only when all ranks are done does rank 0 move it into place (one rename), write its manifest (each file's size
and SHA-256, the step, the layout it was made under) and then point `latest` at it. So a save that dies half
way leaves `.partial/` (never loaded, cleared by the next save) and the previous checkpoint whole, and a
checkpoint whose files no longer match its manifest is skipped for the one before it, with a warning.

    output_dir/checkpoints/
        step-20/              DeepSpeed's files, then manifest.json, written last
        step-30/
        latest                "step-30": written after step-30's manifest
        .partial/step-40/     a save in progress (or one that died)
        .universal/step-30/   step-30 in DeepSpeed's universal form, made when a job resumes on other ranks

A LoRA or QLoRA checkpoint holds what training changes: the adapters and their optimizer states, never the frozen
base (DeepSpeed's `exclude_frozen_parameters`), which a resumed job loads from the base model as it did at its
start (`load`). An 8B base is some 16 GB in bf16 and 5.6 GB as QLoRA holds it (estimates), written at every
checkpoint before: across 1 GbE to shared storage, some 2.5 minutes a save for the bf16 one.

Resuming on a different number of ranks (a node lost, or one come back), ZeRO-1 for 2 or the other way, or another
precision (never across ZeRO-3's boundary: `across_zero3`): DeepSpeed's
partitions are cut for the world size that saved them, so rank 0 first converts the checkpoint with
DeepSpeed's own `ds_to_universal` (every parameter's weights and Adam moments whole, in one file each), and the
engine loads that with `checkpoint.load_universal`. On a real multi-node cluster, output_dir must be storage
every node sees (NFS): each rank writes its own shards there, and rank 0 reads them all.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

from workers import faults

CHECKPOINT_DIR = "checkpoints"  # under the job's output_dir
MANIFEST = "manifest.json"
PARTIAL = ".partial"
UNIVERSAL = ".universal"
LATEST = "latest"
TAG_PREFIX = "step-"


def tag_of(step: int) -> str:
    return f"{TAG_PREFIX}{step}"


VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype")  # rewritten by a save, same model


def what_it_trains(model_config: dict, method: str, lora_r: int) -> str:
    """A digest of what a checkpoint's weights are: the model's config and the method (with LoRA, its rank). Not
    the model's path (a moved model is the same model) nor the optimizer's settings (a resume may change them)."""
    shape = {"config": {k: v for k, v in model_config.items() if k not in VOLATILE_CONFIG_KEYS}, "method": method,
             "lora_r": lora_r if method != "full" else None}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def made_for_another(checkpoints: Path, trains: str) -> str | None:
    """The newest complete checkpoint here that another model or method made (an output_dir used again), or None.
    A checkpoint from before the digest was recorded says nothing and passes."""
    tag, _ = newest_complete(checkpoints)
    if tag is None or not trains:
        return None
    theirs = layout(checkpoints, tag).get("trains")
    return tag if theirs and theirs != trains else None


def save(engine, checkpoints: Path, step: int, rank: int, barrier, keep_last: int, layout: dict, extra: dict | None = None) -> None:
    """Every rank calls this (DeepSpeed's save is collective). `layout`: what the checkpoint was made under
    (world size, micro-batches, ZeRO stage), for the manifest. `extra`: rank 0's objects saved beside DeepSpeed's
    files, one torch file each (outer steps' state, workers/outer_steps.py), under the same manifest."""
    tag, staging = tag_of(step), checkpoints / PARTIAL
    if (checkpoints / tag / MANIFEST).is_file():
        return  # this step is saved already (a job resumed at its last step): a complete checkpoint is never rewritten
    if rank == 0 and (staging / tag).exists():
        shutil.rmtree(staging / tag)  # left by a save that died
    barrier()
    engine.save_checkpoint(str(staging), tag=tag, client_state={"step": step, **_universal_info()}, save_latest=False,
                           exclude_frozen_parameters=True)  # (a full fine-tune has none)
    barrier()  # every rank's shards are on disk
    if rank == 0:
        for name, value in (extra or {}).items():
            _torch_save(value, staging / tag / name)
        faults.kill_in_save(step)  # test-only (tests/test_checkpoints.py)
        _publish(checkpoints, staging / tag, step, layout)
        _prune(checkpoints, keep_last)
    barrier()  # nobody reads `latest` before it names this save


def load(engine, load_dir: str, tag: str) -> dict:
    """Every rank: the checkpoint `tag` under `load_dir` into the engine, built as at the job's start; its client
    state. The frozen base is not in a checkpoint (`save`; one made before holds it, and loads too): the model as
    built holds it, so the module's weights load strictly only where nothing is frozen. What else a checkpoint holds
    was made for this very model and method (`made_for_another` refuses any other before anything is loaded)."""
    frozen = any(not param.requires_grad for param in engine.module.parameters())
    _, client_state = engine.load_checkpoint(load_dir, tag=tag, load_module_strict=not frozen)
    return client_state


def _torch_save(value, path: Path) -> None:
    import torch

    torch.save(value, path)


def load_extra(checkpoints: Path, tag: str, name: str):
    """An object `save` kept beside DeepSpeed's files (in the checkpoint itself, never in its universal form); None
    when the checkpoint has none (made by a run that kept none, e.g. a synchronous one)."""
    import torch

    path = checkpoints / tag / name
    return torch.load(path, weights_only=True) if path.is_file() else None


def _publish(checkpoints: Path, staged: Path, step: int, layout: dict) -> None:
    files = {str(f.relative_to(staged)): {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(staged.rglob("*")) if f.is_file()}
    _fsync_tree(staged)
    final = checkpoints / staged.name
    if final.exists():  # moved into place by a save that died before its manifest: incomplete, never loaded
        shutil.rmtree(final)
    os.replace(staged, final)
    _write_atomically(final / MANIFEST, json.dumps({"step": step, "layout": layout, "files": files}, indent=1))
    _write_atomically(checkpoints / LATEST, staged.name)


def _universal_info() -> dict:
    """What ds_to_universal requires a checkpoint to carry (Megatron-DeepSpeed writes the same)."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def layout(checkpoints: Path, tag: str) -> dict:
    """The layout a checkpoint was made under (world size, micro-batches, accumulation, ZeRO stage)."""
    return json.loads((checkpoints / tag / MANIFEST).read_text())["layout"]


def loads_directly(saved: dict, now: dict) -> bool:
    """DeepSpeed loads its own shards only on the world size, ZeRO stage and precision that wrote them (micro-
    batches and offload do not matter: the partitions are cut by world size alone)."""
    keys = ("world_size", "zero_stage", "precision")
    return all(saved.get(k) == now[k] for k in keys)


def across_zero3(saved: dict, now: dict) -> str | None:
    """Why DeepSpeed cannot load a checkpoint saved under `saved`'s layout into a run under `now`'s, or None. Its
    universal form carries a checkpoint to other world sizes and between ZeRO-1 and 2, but not into or out of ZeRO-3
    (DeepSpeed 0.19.8, measured: full and LoRA, 2 -> 3 and 3 -> 2, fail in its loader)."""
    if (saved.get("zero_stage") == 3) == (now["zero_stage"] == 3):
        return None
    return (f"it was saved under ZeRO-{saved.get('zero_stage')} and this placement runs ZeRO-{now['zero_stage']}: DeepSpeed's universal "
            "checkpoints do not cross ZeRO-3's boundary; nothing was loaded or overwritten: set the spec's deepspeed.zero_stage to "
            f"{saved.get('zero_stage')} and submit it again")


def universal(checkpoints: Path, tag: str) -> Path:
    """Rank 0: the checkpoint in DeepSpeed's universal form, converted once (into a staging dir, then renamed)
    and kept beside it until the checkpoint itself is pruned. Returns the directory to load from (its parent)."""
    converted = checkpoints / UNIVERSAL / tag
    if not converted.is_dir():
        staging = checkpoints / UNIVERSAL / f".tmp-{tag}"
        shutil.rmtree(staging, ignore_errors=True)
        _to_universal(checkpoints / tag, staging)
        os.replace(staging, converted)
        (converted.parent / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's pointer to the staging dir (loads name the tag)
    return converted.parent


def _to_universal(source: Path, into: Path) -> None:
    """DeepSpeed's `ds_to_universal`, run in this process, where torch and DeepSpeed are imported already: as
    `python -m` it spent 5.5 s (2 cores, idle; up to 10 s loaded) importing them again before converting the tiny
    test model in 0.2 s, while every other rank of the job waited. One worker each, so it makes no process pool. Its progress lines and bars
    are kept out of the job's log; an error says which checkpoint and why, and leaves nothing half-converted."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(source), output_folder=str(into), num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=False)  # (its parser's defaults, but the workers)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)
    except Exception as err:
        shutil.rmtree(into, ignore_errors=True)
        raise RuntimeError(f"converting {source} to DeepSpeed's universal form failed: {type(err).__name__}: {err}") from err


def newest_complete(checkpoints: Path) -> tuple[str | None, list[str]]:
    """The newest checkpoint whose files match its manifest, and one warning per newer one that did not."""
    if not checkpoints.is_dir():
        return None, []
    tags = sorted((d for d in checkpoints.iterdir() if d.is_dir() and d.name.startswith(TAG_PREFIX) and d.name[len(TAG_PREFIX):].isdigit()),
                  key=lambda d: int(d.name[len(TAG_PREFIX):]), reverse=True)
    skipped = []
    for directory in tags:
        problem = verify(directory)
        if problem is None:
            return directory.name, skipped
        skipped.append(f"checkpoint {directory} skipped: {problem}; using the one before it")
    return None, skipped


def verify(directory: Path) -> str | None:
    """None if every file the manifest lists is there with its size and checksum, else what is wrong."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest (the save did not finish)"
    except (OSError, ValueError) as err:
        return f"unreadable manifest ({err})"
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def _prune(checkpoints: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; older ones go, newest first kept."""
    complete = sorted((d for d in checkpoints.iterdir() if d.is_dir() and d.name.startswith(TAG_PREFIX) and (d / MANIFEST).is_file()),
                      key=lambda d: int(d.name[len(TAG_PREFIX):]), reverse=True)
    for old in complete[keep_last:]:
        shutil.rmtree(old)
        shutil.rmtree(checkpoints / UNIVERSAL / old.name, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(directory: Path) -> None:
    for path in [*directory.rglob("*"), directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
