"""A bf16 frozen model (what a GPU runs): the forward in bf16, every product with the vocabulary in
float32 (support/vocab_chunks.py), so V, r2, the loss and the head's gradient carry only the error
of the bf16 hidden states, nothing of their own. Runs on the CPU (torch has bf16 kernels there)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import model as M
import train
from sample import generate
from support import fused_path, vocab_chunks
from support.frozen_cache import FrozenCache
from tests.conftest import tiny_llama
from tests.test_fused_path import chain_adapter, path_loss, random_pairs
from tests.test_model_sample import PROMPTS, adapter_for, padded_batch

ALPHAS = (0.6, 1.5)  # α0, α̃: V is then a difference of two unequal log-sum-exps


def scored(adapter, batch, hidden):
    """(V, r2) of the batch's scored states, from given frozen hidden states (fused_path.fused_scores)."""
    from residual_q import derived_reward
    states, labels, actions, valid = fused_path.action_window(batch["labels"])
    q_sa, _, v, *_ = fused_path.fused_scores(adapter, batch["input_ids"], batch["attention_mask"], states, actions,
                                               valid, *ALPHAS, hidden=hidden)
    return v, derived_reward(q_sa[:, :-1], v, labels, 0.9)


def test_a_bf16_model_adds_no_error_after_its_hidden_states(tokenizer):
    """The bf16 model's own hidden states h and output layer W, then everything in float32, against
    the same h and W upcast and used by a float32 model: equal to float32 rounding."""
    base16 = tiny_llama(tokenizer).to(torch.bfloat16)
    head = adapter_for(base16, seed=3, zero=False).head
    a16, a32 = M.QAdapter(base16, head, alpha0=1.0, alpha_tilde=1.0), M.QAdapter(copy.deepcopy(base16).float(), head, alpha0=1.0, alpha_tilde=1.0)
    batch, _ = random_pairs(tokenizer, 0)
    h16, _ = a16.hidden(batch["input_ids"], batch["attention_mask"], M.positions(batch["attention_mask"]))
    assert h16.dtype == torch.bfloat16
    v16, r16 = scored(a16, batch, h16)
    v32, r32 = scored(a32, batch, h16.float())
    torch.testing.assert_close(v16, v32, rtol=0, atol=1e-5)
    torch.testing.assert_close(r16, r32, rtol=0, atol=1e-5)


@pytest.mark.parametrize("vocab_rows", [8192, 1500])  # W in one float32 block, and in four
def test_vocabulary_products_of_a_bf16_w_out_are_float32_exact(monkeypatch, vocab_rows):
    """At a real model's scale (logits of about ±10, |u| ≈ 5% of |h|), log Z1, V, the KL and the
    logits from a bf16 W_out equal float64 arithmetic on the same bf16 values to float32 rounding;
    products taken in bf16 (the logits rounded to bf16, as F.linear on bf16 tensors gives them)
    miss V by more than V's own size would allow."""
    monkeypatch.setattr(vocab_chunks, "VOCAB_ROWS", vocab_rows)
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(6000, 64, generator=g) * 0.4).to(torch.bfloat16)  # (V, D)
    h = torch.randn(40, 64, generator=g).to(torch.bfloat16).float()  # (N, D) bf16 hidden states, upcast
    u = 0.05 * torch.randn(40, 64, generator=g)  # (N, D) the head's correction
    a0, at = ALPHAS
    W64, h64, u64 = W.double(), h.double(), u.double()

    def value(lse, W, h, u):  # V(s) = α̃·lse(W·(u + α0·h)/α̃) − α0·lse(W·h)
        return at * lse(u + a0 * h, W, at) - a0 * lse(h, W, 1.0)
    exact = value(lambda x, W, t: torch.logsumexp(x @ W.T / t, -1), W64, h64, u64)
    ours = value(vocab_chunks.projected_logsumexp, W, h, u)
    in_bf16 = value(lambda x, W, t: torch.logsumexp(F.linear(x.to(W.dtype), W).float() / t, -1), W, h, u)
    assert (ours.double() - exact).abs().max() < 1e-4
    assert (in_bf16.double() - exact).abs().max() > 1e-2  # what the projection in bf16 did
    torch.testing.assert_close(vocab_chunks.project(h, W).double(), h64 @ W64.T, rtol=0, atol=1e-4)
    logp, logq = torch.log_softmax((u64 + h64) @ W64.T, -1), torch.log_softmax(h64 @ W64.T, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    torch.testing.assert_close(vocab_chunks.projected_kl(u + h, h, W).double(), kl, rtol=1e-3, atol=1e-6)
    x = (u + a0 * h).requires_grad_()
    (grad,) = torch.autograd.grad(vocab_chunks.projected_logsumexp(x, W, at).sum(), x)
    x64 = (u64 + a0 * h64).requires_grad_()
    (grad64,) = torch.autograd.grad(torch.logsumexp(x64 @ W64.T / at, -1).sum(), x64)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("vocab_rows", [8192, 20000])  # the tiny Llama's 49152 rows in 6 blocks, and in 3
def test_bf16_loss_and_head_gradient_within_what_bf16_hidden_states_cost(tokenizer, monkeypatch, vocab_rows):
    """The whole step in bf16 against float32 from the same weights. Tolerance: what the hidden
    states' rounding costs with exact arithmetic after them (the float32 model fed the bf16 model's
    h and W), plus float32 rounding. Fused equals plain in bf16 as in float32."""
    monkeypatch.setattr(vocab_chunks, "VOCAB_ROWS", vocab_rows)
    batch, _ = random_pairs(tokenizer, 1)
    flags = ["--alpha0", str(ALPHAS[0]), "--alpha-tilde", str(ALPHAS[1]), "--gamma", "0.9", "--beta", "0.05"]
    a32, a16 = chain_adapter(tokenizer, False), chain_adapter(tokenizer, False, torch.bfloat16)
    a16.head.load_state_dict(a32.head.state_dict())
    up = M.QAdapter(copy.deepcopy(a16.base).float(), a16.head, alpha0=1.0, alpha_tilde=1.0)  # bf16's weights, in float32
    loss32, _, grads32 = path_loss(a32, batch, "fused", flags)
    loss16, _, grads16 = path_loss(a16, batch, "fused", flags)
    plain16, _, plain_grads16 = path_loss(a16, batch, "plain", flags)
    torch.testing.assert_close(plain16, loss16, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads16, plain_grads16):
        torch.testing.assert_close(g, p, rtol=1e-4, atol=1e-6)
    # the float32 model on bf16's hidden states: what the hidden states cost, and nothing else
    mask = batch["attention_mask"]
    h16, _ = a16.hidden(batch["input_ids"], mask, M.positions(mask))
    keys = list(range(len(batch["labels"]) // 2))
    cache = FrozenCache(1.0)
    cache.put([(k, s) for s in ("chosen", "rejected") for k in keys], h16.float(), mask)
    args = train.parse_args(["--path", "fused", *flags])
    up.head.zero_grad(set_to_none=True)
    loss_up, _ = train.batch_loss(up, batch, keys, cache, args)  # (keys as pair_scores names them)
    loss_up.backward()
    grads_up = [p.grad.clone() for p in up.head.parameters() if p.requires_grad]
    assert abs(float(loss16) - float(loss_up)) <= 1e-5
    assert abs(float(loss16) - float(loss32)) <= abs(float(loss_up) - float(loss32)) + 1e-5
    for g16, gup, g32 in zip(grads16, grads_up, grads32):
        torch.testing.assert_close(g16, gup, rtol=1e-4, atol=1e-6)
        assert (g16 - g32).abs().max() <= (gup - g32).abs().max() * 1.01 + 1e-6


def test_bf16_greedy_decoding_is_hugging_faces(tokenizer):
    base = tiny_llama(tokenizer).to(torch.bfloat16)
    adapter = adapter_for(base)
    ids, mask = padded_batch(tokenizer, "left")
    ref = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                        pad_token_id=tokenizer.pad_token_id)
    ref_text = [tokenizer.decode(r[ids.shape[1]:], skip_special_tokens=True).strip() for r in ref]
    for path in ("fused", "plain"):
        assert [a for a, _ in generate(adapter, tokenizer, PROMPTS, max_new_tokens=12, path=path)] == ref_text
