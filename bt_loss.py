"""The Bradley–Terry loss of Q-Adapter on preference pairs, with the squared-reward regulariser.

    L = −log σ( R(x, y_w) − R(x, y_l) ) + β · mean_t r2(s_t, a_t)²

R is the return of a response under the reward derived from Q_R (residual_q.py); y_w is the
chosen response, y_l the rejected one. The second term (the official code's "chi2") keeps the
per-token rewards small; it averages over every scored token of both responses; β = 0 turns it off.

A batch holds 2B sequences, the B chosen first and then the B rejected in the same order (data.py).
Metrics carry the names TRL users know: rewards/* are the returns R.

`chosen_nll` is an optional extra term, not in the paper: −mean_t log pi~(a_t|s_t) over the chosen
responses' tokens, which asks the customised policy to *write* the chosen answers as well as to rank
them. DPO with this term added is RPO (Pang et al. 2024, "Iterative Reasoning Preference
Optimization"); train.py's --nll weighs it (0 turns it off, the paper's loss).

`repetition_unlikelihood` is another optional term, not in the paper either: token-level
unlikelihood (Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training"). At each
token of a chosen answer it pushes down pi~ of every token the answer has already used, other
than the one that comes next: −Σ_c log(1 − pi~(c|s_t)). A model that copies what it has just said
is one that loops; train.py's --unlikelihood weighs it (0 turns it off).
"""
import torch
import torch.nn.functional as F

from residual_q import next_tokens, response_return


def bt_loss(r2, labels, beta):
    """r2: (2B, T-1) per-token derived rewards; labels: (2B, T). Returns (loss, metrics)."""
    returns = response_return(r2, labels)  # (2B,)
    chosen, rejected = returns.chunk(2)  # (B,), (B,)
    margins = chosen - rejected  # (B,)
    bt = -F.logsigmoid(margins).mean()
    _, mask = next_tokens(labels)  # (2B, T-1)
    chi2 = (r2.pow(2) * mask).sum() / mask.sum().clamp(min=1)
    loss = bt + beta * chi2
    metrics = {
        "loss": loss.detach(),
        "loss/bt": bt.detach(),
        "loss/chi2": chi2.detach(),
        "rewards/chosen": chosen.detach().mean(),
        "rewards/rejected": rejected.detach().mean(),
        "rewards/margins": margins.detach().mean(),
        "rewards/accuracies": (margins > 0).float().mean().detach(),
    }
    return loss, metrics


def chosen_nll(logp_sa, labels):
    """logp_sa: (2B, T-1) log pi~(a_t|s_t) (residual_q.action_logprob); labels: (2B, T).
    −(Σ log pi~ over the chosen responses' tokens) / (number of those tokens), the first B rows."""
    _, mask = next_tokens(labels)  # (2B, T-1)
    chosen_logp, chosen_mask = logp_sa.chunk(2)[0], mask.chunk(2)[0]  # (B, T-1)
    return -(chosen_logp * chosen_mask).sum() / chosen_mask.sum().clamp(min=1)


def earlier_tokens(labels):
    """labels: (N, T) -> (N, T-1, T-1) bool: column j is a candidate at state t (a token to push
    down there) when a_j, the action of state j, is a response token used before a_t (j < t), is the
    first use of that token in the response (each token counted once), and is not a_t itself."""
    actions, mask = next_tokens(labels)  # (N, T-1)
    n = actions.shape[1]
    same = actions[:, :, None] == actions[:, None, :]  # (N, T-1, T-1) a_t == a_j
    before = torch.ones(n, n, dtype=torch.bool, device=labels.device).tril(-1)  # (T-1, T-1) j < t
    used_earlier = (same & before & mask[:, None, :]).any(-1)  # (N, T-1) a_j already used before j
    first_use = mask & ~used_earlier  # (N, T-1)
    return before & first_use[:, None, :] & mask[:, :, None] & ~same


def repetition_unlikelihood(logp_earlier, labels):
    """logp_earlier: (2B, T-1, T-1) log pi~(a_j | s_t) for every state t and every action a_j of the
    same row; labels: (2B, T). Returns −Σ_t Σ_{c in C_t} log(1 − pi~(c|s_t)) / (number of chosen
    tokens), C_t = earlier_tokens, over the chosen rows (the first B)."""
    chosen = labels.chunk(2)[0]  # (B, T)
    candidates = earlier_tokens(chosen)  # (B, T-1, T-1)
    p = logp_earlier.chunk(2)[0].exp().clamp(max=1 - 1e-6)  # (B, T-1, T-1)
    return -(torch.log1p(-p) * candidates).sum() / next_tokens(chosen)[1].sum().clamp(min=1)
