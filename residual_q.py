"""The residual-Q math of Q-Adapter (Li et al., arXiv 2407.03856), as pure functions of tensors.

Token generation is a deterministic MDP: state s_t = prompt + response so far, action a_t = next
token, s_{t+1} = s_t ⊕ a_t. The head gives Q_R(s, ·) and the frozen model gives log pi1(· | s), both
(B, T, V) with position t describing state s_t (the tokens up to and including t).

  customised_logits  z(s, a) = (Q_R(s,a) + α0·log pi1(a|s)) / α̃          so  pi~(·|s) = softmax(z)
  soft_value         V(s)    = α̃ · logsumexp_a z(s, a)
  next_tokens        the one shift: position t scores token t+1; scored where labels[t+1] ≠ IGNORE
  scored_states      the window of states that take a response action (all the loss needs)
  gather_actions     x(s_t, a_t) for every state, e.g. Q_R(s_t, a_t) or log pi1(a_t | s_t)
  next_value         V(s_{t+1}) for every action, 0 after the last response token
  derived_reward     r2(s_t, a_t) = Q_R(s_t, a_t) − γ·V(s_{t+1}),  V = 0 after the last response token
                     (after a response cut at the cutoff: V = 0 too, or V bootstrapped there)
  response_return    R(x, y) = Σ_t r2(s_t, a_t) over the response tokens only
  response_logprob   log p(y|x) = Σ_t log p(a_t|s_t) over the response tokens (for the identity below)
  action_logprob     log pi~(a_t|s_t) = (Q_R(s_t,a_t) + α0·log pi1(a_t|s_t) − V(s_t)) / α̃, from the same scores
  kl_to_frozen       KL(pi~ ‖ pi1) at every state

With γ = 1 the sum telescopes (the identity tests/test_residual_q.py checks):
  R(x, y) = α̃·log pi~(y|x) − α0·log pi1(y|x) + V(s_0)
so a difference of returns is a DPO-style log-ratio of pi~ against the frozen model. A response cut
at the cutoff and bootstrapped there has − V(s_T) besides, the value of the state after its last
token: a number the policy does not fix (adding a constant to Q_R(s_T, ·) moves V(s_T) and leaves
pi~ as it is), which the loss can then move instead of the policy. α0 = λ·α1 is
the weight on the frozen model (the official code's alpha_0); with Q_R = 0 and α0 = α̃, pi~ = pi1.
"""
import torch

IGNORE = -100  # label of a token that is not scored (prompt, padding); the same value as data.py


def customised_logits(q_r, logp1, alpha0, alpha_tilde):
    """(B, T, V), (B, T, V) -> (B, T, V): logits of the customised policy pi~."""
    return (q_r + alpha0 * logp1) / alpha_tilde


def soft_value(q_r, logp1, alpha0, alpha_tilde):
    """(B, T, V) -> (B, T): V(s_t) = α̃ · logsumexp_a (Q_R + α0·log pi1) / α̃."""
    return alpha_tilde * torch.logsumexp(customised_logits(q_r, logp1, alpha0, alpha_tilde), dim=-1)


def next_tokens(labels):
    """The one place that shifts. labels: (B, T) with IGNORE where not scored.

    Returns (actions, mask), each (B, T-1): column t is the action a_t = token t+1 taken in state
    s_t (described by position t), and whether it is a response token. The first response token is
    scored (its state is the last prompt position); prompt and padding are not."""
    actions = labels[:, 1:]  # (B, T-1)
    mask = actions != IGNORE  # (B, T-1)
    return actions.masked_fill(~mask, 0), mask


def scored_states(labels):
    """Which positions the loss needs: the states that take a response action. Every next state
    s_{t+1} of a scored state is itself scored or terminal (V = 0), so nothing else is read, and
    the (B, T, V) tensors can be computed on this window alone (prompt and padding skipped).

    Returns (index, window_labels), each (B, W): window column j is position index[:, j] (the
    first column is the last prompt position), and window_labels are labels such that every
    function here gives on the window what it gives on the whole sequence."""
    _, mask = next_tokens(labels)  # (B, T-1)
    first = mask.int().argmax(-1)  # (B,) state before the first response token
    length = mask.sum(-1)  # (B,) response tokens
    last = mask.shape[1] - 1 - mask.flip(-1).int().argmax(-1)  # (B,) state before the last one
    if bool(((last - first + 1 != length) & (length > 0)).any()):
        raise ValueError("scored_states: a row's scored labels are not one contiguous run (the window "
                         "assumes prompt, then response, then padding: data.py's contract)")
    offsets = torch.arange(int(length.max()) + 1, device=labels.device)  # (W,)
    index = (first[:, None] + offsets).clamp(max=labels.shape[1] - 1)  # (B, W)
    inside = offsets <= length[:, None]  # (B, W)
    return index, labels.gather(1, index).masked_fill(~inside, IGNORE)


def gather_actions(x, labels):
    """x: (B, T, V) per-state vectors -> (B, T-1): x(s_t, a_t), zero where not scored."""
    actions, mask = next_tokens(labels)
    picked = x[:, :-1].gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return picked * mask


def next_value(v, labels, cut=None):
    """V(s_{t+1}) for every action a_t, (B, T-1), 0 where s_{t+1} is terminal. v: (B, T) V(s_t), as
    soft_value gives it; s_{t+1} is described by position t+1. It is terminal when a_t is the last
    response token: the end of the sequence, EOS, or a truncated response (the data stops there).
    cut: (B,) bool or None, the rows whose response was cut at the cutoff before it ended
    (data.collate's "cut"); their last state is then not terminal but bootstrapped (train.py --cut
    bootstrap), so the last token's reward subtracts γ·V of the state after it, as every other's does."""
    _, mask = next_tokens(labels)  # (B, T-1)
    live = torch.zeros_like(mask)
    live[:, :-1] = mask[:, 1:]  # is a_{t+1} a response token, i.e. is s_{t+1} non-terminal?
    if cut is not None:
        live = live | (mask & cut[:, None])  # a cut response goes on after its last token
    return v[:, 1:] * live


def derived_reward(q_sa, v, labels, gamma, cut=None):
    """r2(s_t, a_t) = Q_R(s_t, a_t) − γ·V(s_{t+1}) (inverse soft Bellman equation), (B, T-1).

    q_sa: (B, T-1) Q_R(s_t, a_t), as gather_actions(q_r, labels) gives it; v: (B, T) V(s_t); V(s_{t+1})
    and the terminal states (and cut, the rows bootstrapped at the cutoff) as next_value says."""
    _, mask = next_tokens(labels)  # (B, T-1)
    return (q_sa - gamma * next_value(v, labels, cut)) * mask


def response_return(r2, labels):
    """R(x, y) = Σ_t r2(s_t, a_t) over the response: (B, T-1) -> (B,)."""
    _, mask = next_tokens(labels)
    return (r2 * mask).sum(-1)


def response_logprob(logits, labels):
    """log p(y | x) = Σ_t log softmax(logits)(a_t | s_t) over the response: (B, T, V) -> (B,)."""
    return gather_actions(torch.log_softmax(logits, dim=-1), labels).sum(-1)


def action_logprob(q_sa, logp1_sa, v, labels, alpha0, alpha_tilde):
    """log pi~(a_t | s_t) of every response action, (B, T-1), zero where not scored.

    pi~ = softmax(z) with z = (Q_R + α0·log pi1)/α̃ and V = α̃·logsumexp z, so log pi~(a|s) = z(s,a) − V(s)/α̃:
    it needs only Q_R(s_t,a_t) and log pi1(a_t|s_t) (gather_actions) and V(s_t) (soft_value, (B, T))."""
    _, mask = next_tokens(labels)  # (B, T-1)
    return (q_sa + alpha0 * logp1_sa - v[:, :-1]) / alpha_tilde * mask


def kl_to_frozen(q_r, logp1, alpha0, alpha_tilde):
    """KL(pi~(·|s) ‖ pi1(·|s)) = Σ_a pi~ (log pi~ − log pi1) at every state: (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(customised_logits(q_r, logp1, alpha0, alpha_tilde), dim=-1)
    return (logp.exp() * (logp - logp1)).sum(-1)
