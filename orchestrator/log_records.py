"""The tagged JSON records a job writes into its Ray log, and how to read them back. Kept apart from
job_driver.py, which imports Ray: the CLI and the scheduler read records before (or without) connecting, and
Ray must not be imported before the auth settings are in the environment (it reads them once, at import)."""

from __future__ import annotations

import json

RESULT_TAG = "ZEROMIX_RESULT"  # the job's summary, printed by the driver at the end
FAILURE_TAG = "ZEROMIX_FAILURE"  # why a rank failed (worker_group.RankFailed.record): the scheduler restarts on it


def tagged_records(text: str, tag: str) -> list[dict]:
    """The JSON objects that follow `tag` in a log. Ray forwards worker output asynchronously, so a tagged
    record can share a line with another process's output: decode just the object after each tag."""
    decoder = json.JSONDecoder()
    records, start = [], text.find(tag)
    while start != -1:
        try:
            records.append(decoder.raw_decode(text, start + len(tag) + 1)[0])
        except json.JSONDecodeError:
            pass  # not one of ours: each record is written with a single write() and cannot be split
        start = text.find(tag, start + len(tag))
    return records
