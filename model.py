"""The frozen base LLM pi1 and the small trainable Q-head that learns the residual Q-function Q_R.

    log pi1(. | s) = log_softmax(W_out · h(s))           the frozen model, never trained
    Q_R(s, .)      = W_out · u(s),  u(s) = QHead(h(s))    a vector over the vocabulary

h(s) is the frozen model's last hidden state (after its final norm), the vector its own output
layer reads; W_out is that frozen output layer (V × D). The head is a small Llama-style transformer
(its own attention, so its own KV cache when decoding) that maps h to a correction u in the same
D-dimensional space, so Q_R is projected by the *frozen* output embedding:
  - the head needs no V × D matrix of its own (on Llama-3.1-8B that alone would be 525M parameters),
  - Q_R and the frozen logits live in one space, so the fast path (support/fused_path.py) can add
    them before the one expensive projection: Q_R + α0·log pi1 = W_out·(u + α0·h) − α0·log Z1,
  - its last projection starts at zero, so Q_R ≡ 0 at step 0 and the customised policy is exactly
    the frozen model when α0 = α̃ (residual_q.py): customisation starts from zero forgetting.

`QAdapter.forward` is the plain path: Q_R and log pi1 over the whole vocabulary, the two tensors
the formulas of residual_q.py take. Default head (2 layers, width 256, 4 heads): 1.8M parameters,
1.3% of SmolLM2-135M-Instruct (134.5M); on Llama-3.1-8B-Instruct (D = 4096) the same flags give
3.6M, 0.05% of 8.0B, and `--head-width 1024` gives 33M, 0.4%.

The other head, `LoraHead` (train.py --q-head lora), is LoRA on the frozen model's layers, as the
paper's Q-adapter, with Q_R = the logits with the adapter minus those without, u(s) = h_lora(s) − h(s):
zero at step 0 like QHead's, where the official code takes the LoRA model's logits themselves as Q_R
(a choice; LoraHead says why). It costs a second pass through the whole model per step, with a backward.

Loading the base model (a Hugging Face causal LM whose logits are W_out·h exactly; load_base refuses
a softcap, a logit scale or a bias; tested: Llama, SmolLM2-135M and tiny shapes) and saving or
loading heads: support/loading.py.
"""
import copy
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
from transformers import DynamicCache, LlamaConfig, LlamaModel

from support.compat import run_decoder
from support.vocab_chunks import project


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

    def forward(self, h, attention_mask, position_ids, cache=None, input_ids=None):
        """h: (B, T, D) frozen hidden states, float32 -> u: (B, T, D), and the head's KV cache.
        input_ids: ignored (LoraHead reads them; this head reads h alone)."""
        out, cache = run_decoder(self.blocks, cache, inputs_embeds=self.down(h), attention_mask=attention_mask,
                                 position_ids=position_ids)  # (B, T, d)
        return self.up(out), cache


def head_config_for(base, width=256, layers=2, heads=4):
    """The head's shape for a frozen model: its hidden width D, its context and its RoPE base."""
    c = base.config
    rope = getattr(c, "rope_parameters", None) or {}
    return HeadConfig(base_hidden=c.hidden_size, width=width, layers=layers, heads=heads,
                      max_positions=getattr(c, "max_position_embeddings", 8192),
                      rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))))


@dataclass
class LoraHeadConfig:
    base_hidden: int  # D, width of the frozen model's hidden state
    rank: int = 8  # r of each LoRA update B·A (the paper: 8)
    targets: tuple = ("q_proj", "v_proj")  # the frozen model's linear layers that get one (the paper: q, v)
    alpha: float = 16.0  # LoRA scale numerator: W + (alpha / r)·B·A (train.py: 2·r, as baselines.py)


class LoraHead(nn.Module):
    """LoRA on the frozen model's own layers, as the paper's Q-adapter (train.py --q-head lora), with

        Q_R(s, ·) = (logits with the adapter) − (logits without) = W_out·(h_lora(s) − h(s)),

    so its correction is u(s) = h_lora(s) − h(s), both last hidden states after the final norm, and
    W_out is shared and frozen: the fused projection W_out·(u + α0·h), decoding and the KL are
    QHead's, unchanged. peft initialises every B to zero, so Q_R ≡ 0 at step 0, exactly.

    The difference is our choice. The official code (github mansicer/Q-Adapter) takes the LoRA
    model's logits themselves as Q_R, so its Q_R starts at the base logits and its customised policy
    at step 0 is softmax((logits + α0·log pi1)/α̃), not pi1. Ours starts at zero: with α0 = α̃ the
    customised policy is pi1 exactly, so customisation starts from zero forgetting, and the head
    shares everything downstream with QHead.

    The LoRA layers sit in a second set of the decoder's modules built over the *same* weight
    tensors (a copy of the module objects, not of the weights): the frozen model itself is never
    modified, so every pass of pi1 (QAdapter.hidden, sample.py --compare, evaluate.py) is the frozen
    model, with no adapter to switch off. Only the LoRA weights train and are saved.

    What it costs, against QHead: a second forward per step (the frozen pass gives h and log pi1,
    then this adapter pass), and a backward pass through the whole frozen model, which keeps the
    activations of every layer, where QHead's backward goes through its 2 small layers. Decoding
    runs the model twice per token, each with its own KV cache. The frozen-output cache
    (support/frozen_cache.py) still skips the frozen pass, not this one: it needs the input ids."""

    def __init__(self, base, cfg: LoraHeadConfig):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import cast_adapter_dtype
        self.cfg = cfg
        decoder = base.get_decoder()
        shared = {id(t): t for t in [*decoder.parameters(), *decoder.buffers()]}  # kept, not copied
        self.decoder = copy.deepcopy(decoder, memo=shared)  # new modules over the frozen tensors
        inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets)),
                                self.decoder)  # B = 0
        cast_adapter_dtype(self.decoder, "default")  # LoRA weights in float32, also on a bf16 model
        self.decoder.eval()

    def train(self, mode=True):
        """The copied layers stay in eval mode (no dropout), as the frozen pass runs: h_lora = h at step 0."""
        super().train(mode)
        self.decoder.eval()
        return self

    def new_cache(self):
        """An empty KV cache for decoding: the adapter pass's keys and values are not the frozen pass's."""
        return DynamicCache(config=self.decoder.config)

    def forward(self, h, attention_mask, position_ids, cache=None, input_ids=None):
        """input_ids (B, T) through the model with LoRA, and h (B, T, D) their frozen hidden states,
        float32 -> u = h_lora − h: (B, T, D) float32, and this pass's KV cache."""
        h_lora, cache = run_decoder(self.decoder, cache, input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids)  # (B, T, D)
        return h_lora.float() - h, cache

    def state_dict(self, *args, **kwargs):
        """The LoRA weights alone: the others are the frozen model's, not this head's."""
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if "lora_" in k}

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """The LoRA weights, as state_dict gives them; strict: every one and nothing else."""
        missing, unexpected = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in missing if "lora_" in k]
        if strict and (missing or unexpected):
            raise RuntimeError(f"LoRA weights do not fit: missing {missing[:2]}, unexpected {unexpected[:2]}")
        return missing, unexpected


def head_parameter_count(head):
    return sum(p.numel() for p in head.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------
# the frozen model and the head together: Q_R and log pi1


def positions(attention_mask):
    """Position ids that skip left padding: (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pick(x, states):
    """x: (B, T, ...) -> (B, W, ...) at positions states: (B, W)."""
    return x.gather(1, states.view(*states.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))


class Output(NamedTuple):
    q_r: torch.Tensor  # (B, W, V) Q_R at the asked states, float32
    logp1: torch.Tensor  # (B, W, V) log pi1 at the asked states, float32, no gradient
    base_cache: object  # the frozen model's KV cache (decoding), else None
    head_cache: object  # (the head's cache, the caches of the heads below), else None


class QAdapter(nn.Module):
    """The frozen base and the trainable head: Q_R and log pi1 over the vocabulary.

    Stacking (sequential customisation): `below` lists heads trained earlier, bottom up, each with
    the α0 and α̃ it was trained with. They are frozen, and the policy the head customises is then
    not the base model but the customised policy of that chain, pi~_a, so that

        pi~_ab(a|s) ∝ exp((Q_R^b(s,a) + α0_b·log pi~_a(a|s)) / α̃_b).

    In this class "pi1" is that policy, the one being customised: the base model's when nothing
    is below. (Decoding with the frozen model alone, sample.py's --compare, is always the base's.)

    alpha0, alpha_tilde: the α0 and α̃ the head is trained with (train.py) or was trained with (a
    checkpoint's config, support/loading.py); decoding (sample.generate) uses them unless told
    otherwise. None for an adapter built by hand: decoding then needs them passed."""

    def __init__(self, base, head, below=(), alpha0=None, alpha_tilde=None):
        super().__init__()
        self.base, self.head = base, head
        self.alpha0, self.alpha_tilde = alpha0, alpha_tilde
        self.out_weight = base.get_output_embeddings().weight  # (V, D), frozen W_out
        self.below = nn.ModuleList(h.requires_grad_(False).eval() for h, _, _ in below)
        self.below_alphas = [(float(a0), float(at)) for _, a0, at in below]

    def new_head_cache(self):
        """Empty KV caches for decoding: the head's, and one per head below."""
        return self.head.new_cache(), [h.new_cache() for h in self.below]

    def hidden(self, input_ids, attention_mask, position_ids=None, cache=None):
        """The frozen model's last hidden state h: (B, T, D) in its own dtype, never with gradients."""
        with torch.no_grad():
            return run_decoder(self.base.get_decoder(), cache, input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids)

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

    def project(self, x):
        """(…, D) -> (…, V): W_out·x in float32 (support/vocab_chunks.py: a bf16 W_out is read a
        block of rows at a time, each block in float32)."""
        return project(x, self.out_weight)

    def forward(self, input_ids, attention_mask, states=None, position_ids=None, base_cache=None,
                head_cache=None):
        """input_ids, attention_mask: (B, T). Returns Output(Q_R, log pi1, caches), the plain path.

        states (B, W): the positions whose Q_R and log pi1 are wanted (default: all T). Decoding
        passes the newest position only, with base_cache (a transformers DynamicCache) and
        head_cache (new_head_cache()), both filled in place, and the position ids of the new
        tokens (input_ids are then only the tokens not yet in the caches)."""
        if position_ids is None:
            position_ids = positions(attention_mask)
        hidden, base_cache = self.hidden(input_ids, attention_mask, position_ids, base_cache)  # (B, T, D)
        if states is None:
            states = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        top, below = head_cache if head_cache is not None else (None, None)
        x1, below = self.prior(hidden, attention_mask, position_ids, below)  # (B, T, D)
        # u from h (QHead), or from the tokens through the model with LoRA (LoraHead)
        u, top = self.head(hidden.float(), attention_mask, position_ids, top, input_ids=input_ids)  # (B, T, D)
        q_r = self.project(pick(u, states))  # (B, W, V)  Q_R(s, ·) = W_out·u(s)
        with torch.no_grad():
            logp1 = torch.log_softmax(self.project(pick(x1, states)), dim=-1)  # (B, W, V)  log pi1(·|s)
        return Output(q_r, logp1, base_cache, None if head_cache is None else (top, below))


# ------------------------------------------------------------------------------------------------
# several heads trained separately, composed at decode time (compose.py)


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

    def forward(self, h, attention_mask, position_ids, cache=None, input_ids=None):
        """h: (B, T, D) -> Σ_i w_i·u_i: (B, T, D), and the list of the heads' caches."""
        caches = cache if cache is not None else [None] * len(self.heads)
        total, new = 0.0, []
        for head, w, c in zip(self.heads, self.weights, caches):
            u, c = head(h, attention_mask, position_ids, c, input_ids=input_ids)
            total, new = total + w * u, new + [c]
        return total, (new if cache is not None else None)
