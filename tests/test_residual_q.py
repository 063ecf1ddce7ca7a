"""The residual-Q math on hand-made tensors: the telescoping identity, alignment, zero head."""
import pytest
import torch

import residual_q as rq
from bt_loss import chosen_nll, earlier_tokens, longer_wins, q_adapter_loss, repetition_unlikelihood

IGNORE = rq.IGNORE


def random_batch(B=5, T=12, V=17, seed=0):
    """Random Q_R, log pi1 and labels with random prompt lengths, response lengths and right padding."""
    g = torch.Generator().manual_seed(seed)
    q_r = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    logp1 = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3, -1)
    tokens = torch.randint(0, V, (B, T), generator=g)
    labels = torch.full((B, T), IGNORE)
    for b in range(B):
        prompt = int(torch.randint(1, T // 2, (1,), generator=g))
        length = int(torch.randint(1, T - prompt + 1, (1,), generator=g))
        labels[b, prompt:prompt + length] = tokens[b, prompt:prompt + length]
    return q_r, logp1, labels


def reward(q_r, logp1, labels, alpha0, alpha_tilde, gamma):
    """r2 from whole (B, T, V) tensors: Q_R at the actions and V at every state."""
    v = rq.soft_value(q_r, logp1, alpha0, alpha_tilde)
    return rq.derived_reward(rq.gather_actions(q_r, labels), v, labels, gamma)


def first_response_state(labels):
    """Index of s_0, the last prompt position: (B,)."""
    return (labels != IGNORE).int().argmax(-1) - 1


@pytest.mark.parametrize("alpha0,alpha_tilde", [(1.0, 1.0), (0.01, 1.0), (0.5, 2.0), (3.0, 0.7)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_return_telescopes_to_log_ratio_plus_initial_value(alpha0, alpha_tilde, seed):
    q_r, logp1, labels = random_batch(seed=seed)
    r2 = reward(q_r, logp1, labels, alpha0, alpha_tilde, gamma=1.0)
    R = rq.response_return(r2, labels)
    log_pi = rq.response_logprob(rq.customised_logits(q_r, logp1, alpha0, alpha_tilde), labels)
    log_pi1 = rq.response_logprob(logp1, labels)
    v = rq.soft_value(q_r, logp1, alpha0, alpha_tilde)
    v0 = v.gather(1, first_response_state(labels)[:, None]).squeeze(1)
    torch.testing.assert_close(R, alpha_tilde * log_pi - alpha0 * log_pi1 + v0, rtol=1e-10, atol=1e-10)


def test_alignment_on_a_hand_built_batch():
    # row 0: prompt [5, 6], response [7, 8, EOS=2], then padding; row 1: prompt [5], response [9, 2]
    # and two tokens after EOS that the data contract labels IGNORE (nothing after EOS is scored).
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8, 2, IGNORE, IGNORE],
                           [IGNORE, 9, 2, IGNORE, IGNORE, IGNORE, IGNORE]])
    actions, mask = rq.next_tokens(labels)
    # column t is the action taken in state t: the first response token (7) is scored from the
    # last prompt position (t = 1), not from its own position.
    assert mask.tolist() == [[False, True, True, True, False, False],
                             [True, True, False, False, False, False]]
    assert actions[0, 1:4].tolist() == [7, 8, 2] and actions[1, :2].tolist() == [9, 2]

    # Q_R(s_t, a) = 100·t + a and a flat soft value make every reward readable by hand.
    V = 10
    q_r = (100.0 * torch.arange(7)[:, None] + torch.arange(V)[None, :]).expand(2, 7, V).clone()
    logp1 = torch.zeros(2, 7, V)
    r2 = reward(q_r, logp1, labels, alpha0=0.0, alpha_tilde=1.0, gamma=0.5)
    v = rq.soft_value(q_r, logp1, 0.0, 1.0)  # (2, 7)
    expected0 = [0, 107 - 0.5 * v[0, 2], 208 - 0.5 * v[0, 3], 302 - 0.0, 0, 0]  # V = 0 after EOS
    expected1 = [9 - 0.5 * v[1, 1], 102 - 0.0, 0, 0, 0, 0]
    torch.testing.assert_close(r2, torch.tensor([expected0, expected1]))


def test_the_scored_window_gives_the_same_rewards_as_the_whole_sequence():
    q_r, logp1, labels = random_batch(seed=4)
    r2 = reward(q_r, logp1, labels, 0.5, 1.3, 0.9)
    index, window_labels = rq.scored_states(labels)
    pick = lambda x: x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
    r2_window = reward(pick(q_r), pick(logp1), window_labels, 0.5, 1.3, 0.9)
    torch.testing.assert_close(rq.response_return(r2_window, window_labels), rq.response_return(r2, labels))
    assert index.shape[1] == int((labels != IGNORE).sum(-1).max()) + 1
    _, mask = rq.next_tokens(labels)
    _, window_mask = rq.next_tokens(window_labels)
    torch.testing.assert_close(r2_window[window_mask], r2[mask])  # same rewards, same order


def test_zero_head_with_alpha0_equal_alpha_tilde_is_the_frozen_policy():
    _, logp1, _ = random_batch()
    for a in (0.3, 1.0, 2.5):
        logits = rq.customised_logits(torch.zeros_like(logp1), logp1, a, a)
        torch.testing.assert_close(torch.log_softmax(logits, -1), logp1, rtol=0, atol=1e-12)
        kl = rq.kl_divergence(rq.customised_logprobs(torch.zeros_like(logp1), logp1, a, a), logp1)
        assert kl.abs().max() < 1e-12


def test_kl_by_hand_and_positive_for_a_nonzero_head():
    p, q = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.25, 0.5, 0.25])
    expected = 0.5 * torch.log(torch.tensor(2.0)) + 0.25 * torch.log(torch.tensor(0.5))  # Σ p·log(p/q)
    torch.testing.assert_close(rq.kl_divergence(p.log(), q.log()), expected)
    q_r, logp1, _ = random_batch()
    assert (rq.kl_divergence(rq.customised_logprobs(q_r, logp1, 1.0, 1.0), logp1) > 0).all()


@pytest.mark.parametrize("alpha0,alpha_tilde", [(1.0, 1.0), (0.1, 0.1), (0.5, 2.0)])
def test_action_logprob_is_the_customised_policy_at_the_actions(alpha0, alpha_tilde):
    """(Q_R(s,a) + α0·log pi1(a|s) − V(s)) / α̃ is log_softmax of the customised logits, gathered."""
    q_r, logp1, labels = random_batch(seed=4)
    v = rq.soft_value(q_r, logp1, alpha0, alpha_tilde)
    ours = rq.action_logprob(rq.gather_actions(q_r, labels), rq.gather_actions(logp1, labels), v, labels,
                             alpha0, alpha_tilde)
    direct = rq.gather_actions(torch.log_softmax(rq.customised_logits(q_r, logp1, alpha0, alpha_tilde), -1), labels)
    torch.testing.assert_close(ours, direct, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.sum(-1), rq.response_logprob(rq.customised_logits(q_r, logp1, alpha0, alpha_tilde),
                                                                 labels), rtol=1e-10, atol=1e-10)


def test_chosen_nll_by_hand():
    # 2 pairs, chosen rows first: the chosen responses have 2 and 1 tokens; rejected rows are ignored.
    labels = torch.tensor([[IGNORE, 1, 1], [IGNORE, 1, IGNORE], [IGNORE, 1, IGNORE], [IGNORE, 1, 1]])
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -99.0], [-50.0, -99.0], [-50.0, -50.0]])
    torch.testing.assert_close(chosen_nll(logp, labels), torch.tensor((1.0 + 2.0 + 3.0) / 3))


def test_longer_wins_by_hand():
    """Pairs (5, 3) chosen longer, (2, 4) shorter, (3, 3) a tie: 1 + 0 + 0.5 of 3."""
    assert float(longer_wins(torch.tensor([5, 2, 3]), torch.tensor([3, 4, 3]))) == 0.5
    assert float(longer_wins([7, 1], [6, 1])) == 0.75  # lists too (evaluate.py counts tokens in Python)


def test_earlier_tokens_by_hand():
    # row 0: response 5 7 5 9; row 1: a prompt token 4 (not a candidate), then response 4 6 4, padded.
    labels = torch.tensor([[IGNORE, 5, 7, 5, 9], [IGNORE, IGNORE, 4, 6, 4]])
    expected = torch.tensor([[[0, 0, 0, 0],  # s_0 takes 5: nothing used yet
                              [1, 0, 0, 0],  # s_1 takes 7: 5 was used
                              [0, 1, 0, 0],  # s_2 takes 5 again: 7 is a candidate, 5 itself is not
                              [1, 1, 0, 0]],  # s_3 takes 9: 5 and 7, the second 5 not counted twice
                             [[0, 0, 0, 0],  # the prompt's state takes no response action
                              [0, 0, 0, 0],  # s_1 takes the first 4
                              [0, 1, 0, 0],  # s_2 takes 6: 4
                              [0, 0, 1, 0]]], dtype=torch.bool)  # s_3 takes 4 again: 6 only
    assert torch.equal(earlier_tokens(labels), expected)


def test_repetition_unlikelihood_by_hand():
    # 2 pairs, chosen rows first. Chosen row 0 takes 5 then 7: at s_1, 5 is a candidate with pi~ = 0.5.
    # Chosen row 1 has one token: no candidate. The rejected rows are not read (pi~ 0.9 there).
    labels = torch.tensor([[IGNORE, 5, 7], [IGNORE, 5, IGNORE], [IGNORE, 5, 7], [IGNORE, 5, 7]])
    logp = torch.full((4, 2, 2), -99.0)
    logp[0, 1, 0] = torch.tensor(0.5).log()
    logp[2:, 1, 0] = torch.tensor(0.9).log()
    torch.testing.assert_close(repetition_unlikelihood(logp, labels), torch.tensor(2.0).log() / 3)


def paper_loss(q_sa, labels, beta):
    """q_adapter_loss with V = 0 everywhere, so that r2 = Q_R(s_t, a_t) on the response: r2 by hand."""
    B2, T = labels.shape
    return q_adapter_loss(q_sa, torch.zeros(B2, T), torch.zeros_like(q_sa), labels, 1.0, 1.0, 1.0, beta)


def test_q_adapter_loss_by_hand():
    # 2 pairs; rewards chosen first. Pair 0: returns 3 vs 1; pair 1: returns 0 vs 2.
    labels = torch.tensor([[IGNORE, 1, 1], [IGNORE, 1, IGNORE], [IGNORE, 1, IGNORE], [IGNORE, 1, 1]])
    r2 = torch.tensor([[1.0, 2.0], [0.0, 99.0], [1.0, 99.0], [1.0, 1.0]])  # 99s are not scored
    loss, m = paper_loss(r2, labels, beta=0.0)
    margins = torch.tensor([2.0, -2.0])
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(margins).mean())
    assert m["rewards/accuracies"] == 0.5 and m["rewards/margins"] == 0.0
    assert m["rewards/chosen"] == 1.5 and m["rewards/rejected"] == 1.5
    loss_b, m_b = paper_loss(r2, labels, beta=0.1)
    chi2 = (1 + 4 + 0 + 1 + 1 + 1) / 6
    torch.testing.assert_close(loss_b, loss + 0.1 * chi2)
    torch.testing.assert_close(m_b["loss/chi2"], torch.tensor(chi2))
    assert "loss/nll" not in m_b and "loss/unlikelihood" not in m_b  # the paper's loss: no extra term


def whole_tensor_loss(q_r, logp1, labels, alpha0, alpha_tilde, gamma, beta, nll, unlikelihood):
    """The loss written from whole (2B, T, V) tensors, each term from its definition: r2 = Q_R(s_t,a_t)
    − γ·V(s_{t+1}); BT on R = Σ r2; the NLL and unlikelihood terms from log_softmax of π~'s logits."""
    v = rq.soft_value(q_r, logp1, alpha0, alpha_tilde)  # (2B, T)
    r2 = rq.derived_reward(rq.gather_actions(q_r, labels), v, labels, gamma)
    _, mask = rq.next_tokens(labels)
    chosen, rejected = rq.response_return(r2, labels).chunk(2)
    loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean() + beta * (r2 ** 2)[mask].mean()
    logp = torch.log_softmax(rq.customised_logits(q_r, logp1, alpha0, alpha_tilde), -1)[:, :-1]  # (2B, T-1, V)
    B = labels.shape[0] // 2
    loss = loss - nll * rq.gather_actions(torch.nn.functional.pad(logp, (0, 0, 0, 1)), labels)[:B][mask[:B]].mean()
    total = 0.0
    for b in range(B):  # −Σ_t Σ_{c used before t, c ≠ a_t} log(1 − π~(c|s_t)), each c once
        steps = mask[b].nonzero().flatten().tolist()
        for k, t in enumerate(steps):
            used = {int(labels[b, s + 1]) for s in steps[:k]} - {int(labels[b, t + 1])}
            total = total - sum(torch.log1p(-logp[b, t, c].exp().clamp(max=1 - 1e-6)) for c in used)  # p ≤ 1 − 1e-6
    return loss + unlikelihood * total / mask[:B].sum()


@pytest.mark.parametrize("nll,unlikelihood", [(0.0, 0.0), (1.0, 0.0), (0.5, 2.0)])
@pytest.mark.parametrize("alpha0,alpha_tilde,gamma,beta", [(0.1, 0.1, 1.0, 0.1), (0.6, 1.5, 0.9, 0.05)])
def test_q_adapter_loss_equals_the_loss_written_from_whole_tensors(alpha0, alpha_tilde, gamma, beta, nll,
                                                                    unlikelihood):
    """The one-screen loss, fed the per-token quantities, equals each term computed from its definition
    on (2B, T, V) tensors: values and gradients with respect to Q_R."""
    q_r, logp1, labels = random_batch(B=4, seed=6)
    q_r.requires_grad_(True)
    v = rq.soft_value(q_r, logp1, alpha0, alpha_tilde)
    logp = rq.customised_logprobs(q_r, logp1, alpha0, alpha_tilde)[:, :-1]  # (2B, T-1, V)
    actions, _ = rq.next_tokens(labels)
    every = logp.gather(-1, actions[:, None, :].expand(-1, actions.shape[1], -1))  # (2B, T-1, T-1)
    ours, metrics = q_adapter_loss(rq.gather_actions(q_r, labels), v, rq.gather_actions(logp1, labels), labels,
                                   alpha0, alpha_tilde, gamma, beta, nll, unlikelihood, every)
    (grad_ours,) = torch.autograd.grad(ours, q_r)
    theirs = whole_tensor_loss(q_r, logp1, labels, alpha0, alpha_tilde, gamma, beta, nll, unlikelihood)
    (grad_theirs,) = torch.autograd.grad(theirs, q_r)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-10, atol=1e-10)
    assert metrics["loss"] == ours.detach()


def test_with_alpha0_equal_alpha_tilde_the_bt_term_is_dpos_loss():
    """γ = 1, α0 = α̃ = β_DPO: R(y_w) − R(y_l) = β·(Δlog π~ − Δlog π1), so the BT term is DPO's loss of π~."""
    q_r, logp1, labels = random_batch(B=4, seed=7)
    labels = torch.full_like(labels, IGNORE)
    for row, length in enumerate([4, 9, 6, 2]):  # every prompt 3 tokens: each response starts at position 3
        labels[row, 3:3 + length] = torch.arange(length) % 5
    q_r[2:, 2], logp1[2:, 2] = q_r[:2, 2], logp1[:2, 2]  # a pair's two rows share the state s_0 (position 2)
    b = 0.1
    v = rq.soft_value(q_r, logp1, b, b)
    _, m = q_adapter_loss(rq.gather_actions(q_r, labels), v, rq.gather_actions(logp1, labels), labels, b, b, 1.0, 0.0)
    logp_y = rq.response_logprob(rq.customised_logits(q_r, logp1, b, b), labels)  # (2B,) log π~(y|x)
    logp1_y = rq.response_logprob(logp1, labels)  # (2B,) log π1(y|x)
    (pw, pl), (rw, rl) = logp_y.chunk(2), logp1_y.chunk(2)
    dpo = -torch.nn.functional.logsigmoid(b * ((pw - rw) - (pl - rl))).mean()
    torch.testing.assert_close(m["loss/bt"], dpo, rtol=1e-10, atol=1e-10)


def test_one_step_raises_the_margin():
    q_r, logp1, labels = random_batch(B=2, seed=3)
    q_r.requires_grad_(True)
    def margin():
        v = rq.soft_value(q_r, logp1, 0.5, 1.0)
        return q_adapter_loss(rq.gather_actions(q_r, labels), v, rq.gather_actions(logp1, labels), labels, 0.5, 1.0,
                              1.0, 0.1)
    loss, before = margin()
    loss.backward()
    with torch.no_grad():
        q_r -= 0.1 * q_r.grad
    _, after = margin()
    assert after["rewards/margins"] > before["rewards/margins"]
