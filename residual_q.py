"""The residual-Q math of Q-Adapter (Li et al., arXiv 2407.03856), as pure functions of tensors.

Token generation is a deterministic MDP: state s_t = prompt + response so far, action a_t = next
token, s_{t+1} = s_t ⊕ a_t. The head gives Q_R(s, ·) and the frozen model gives log pi1(· | s), both
(B, T, V) with position t describing state s_t (the tokens up to and including t).

  customised_logits  z(s, a) = (Q_R(s,a) + α0·log pi1(a|s)) / α̃          so  pi~(·|s) = softmax(z)
  customised_logprobs  log pi~(·|s) = log_softmax(z(s, ·))
  soft_value         V(s)    = α̃ · logsumexp_a z(s, a)
  next_tokens        the one shift: position t scores token t+1; scored where labels[t+1] ≠ IGNORE
  scored_states      the window of states that take a response action (all the loss needs)
  gather_actions     x(s_t, a_t) for every state, e.g. Q_R(s_t, a_t) or log pi1(a_t | s_t)
  next_value         V(s_{t+1}) for every action, 0 after the last response token
  derived_reward     r2(s_t, a_t) = Q_R(s_t, a_t) − γ·V(s_{t+1}),  V = 0 after the last response token
  response_return    R(x, y) = Σ_t r2(s_t, a_t) over the response tokens only
  response_logprob   log p(y|x) = Σ_t log p(a_t|s_t) over the response tokens (for the identity below)
  action_logprob     log pi~(a_t|s_t) = (Q_R(s_t,a_t) + α0·log pi1(a_t|s_t) − V(s_t)) / α̃, from the same scores
  kl_divergence      KL(p ‖ q) = Σ_a p(a)·(log p(a) − log q(a)) at every state (KL(pi~ ‖ pi1): evaluation)

With γ = 1 the sum telescopes (the identity tests/test_residual_q.py checks):
  R(x, y) = α̃·log pi~(y|x) − α0·log pi1(y|x) + V(s_0)
so a difference of returns is α̃·Δlog pi~ − α0·Δlog pi1 (V(s_0) cancels: both responses share the
prompt), and with α0 = α̃ = β exactly DPO's β-scaled log-ratio of pi~ against the frozen model.
α0 = λ·α1 is the weight on the frozen model (the official code's alpha_0; α1 = 1 for a softmax LM,
so λ is the paper's knob); with Q_R = 0 and α0 = α̃, pi~ = pi1.
"""
import torch

IGNORE = -100  # label of a token that is not scored (prompt, padding); the same value as data.py


def customised_logits(q_r, logp1, alpha0, alpha_tilde):
    """(B, T, V), (B, T, V) -> (B, T, V): logits of the customised policy pi~."""
    return (q_r + alpha0 * logp1) / alpha_tilde


def customised_logprobs(q_r, logp1, alpha0, alpha_tilde):
    """(…, V), (…, V) -> (…, V): log pi~(·|s) = log_softmax((Q_R + α0·log pi1) / α̃)."""
    return torch.log_softmax(customised_logits(q_r, logp1, alpha0, alpha_tilde), dim=-1)


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


def next_value(v, labels):
    """V(s_{t+1}) for every action a_t, (B, T-1), 0 where s_{t+1} is terminal. v: (B, T) V(s_t), as
    soft_value gives it; s_{t+1} is described by position t+1. It is terminal when a_t is the last
    response token: EOS, or the last token kept of a response cut at the cutoff (the data stops
    there, so R is the return of that prefix, as DPO scores it)."""
    _, mask = next_tokens(labels)  # (B, T-1)
    live = torch.zeros_like(mask)
    live[:, :-1] = mask[:, 1:]  # is a_{t+1} a response token, i.e. is s_{t+1} non-terminal?
    return v[:, 1:] * live


def derived_reward(q_sa, v, labels, gamma):
    """r2(s_t, a_t) = Q_R(s_t, a_t) − γ·V(s_{t+1}) (inverse soft Bellman equation), (B, T-1).

    q_sa: (B, T-1) Q_R(s_t, a_t), as gather_actions(q_r, labels) gives it; v: (B, T) V(s_t); V(s_{t+1})
    and the terminal states as next_value says."""
    _, mask = next_tokens(labels)  # (B, T-1)
    return (q_sa - gamma * next_value(v, labels)) * mask


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


def kl_divergence(logp, logq):
    """KL(p ‖ q) = Σ_a p(a)·(log p(a) − log q(a)) at every state: (…, V), (…, V) -> (…).
    KL(pi~ ‖ pi1) = kl_divergence(customised_logprobs(q_r, logp1, α0, α̃), logp1); the same without
    (N, V) tensors, a block of states at a time: support/vocab_chunks.projected_kl."""
    return (logp.exp() * (logp - logq)).sum(-1)
