"""Shared fixtures: the embedded tokenizer, and a tiny randomly initialised Llama saved like a hub model."""
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from support import loading

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def tokenizer():
    return loading.load_tokenizer()


def tiny_llama(tokenizer, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_path(tokenizer, tmp_path_factory):
    """A tiny random Llama with the embedded tokenizer, saved as a local model folder."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def separable_pairs(n, offset=0):
    """A trivially separable preference: answer 'Yes.' rather than 'No.', whatever the question."""
    topics = ["cats", "rain", "music", "tea", "maps", "bikes", "stars", "bread", "chess", "snow",
              "boats", "clocks", "trees", "paint", "coins", "lamps", "kites", "shoes", "bees", "rivers"]
    rows = []
    for i in range(offset, offset + n):
        user = [{"role": "user", "content": f"Question {i}: do you like {topics[i % len(topics)]}?"}]
        rows.append({"chosen": user + [{"role": "assistant", "content": "Yes."}],
                     "rejected": user + [{"role": "assistant", "content": "No."}]})
    return rows
