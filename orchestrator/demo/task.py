"""The demo's synthetic task, made here so nothing is downloaded.

Stage 1 (from scratch) learns the letters and the format from `copy` and `sort` lines.
Stage 2 (LoRA) learns a new instruction, `rev`, and is scored by exact match on held-out words.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LETTERS = "abcdefgh"
CHARS = " abcdefghijklmnopqrstuvwxyz=0123456789"
SPECIALS = ["[PAD]", "[EOS]", "[UNK]"]
WORD_LENGTHS = (3, 4, 5)

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "vocab_size": len(SPECIALS) + len(CHARS),
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 1,
}


def write_tiny_llama(directory: Path) -> Path:
    """A config.json and a character-level tokenizer: everything `init: scratch` needs."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(TINY_LLAMA, indent=2, sort_keys=True) + "\n")
    vocab = {token: i for i, token in enumerate(SPECIALS + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
    tokenizer.save_pretrained(str(directory))
    return directory


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.choice(WORD_LENGTHS)))


def reverse_example(word: str) -> dict:
    return {"prompt": f"rev {word} =", "completion": f" {word[::-1]}"}


def write_demo_data(directory: Path, seed: int = 0, pretrain_lines: int = 4000, reverse_train: int = 2000, reverse_eval: int = 100) -> dict[str, Path]:
    """pretrain.jsonl (text), reverse-train.jsonl and reverse-eval.jsonl (prompt/completion); eval words never appear in training."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    words = sorted({_word(rng) for _ in range(20000)})
    rng.shuffle(words)
    held_out, seen = words[:reverse_eval], words[reverse_eval:]
    paths = {name: directory / f"{name}.jsonl" for name in ("pretrain", "reverse-train", "reverse-eval")}
    with paths["pretrain"].open("w") as f:
        for _ in range(pretrain_lines):
            w = rng.choice(seen)
            text = f"copy {w} = {w}" if rng.random() < 0.5 else f"sort {w} = {''.join(sorted(w))}"
            f.write(json.dumps({"text": text}) + "\n")
    with paths["reverse-train"].open("w") as f:
        for _ in range(reverse_train):
            f.write(json.dumps(reverse_example(rng.choice(seen))) + "\n")
    with paths["reverse-eval"].open("w") as f:
        for w in held_out:
            f.write(json.dumps(reverse_example(w)) + "\n")
    return paths


def exact_match(model, tokenizer, eval_path: Path) -> float:
    """Share of held-out prompts whose greedy completion is exactly right."""
    import torch

    records = [json.loads(line) for line in eval_path.read_text().splitlines()]
    right = 0
    model.eval()
    with torch.no_grad():
        for r in records:
            ids = tokenizer(r["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(r["completion"]) + 1,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            right += text == r["completion"]
    return right / len(records)
