"""`zeromix advise`: which cards can run a job, in which configuration, how fast and how efficiently."""

import json

import pytest

from orchestrator import catalog
from orchestrator.advice import advise
from orchestrator.errors import InputError
from orchestrator.model_facts import facts_from_config
from tests.conftest import REPO, cli
from tests.helpers import model_config as config

LLAMA_8B = facts_from_config(config("llama-3.1-8b"))


def test_every_card_and_pair_is_answered_and_ranked():
    rows = advise(LLAMA_8B, "lora", 2048, 16, 64, ["RTX 3090", "RTX 4090", "GTX 1060 6GB"])
    assert len(rows) == 3 + 6  # three single cards, six pairs (with repeats: two of a card is the usual pair)
    fits = [a for a in rows if a.plan]
    assert rows[: len(fits)] == fits  # those that run come first
    assert [a.tokens_per_s for a in fits] == sorted((a.tokens_per_s for a in fits), reverse=True)
    best = fits[0]
    assert best.tokens_per_joule == pytest.approx(best.tokens_per_s / sum(catalog.lookup(c).tdp_w for c in best.cards))
    single_3090 = next(a for a in rows if a.cards == ("GeForce RTX 3090",))
    assert single_3090.plan.precision == "bf16" and single_3090.summary()["micro_batches"] == [r.tuning.micro_batch for r in single_3090.plan.ranks]


def test_a_card_that_cannot_run_the_job_says_why():
    rows = advise(LLAMA_8B, "full", 2048, 16, 32, ["GTX 1060 6GB"])
    lone = next(a for a in rows if len(a.cards) == 1)
    assert lone.plan is None and "does not fit" in lone.why_not and "host RAM" in lone.why_not


def test_lora_targets_follow_the_family():
    assert LLAMA_8B.default_lora_targets == ["q_proj", "v_proj"]
    assert facts_from_config(config("phi-3-mini-4k-instruct")).default_lora_targets == ["qkv_proj"]
    assert facts_from_config(config("gpt2")).default_lora_targets == ["c_attn"]


def test_unknown_or_ambiguous_card_names_are_refused():
    with pytest.raises(InputError, match=r"--cards='RTX 3060' is not allowed; one catalog card per name; which of 'GeForce RTX 3060 12GB', 'GeForce RTX 3060 8GB'"):
        advise(LLAMA_8B, "lora", 512, 8, 64, ["RTX 3060"])


def test_the_command_gives_json_with_the_exact_parameter_count():
    done = cli("advise", "--model", str(REPO / "orchestrator/data/model_configs/qwen2.5-0.5b"), "--method", "full", "--seq-len", "1024",
                   "--batch", "8", "--cards", "RTX 3090,RTX 2080 Ti", "--json")
    answer = json.loads(done.stdout)
    assert answer["params"] == 494_032_768 and answer["method"] == "full"
    first = answer["options"][0]
    assert first["fits"] and first["est_tokens_per_s"] > 0 and first["zero_stage"] in (2, 3) and first["precision"] in ("bf16", "fp16")
    assert "GeForce RTX 3090" in first["cards"]


def test_qlora_lora_and_full_are_offered_side_by_side():
    """The default `--method all`: each card and pair answered for each method in one ranking. On a 12 GB card an
    8B model runs only as QLoRA without offloading its base."""
    rows = advise(LLAMA_8B, "all", 512, 16, 32, ["RTX 3060 12GB"])
    assert sorted((a.method, len(a.cards)) for a in rows) == sorted((m, n) for m in ("qlora", "lora", "full") for n in (1, 2))
    lone = {a.method: a for a in rows if len(a.cards) == 1}
    assert lone["qlora"].plan is not None and lone["qlora"].plan.four_bit is not None and lone["qlora"].summary()["method"] == "qlora"
    assert lone["qlora"].plan.offload == "none"
    assert lone["full"].plan is None
    assert lone["lora"].plan is None or lone["lora"].plan.zero.offload_params  # a 16-bit 8B base does not fit 12 GB as it is
