"""The fast paths compute what the plain ones do: fused decoding logits, the chunked vocabulary
projection and its gradient, and frozen outputs kept in memory or on disk instead of recomputed."""
import pytest
import torch
from transformers import DynamicCache

import model as M
import train
from residual_q import customised_logits
from tests.conftest import tiny_llama
from tests.test_model_sample import adapter_for, padded_batch


@pytest.mark.parametrize("alpha0, alpha_tilde", [(1.0, 1.0), (0.3, 2.0)])
def test_fused_decoding_logits_equal_the_unfused_policy(tokenizer, alpha0, alpha_tilde):
    """W_out·(u + α0·h)/α̃ at each decoding step (prefill, then token by token with both KV caches)
    is the customised policy's (Q_R + α0·log pi1)/α̃ up to one constant per state: same softmax."""
    base = tiny_llama(tokenizer)
    adapter = adapter_for(base, zero=False)
    ids, mask = padded_batch(tokenizer, "left")
    q_r, logp1, *_ = adapter(ids, mask)
    reference = torch.log_softmax(customised_logits(q_r, logp1, alpha0, alpha_tilde), -1)  # (B, T, V)
    pos = M.positions(mask)
    caches = DynamicCache(config=base.config), adapter.new_head_cache()
    split = ids.shape[1] - 3
    for t in range(split, ids.shape[1] + 1):
        lo = 0 if t == split else t - 1  # the prefill reads the prompt, each later step one token
        logits, *caches = adapter.next_logits(ids[:, lo:t], mask[:, :t], pos[:, lo:t], *caches,
                                              alpha0=alpha0, alpha_tilde=alpha_tilde)  # (B, V)
        torch.testing.assert_close(torch.log_softmax(logits, -1), reference[:, t - 1], rtol=1e-4, atol=1e-4)


def test_fused_frozen_decoding_logits_are_hugging_faces(tokenizer):
    base = tiny_llama(tokenizer)
    adapter = adapter_for(base, zero=False)  # not run: no head cache means pi1 alone
    ids, mask = padded_batch(tokenizer, "left")
    logits, _, head_cache = adapter.next_logits(ids, mask, M.positions(mask), DynamicCache(config=base.config))
    assert head_cache is None
    torch.testing.assert_close(logits, base(input_ids=ids, attention_mask=mask).logits[:, -1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk", [M.LOGIT_CHUNK, 5 * 1000])  # one chunk, and chunks of a few states
def test_chunked_logsumexp_and_its_gradient_equal_autograd(monkeypatch, chunk):
    monkeypatch.setattr(M, "LOGIT_CHUNK", chunk)
    torch.manual_seed(0)
    weight = torch.randn(1000, 16)  # (V, D)
    x = torch.randn(23, 16, requires_grad=True)  # (N, D), 23 states: chunks of 5 and a rest of 3
    g = torch.randn(23)
    for tau in (1.0, 0.5):
        ours = M.projected_logsumexp(x, weight, tau)
        (grad_ours,) = torch.autograd.grad((ours * g).sum(), x)
        plain = torch.logsumexp(x @ weight.T / tau, dim=-1)
        (grad_plain,) = torch.autograd.grad((plain * g).sum(), x)
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_ours, grad_plain, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no gradient asked: the same values
        torch.testing.assert_close(M.projected_logsumexp(x, weight), torch.logsumexp(x @ weight.T, -1))


def one_batch(tokenizer):
    """3 pairs whose answers differ in length, so rows are padded differently."""
    import data
    answers = [("Yes.", "No, I do not think so at all."), ("Blue, mostly, on a clear day.", "Green."),
               ("Four.", "It is four, because two and two make four.")]
    pairs = [data.Pair([{"role": "user", "content": f"Question {i}?"}], c, r, f"row {i}")
             for i, (c, r) in enumerate(answers)]
    return data.collate([data.tokenize_pair(tokenizer, p, 64) for p in pairs], tokenizer.pad_token_id)


def loss_and_grads(adapter, batch, cache):
    adapter.head.zero_grad(set_to_none=True)
    loss, _ = train.batch_loss(adapter, batch, [0, 1, 2], cache, train.parse_args([]), "cpu")
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in adapter.head.parameters() if p.requires_grad]


@pytest.mark.parametrize("memory_gb, disk_gb", [(1.0, 0.0), (0.0, 1.0)])
def test_kept_frozen_outputs_are_bit_identical_to_recomputing(tokenizer, tmp_path, memory_gb, disk_gb):
    """The same batch with its frozen hidden states and log Z1 read back from memory or from the
    disk file gives exactly the loss and gradients that recomputing them gives."""
    adapter = adapter_for(tiny_llama(tokenizer), zero=False)
    batch = one_batch(tokenizer)
    recomputed = loss_and_grads(adapter, batch, train.FrozenCache(0))
    cache = train.FrozenCache(memory_gb, disk_gb, tmp_path)
    first = loss_and_grads(adapter, batch, cache)  # computes and keeps
    assert len(cache.store) == 6 and (cache.file is not None) == (disk_gb > 0)
    kept = loss_and_grads(adapter, batch, cache)  # reads back
    for a, b, c in zip(recomputed, first, kept):
        for x, y, z in zip(*(v if isinstance(v, list) else [v] for v in (a, b, c))):
            assert torch.equal(x, y) and torch.equal(x, z)


def test_disk_cache_keeps_any_dtype_exactly(tmp_path):
    cache = train.FrozenCache(0, 1, tmp_path)
    h = torch.randn(2, 7, 5).to(torch.bfloat16)  # (N, T, D), as a bf16 frozen model gives it
    z = torch.randn(2, 4)  # (N, W)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    labels = torch.tensor([[1, 2, 3, -100], [1, 2, -100, -100]])  # window labels: widths 4 and 3
    cache.put(["a", "b"], h, mask, z, labels)
    hidden, logz1 = cache.get(["a", "b"], mask, 4)
    assert hidden.dtype == torch.bfloat16 and torch.equal(hidden[0], h[0]) and torch.equal(hidden[1, :5], h[1, :5])
    assert torch.equal(logz1[0], z[0]) and torch.equal(logz1[1, :3], z[1, :3])
    assert cache.used == 0 and cache.disk_used > 0
    assert cache.get(["a", "c"], mask, 4) == (None, None)  # one row not kept: recompute the batch
