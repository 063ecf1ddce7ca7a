"""The loss of Q-Adapter on preference pairs: Bradley–Terry on the reward derived from Q_R.

`q_adapter_loss` is the paper's objective on one screen. From the per-token quantities of a batch
(both paths of train.py compute them: `--path plain` over the whole vocabulary, `--path fused`
without (2B, T, V) tensors) it follows the paper's order:

    r2(s_t, a_t) = Q_R(s_t, a_t) − γ·V(s_{t+1}),   V = 0 after the last response token
    R(x, y)      = Σ_t r2(s_t, a_t)                 over the response tokens
    L            = −log σ( R(x, y_w) − R(x, y_l) ) + β · mean_t r2(s_t, a_t)²

y_w is the chosen response, y_l the rejected one. The second term (the official code's "chi2")
keeps the per-token rewards small; it averages over every scored token of both responses; β = 0
turns it off. A batch holds 2B sequences, the B chosen first and then the B rejected in the same
order (data.py). Metrics carry the names TRL users know: rewards/* are the returns R.

Two terms beyond the paper, both off by default (weight 0) and opt-in from train.py:
  --nll           `chosen_nll`: −mean_t log pi~(a_t|s_t) over the chosen responses' tokens, so that
                  the customised policy learns to *write* the chosen answers as well as to rank them.
                  DPO with this term is RPO (Pang et al. 2024, "Iterative Reasoning Preference
                  Optimization"; baselines.py --method dpo --nll).
  --unlikelihood  `repetition_unlikelihood`: token-level unlikelihood (Welleck et al. 2019, "Neural
                  Text Generation with Unlikelihood Training"). At each token of a chosen answer it
                  pushes down pi~ of every token the answer has already used, other than the one that
                  comes next: −Σ_c log(1 − pi~(c|s_t)). A model that copies what it has just said is
                  one that loops.
"""
import torch
import torch.nn.functional as F

from residual_q import action_logprob, derived_reward, next_tokens, response_return


def q_adapter_loss(q_sa, v, logp1_sa, labels, alpha0, alpha_tilde, gamma, beta, nll=0.0, unlikelihood=0.0,
                   logp_every=None):
    """The loss of one batch of 2B rows (chosen first) and its metrics.

    q_sa      (2B, T-1)  Q_R(s_t, a_t) of every response action (residual_q.gather_actions)
    v         (2B, T)    V(s_t) = α̃·logsumexp_a (Q_R + α0·log pi1)/α̃ (residual_q.soft_value)
    logp1_sa  (2B, T-1)  log pi1(a_t | s_t), read by --nll only
    labels    (2B, T)    token ids on the responses, IGNORE elsewhere (data.collate, not shifted)
    logp_every (2B, T-1, T-1) log pi~(a_j | s_t) at every state for every action of the row, read by
              --unlikelihood only"""
    r2 = derived_reward(q_sa, v, labels, gamma)  # (2B, T-1) r2(s_t, a_t) = Q_R(s_t, a_t) − γ·V(s_{t+1})
    returns = response_return(r2, labels)  # (2B,) R(x, y) = Σ_t r2(s_t, a_t)
    chosen, rejected = returns.chunk(2)  # (B,) R(x, y_w), R(x, y_l)
    bt = -F.logsigmoid(chosen - rejected).mean()  # −log σ(R(x, y_w) − R(x, y_l))
    _, mask = next_tokens(labels)  # (2B, T-1) the response tokens
    chi2 = (r2.pow(2) * mask).sum() / mask.sum().clamp(min=1)  # mean_t r2(s_t, a_t)²
    loss = bt + beta * chi2
    metrics = {**reward_metrics(chosen, rejected), "loss/bt": bt.detach(), "loss/chi2": chi2.detach()}
    if nll > 0:  # beyond the paper
        logp = action_logprob(q_sa, logp1_sa, v, labels, alpha0, alpha_tilde)  # (2B, T-1) log pi~(a_t|s_t)
        term = chosen_nll(logp, labels)
        loss, metrics["loss/nll"] = loss + nll * term, term.detach()
    if unlikelihood > 0:  # beyond the paper
        term = repetition_unlikelihood(logp_every, labels)
        loss, metrics["loss/unlikelihood"] = loss + unlikelihood * term, term.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


def reward_metrics(chosen, rejected):
    """TRL's metrics of a batch's implicit rewards, (B,) each: the mean rewards and margin, and the
    pairwise accuracy, the share of pairs whose chosen response has the larger reward. Every method
    reports these (Q-Adapter its returns R, DPO and SFT β·log pi/pi1; baselines.py, evaluate.py)."""
    margins = (chosen - rejected).detach()  # (B,)
    return {"rewards/chosen": chosen.detach().mean(), "rewards/rejected": rejected.detach().mean(),
            "rewards/margins": margins.mean(), "rewards/accuracies": (margins > 0).float().mean()}


def longer_wins(len_chosen, len_rejected):
    """len_chosen, len_rejected: (B,) response lengths in tokens. The share of pairs whose chosen
    response is the longer one, ties counted half: what ranking by length alone scores, the yardstick
    a learned preference has to beat (train.py's summary, evaluate.py's frozen row)."""
    len_chosen, len_rejected = torch.as_tensor(len_chosen), torch.as_tensor(len_rejected)
    return ((len_chosen > len_rejected).float() + 0.5 * (len_chosen == len_rejected).float()).mean()


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
