"""The default path: what the loss, evaluation and decoding need, without (B, T, V) tensors.

The plain path (model.QAdapter.forward, then residual_q.py; train.py --path plain, sample.py
--path plain) builds Q_R and log pi1 over the whole vocabulary at every position and then reads a
few numbers out of them. This module computes the same numbers directly, tested equal in value and
gradient (tests/test_fused_path.py):

  - only the states that take a response action (residual_q.scored_states): prompt and padding are
    never projected;
  - Q_R(s, a) and log pi1(a|s) at the taken action are dot products with one row of W_out;
  - one projection carries gradients: Q_R + α0·log pi1 = W_out·(u + α0·h) − α0·log Z1, so
        V(s) = α̃·logsumexp(W_out·(u + α0·h) / α̃) − α0·log Z1(s),   log Z1 = logsumexp(W_out·h),
    both through the vocabulary a block of states at a time (support/vocab_chunks.py);
  - decoding projects u + α0·h once per step; log Z1 is a constant per state, which softmax removes;
  - the frozen model's outputs (hidden states and log Z1) are kept across epochs (FrozenCache).

(h is QAdapter.prior's x1 when the head is stacked on earlier heads.) The head is called with the
input ids as well: a LoraHead (the paper's LoRA Q-adapter) runs them through the model; a QHead
reads h alone. u is then h_lora − h, and nothing else changes.
"""
import torch

from model import pick, positions
from residual_q import IGNORE, next_tokens, scored_states
from support.vocab_chunks import projected_kl, projected_logsumexp


def action_window(labels):
    """labels (2B, T) -> (states, window_labels, actions, valid), each (2B, W): the scored window
    (residual_q.scored_states), the action a_t taken in each state (0 in the last, which takes
    none), and which states take one (the window minus its padding and the terminal state)."""
    states, window_labels = scored_states(labels)  # (2B, W) each
    actions, _ = next_tokens(window_labels)  # (2B, W-1) a_t of each state
    actions = torch.cat([actions, torch.zeros_like(actions[:, :1])], dim=1)  # (2B, W)
    valid = torch.arange(states.shape[1], device=labels.device) < (window_labels != IGNORE).sum(-1, keepdim=True)
    return states, window_labels, actions, valid


def fused_scores(adapter, input_ids, attention_mask, states, actions, valid, alpha0, alpha_tilde, hidden=None,
                 logz1=None, every_action=False):
    """Q_R(s, a), log pi1(a|s) and V(s) at the states (B, W), with actions (B, W) the token taken in
    each (any id where none is) and valid (B, W) marking the states that exist (the rest is
    padding of the window and is skipped):

        Q_R(s, a)      = W_out[a]·u(s)
        log pi1(a | s) = W_out[a]·h(s) − log Z1(s)
        V(s)           = α̃·logsumexp(W_out·(u + α0·h) / α̃) − α0·log Z1(s)

    Returns (q_sa, logp1_sa, v, hidden, logz1, logp_every): the first three and logz1 (B, W) float32,
    zero where not valid; hidden (B, T, D) and logz1 may be passed back in to skip the frozen forward
    and the log Z1 projection (FrozenCache). logp_every (B, W, W), only with every_action (else None):
    log pi~(a_j | s_t) at every state t for every action a_j of the same row, each a dot product,
        log pi~(a | s) = (W_out[a]·(u + α0·h) − α0·log Z1(s) − V(s)) / α̃
    (what train.py --unlikelihood reads; garbage where t or j is not valid)."""
    position_ids = positions(attention_mask)
    if hidden is None:
        hidden, _ = adapter.hidden(input_ids, attention_mask, position_ids)  # (B, T, D)
    u, _ = adapter.head(hidden.float(), attention_mask, position_ids, input_ids=input_ids)  # (B, T, D)
    x1, _ = adapter.prior(hidden, attention_mask, position_ids)  # (B, T, D) h itself unless stacked
    h_s, u_s = pick(x1, states)[valid].float(), pick(u, states)[valid]  # (N, D)
    W = adapter.out_weight  # (V, D)
    if logz1 is None:
        logz1 = valid.new_zeros(valid.shape, dtype=torch.float32)  # (B, W)
        logz1[valid] = projected_logsumexp(h_s, W)  # log Z1, no gradient
    z1 = logz1[valid]  # (N,)
    w_a = W[actions[valid]].float()  # (N, D) output embeddings of the actions
    mixed = u_s + alpha0 * h_s  # (N, D) W_out·mixed = Q_R + α0·log pi1 + α0·log Z1
    out = []
    for x in ((w_a * u_s).sum(-1),  # Q_R(s, a)
              (w_a * h_s).sum(-1) - z1,  # log pi1(a | s)
              alpha_tilde * projected_logsumexp(mixed, W, alpha_tilde) - alpha0 * z1):  # V(s)
        full = x.new_zeros(valid.shape)  # (B, W)
        full[valid] = x
        out.append(full)
    q_sa, logp1_sa, v = out
    logp_every = None
    if every_action:
        x = mixed.new_zeros((*valid.shape, mixed.shape[1]))  # (B, W, D)
        x[valid] = mixed
        dots = x @ W[actions].float().transpose(1, 2)  # (B, W, W) W_out[a_j]·(u + α0·h)(s_t)
        logp_every = (dots - (alpha0 * logz1 + v)[:, :, None]) / alpha_tilde
    return q_sa, logp1_sa, v, hidden, logz1, logp_every


@torch.no_grad()
def directions(adapter, hidden, attention_mask, states, valid, alpha0, alpha_tilde, input_ids=None):
    """(x~, x1), each (N, D) float32 at the valid states (B, W) of the hidden states (B, T, D):
    pi~ = softmax(W_out·x~) with x~ = (u + α0·x1)/α̃, and pi1 = softmax(W_out·x1), the policy
    being customised (QAdapter.prior). With projected_kl, the KL between them without (N, V) tensors.
    input_ids (B, T): what a LoraHead reads (a QHead reads the hidden states alone)."""
    position_ids = positions(attention_mask)
    u, _ = adapter.head(hidden.float(), attention_mask, position_ids, input_ids=input_ids)  # (B, T, D)
    x1, _ = adapter.prior(hidden, attention_mask, position_ids)  # (B, T, D)
    x1_s = pick(x1, states)[valid].float()  # (N, D)
    return (pick(u, states)[valid] + alpha0 * x1_s) / alpha_tilde, x1_s


def frozen_hidden(adapter, ids, mask, width):
    """The frozen hidden states of right-padded rows, run without the columns that are padding in
    every row (chosen answers are often much shorter than rejected ones), padded back to width."""
    n = int(mask.sum(-1).max())
    hidden, _ = adapter.hidden(ids[:, :n], mask[:, :n], positions(mask[:, :n]))  # (B, n, D)
    hidden = hidden.masked_fill(mask[:, :n, None] == 0, 0)  # padding reads as zeros, as FrozenCache.get gives it
    return torch.nn.functional.pad(hidden, (0, 0, 0, width - n))


def pair_scores(adapter, batch, keys, cache, alpha0, alpha_tilde, with_kl=False, every_action=False):
    """batch: data.collate output on the model's device (2B sequences, chosen first); keys name its
    pairs for the cache. Returns (q_sa, v, logp1_sa, kl, window_labels, logp_every) as the plain path gives them
    (train.scores_plain), on the scored window: q_sa, logp1_sa (2B, W-1), v, window_labels (2B, W)
    (V = 0 at the state after the last response token, which is terminal), kl (2B, W-1) KL(pi~ ‖ pi1) at each scored state
    (with_kl), else None; logp_every (2B, W-1, W-1) log pi~(a_j | s_t) (every_action), else None."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows = [(k, "chosen") for k in keys] + [(k, "rejected") for k in keys]
    states, window_labels, actions, acting = action_window(labels)  # (2B, W) each
    hidden, logz1 = cache.get(rows, mask, states.shape[1])
    if hidden is None:  # the chosen and the rejected rows separately, each cut to its own length
        hidden = torch.cat([frozen_hidden(adapter, i, m, mask.shape[1])
                            for i, m in zip(ids.chunk(2), mask.chunk(2))])  # (2B, T, D)
    q_sa, logp1_sa, v, hidden, logz1, logp_every = fused_scores(adapter, ids, mask, states, actions, acting, alpha0,
                                                                alpha_tilde, hidden, logz1, every_action)  # (2B, W)
    cache.put(rows, hidden, mask, logz1, window_labels)
    kl = None
    if with_kl:
        x_tilde, x1 = directions(adapter, hidden, mask, states, acting, alpha0, alpha_tilde, ids)  # (N, D) each
        kl = torch.zeros_like(v)  # (2B, W)
        kl[acting] = projected_kl(x_tilde, x1, adapter.out_weight)
        kl = kl[:, :-1]
    if logp_every is not None:
        logp_every = logp_every[:, :-1, :-1]  # (2B, W-1, W-1)
    return q_sa[:, :-1], v, logp1_sa[:, :-1], kl, window_labels, logp_every


@torch.no_grad()
def next_logits(adapter, input_ids, attention_mask, position_ids, base_cache, head_cache, alpha0, alpha_tilde):
    """Decoding: the logits of pi~ at the newest position, (B, V), with one V × D projection:

        (Q_R + α0·log pi1) / α̃ = W_out·(u + α0·x1) / α̃ − α0·log Z1 / α̃

    and the last term is one constant per state, which the softmax removes, so it is never
    computed. head_cache None decodes the frozen base model alone (no head, not even the heads
    below when stacked): logits W_out·h. Both caches are filled in place; input_ids (B, t) are the
    tokens not yet in them."""
    hidden, base_cache = adapter.hidden(input_ids, attention_mask, position_ids, base_cache)  # (B, t, D)
    x = hidden[:, -1]  # (B, D)
    if head_cache is not None:  # (the head's cache, the caches of the heads below)
        x1, below = adapter.prior(hidden, attention_mask, position_ids, head_cache[1])  # (B, t, D)
        u, top = adapter.head(hidden.float(), attention_mask, position_ids, head_cache[0], input_ids=input_ids)  # (B, t, D)
        x, head_cache = (u[:, -1] + alpha0 * x1[:, -1].float()) / alpha_tilde, (top, below)
    return adapter.project(x), base_cache, head_cache  # (B, V)
