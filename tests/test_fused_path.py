"""The fast paths compute what the plain ones do: fused decoding logits, the chunked vocabulary
projection and its gradient, and frozen outputs kept in memory or on disk instead of recomputed."""
import pytest
import torch
from transformers import DynamicCache

import data
import model as M
import train
from bt_loss import earlier_tokens, repetition_unlikelihood
from residual_q import customised_logits
from tests.conftest import tiny_llama
from sample import generate
from tests.test_model_sample import PROMPTS, adapter_for, padded_batch
from support import fused_path, vocab_chunks
from support.frozen_cache import FrozenCache


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
        logits, *caches = fused_path.next_logits(adapter, ids[:, lo:t], mask[:, :t], pos[:, lo:t], *caches,
                                              alpha0=alpha0, alpha_tilde=alpha_tilde)  # (B, V)
        torch.testing.assert_close(torch.log_softmax(logits, -1), reference[:, t - 1], rtol=1e-4, atol=1e-4)


def test_fused_frozen_decoding_logits_are_hugging_faces(tokenizer):
    base = tiny_llama(tokenizer)
    adapter = adapter_for(base, zero=False)  # not run: no head cache means pi1 alone
    ids, mask = padded_batch(tokenizer, "left")
    logits, _, head_cache = fused_path.next_logits(adapter, ids, mask, M.positions(mask), DynamicCache(config=base.config),
                                                   None, 1.0, 1.0)
    assert head_cache is None
    torch.testing.assert_close(logits, base(input_ids=ids, attention_mask=mask).logits[:, -1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk", [vocab_chunks.LOGIT_CHUNK, 5 * 1000])  # one chunk, and chunks of a few states
def test_chunked_logsumexp_and_its_gradient_equal_autograd(monkeypatch, chunk):
    monkeypatch.setattr(vocab_chunks, "LOGIT_CHUNK", chunk)
    torch.manual_seed(0)
    weight = torch.randn(1000, 16)  # (V, D)
    x = torch.randn(23, 16, requires_grad=True)  # (N, D), 23 states: chunks of 5 and a rest of 3
    g = torch.randn(23)
    for tau in (1.0, 0.5):
        ours = vocab_chunks.projected_logsumexp(x, weight, tau)
        (grad_ours,) = torch.autograd.grad((ours * g).sum(), x)
        plain = torch.logsumexp(x @ weight.T / tau, dim=-1)
        (grad_plain,) = torch.autograd.grad((plain * g).sum(), x)
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_ours, grad_plain, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no gradient asked: the same values
        torch.testing.assert_close(vocab_chunks.projected_logsumexp(x, weight), torch.logsumexp(x @ weight.T, -1))


def three_pairs(tokenizer):
    """3 tokenised pairs whose answers differ in length, so rows are padded differently."""
    answers = [("Yes.", "No, I do not think so at all."), ("Blue, mostly, on a clear day.", "Green."),
               ("Four.", "It is four, because two and two make four.")]
    pairs = [data.Pair([{"role": "user", "content": f"Question {i}?"}], c, r, f"row {i}")
             for i, (c, r) in enumerate(answers)]
    return [data.tokenize_pair(tokenizer, p, 64) for p in pairs]


def one_batch(tokenizer):
    return data.collate(three_pairs(tokenizer), tokenizer.pad_token_id)


def loss_and_grads(adapter, batch, cache):
    adapter.head.zero_grad(set_to_none=True)
    loss, _ = train.batch_loss(adapter, batch, [0, 1, 2], cache, train.parse_args([]))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in adapter.head.parameters() if p.requires_grad]


@pytest.mark.parametrize("memory_gb, disk_gb", [(1.0, 0.0), (0.0, 1.0)])
def test_kept_frozen_outputs_are_bit_identical_to_recomputing(tokenizer, tmp_path, memory_gb, disk_gb):
    """The same batch with its frozen hidden states and log Z1 read back from memory or from the
    disk file gives exactly the loss and gradients that recomputing them gives."""
    adapter = adapter_for(tiny_llama(tokenizer), zero=False)
    batch = one_batch(tokenizer)
    recomputed = loss_and_grads(adapter, batch, FrozenCache(0))
    cache = FrozenCache(memory_gb, disk_gb, tmp_path)
    first = loss_and_grads(adapter, batch, cache)  # computes and keeps
    assert len(cache.store) == 6 and (cache.file is not None) == (disk_gb > 0)
    kept = loss_and_grads(adapter, batch, cache)  # reads back
    for a, b, c in zip(recomputed, first, kept):
        for x, y, z in zip(*(v if isinstance(v, list) else [v] for v in (a, b, c))):
            assert torch.equal(x, y) and torch.equal(x, z)


def test_disk_cache_keeps_any_dtype_exactly(tmp_path):
    cache = FrozenCache(0, 1, tmp_path)
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


@pytest.mark.parametrize("chunk", [vocab_chunks.LOGIT_CHUNK, 5 * 1000])
def test_chunked_kl_equals_the_full_one(monkeypatch, chunk):
    monkeypatch.setattr(vocab_chunks, "LOGIT_CHUNK", chunk)
    torch.manual_seed(0)
    weight, x_p, x_q = torch.randn(1000, 16), torch.randn(23, 16), torch.randn(23, 16)  # (V, D), (N, D) twice
    logp, logq = torch.log_softmax(x_p @ weight.T, -1), torch.log_softmax(x_q @ weight.T, -1)  # (N, V)
    torch.testing.assert_close(vocab_chunks.projected_kl(x_p, x_q, weight), (logp.exp() * (logp - logq)).sum(-1),
                               rtol=1e-5, atol=1e-6)
    assert vocab_chunks.projected_kl(x_p, x_p, weight).abs().max() < 1e-6


def full_tensor_evaluation(adapter, batch, args):
    """The held-out metrics the plain way: Q_R and log pi1 over the whole vocabulary, (2B, W, V)."""
    from bt_loss import q_adapter_loss
    from residual_q import (customised_logprobs, gather_actions, kl_divergence, next_tokens, response_logprob,
                            scored_states, soft_value)
    states, labels = scored_states(batch["labels"])  # (2B, W)
    q_r, logp1, *_ = adapter(batch["input_ids"], batch["attention_mask"], states)  # (2B, W, V)
    v = soft_value(q_r, logp1, args.alpha0, args.alpha_tilde)
    _, metrics = q_adapter_loss(gather_actions(q_r, labels), v, gather_actions(logp1, labels), labels, args.alpha0,
                                args.alpha_tilde, args.gamma, args.beta)
    _, mask = next_tokens(labels)  # (2B, W-1)
    kl = kl_divergence(customised_logprobs(q_r, logp1, args.alpha0, args.alpha_tilde), logp1)[:, :-1]
    chosen, rejected = response_logprob(logp1, labels).chunk(2)
    len_chosen, len_rejected = mask.sum(-1).chunk(2)
    metrics["frozen_logp_accuracy"] = (chosen > rejected).float().mean()
    metrics["longer_wins_accuracy"] = ((len_chosen > len_rejected).float() + 0.5 * (len_chosen == len_rejected)).mean()
    out = {f"eval/{k}": float(x) for k, x in metrics.items()}
    out["eval/kl"] = float((kl * mask).sum() / mask.sum())
    return out


@pytest.mark.parametrize("stacked", [False, True])
def test_evaluation_without_vocabulary_tensors_equals_the_full_computation(tokenizer, stacked):
    """train.evaluate reads Q_R, log pi1 and V at the taken actions (fused_path.fused_scores) and the KL a
    chunk of states at a time: the same numbers as the (2B, W, V) tensors give, also for a head
    stacked on another (whose log Z1 is the policy below's, not the base model's)."""
    base = tiny_llama(tokenizer)
    adapter = adapter_for(base, seed=3, zero=False)
    if stacked:
        adapter = M.QAdapter(base, adapter.head, below=[(adapter_for(base, seed=4, zero=False).head, 0.7, 1.4)])
    batch = one_batch(tokenizer)
    args = train.parse_args(["--alpha0", "0.6", "--alpha-tilde", "1.5", "--gamma", "0.9", "--beta", "0.05",
                             "--batch-size", "3"])
    examples = three_pairs(tokenizer)
    collate = lambda e: data.collate(e, tokenizer.pad_token_id)  # noqa: E731
    cache = FrozenCache(1.0)
    want = full_tensor_evaluation(adapter, collate(examples), args)
    for _ in range(2):  # computed, then read back from the cache
        got = train.evaluate(adapter, examples, cache, args, "cpu", collate)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), k
    assert want["eval/kl"] > 1e-3  # the head moved the policy: the KL is not trivially 0



# ------------------------------------------------------------------------------------------------
# the default path (fused) equals the plain one (model.QAdapter.forward + residual_q.py), values and gradients

WORDS = "the a cat sat on mat sun rain blue green four two why because river stone light day night".split()


def random_pairs(tokenizer, seed, n=4, cutoff=40):
    """n pairs of random answers of random lengths: rows padded differently, and with cutoff 40 some
    responses cut before their EOS (a truncated response, whose last state is terminal)."""
    g = torch.Generator().manual_seed(seed)
    say = lambda k: " ".join(WORDS[i] for i in torch.randint(len(WORDS), (k,), generator=g).tolist())  # noqa: E731
    lengths = torch.randint(1, 30, (n, 2), generator=g).tolist()
    pairs = [data.Pair([{"role": "user", "content": f"Q{i}: {say(3)}?"}], say(a), say(b), f"row {i}")
             for i, (a, b) in enumerate(lengths)]
    examples = [data.tokenize_pair(tokenizer, p, cutoff) for p in pairs]
    return data.collate(examples, tokenizer.pad_token_id), examples


def path_loss(adapter, batch, path, flags):
    adapter.head.zero_grad(set_to_none=True)
    loss, metrics = train.batch_loss(adapter, batch, list(range(len(batch["labels"]) // 2)), FrozenCache(0),
                                     train.parse_args(["--path", path, *flags]))
    loss.backward()
    return loss.detach(), metrics, [p.grad.clone() for p in adapter.head.parameters() if p.requires_grad]


def chain_adapter(tokenizer, stacked, dtype=torch.float32):
    base = tiny_llama(tokenizer).to(dtype)
    adapter = adapter_for(base, seed=3, zero=False)
    adapter.head.train()
    if stacked:
        adapter = M.QAdapter(base, adapter.head, below=[(adapter_for(base, seed=4, zero=False).head, 0.7, 1.4)])
    return adapter


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("flags", [[], ["--alpha0", "0.6", "--alpha-tilde", "1.5", "--gamma", "0.9", "--beta", "0.05"],
                                   ["--alpha0", "0.1", "--alpha-tilde", "0.1", "--nll", "0.5"],
                                   ["--alpha0", "0.3", "--alpha-tilde", "0.2", "--unlikelihood", "0.7"],
                                   ["--alpha0", "0.6", "--alpha-tilde", "1.5", "--gamma", "0.9", "--nll", "1",
                                    "--unlikelihood", "0.5"]])
def test_fused_loss_and_gradient_equal_the_plain_path(tokenizer, seed, stacked, flags):
    adapter = chain_adapter(tokenizer, stacked)
    batch, examples = random_pairs(tokenizer, seed)
    eos = tokenizer.eos_token_id
    assert any(e["chosen_ids"][-1] != eos or e["rejected_ids"][-1] != eos for e in examples)  # a response is cut
    assert batch["attention_mask"].sum(-1).unique().numel() > 2  # rows of several lengths: padding
    plain_loss, plain_metrics, plain_grads = path_loss(adapter, batch, "plain", flags)
    fused_loss, fused_metrics, fused_grads = path_loss(adapter, batch, "fused", flags)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    for k in plain_metrics:
        torch.testing.assert_close(fused_metrics[k], plain_metrics[k], rtol=1e-5, atol=1e-5, msg=k)
    assert max(float(g.abs().max()) for g in plain_grads) > 1e-4  # a real gradient, not zeros on both sides
    for g_fused, g_plain in zip(fused_grads, plain_grads):
        torch.testing.assert_close(g_fused, g_plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path", ["plain", "fused"])
def test_unlikelihood_adds_its_weight_times_its_term(tokenizer, path):
    """--unlikelihood w adds w·(its metric) to the loss; on these pairs the term is not zero (chosen
    answers repeat words), so the equality test above compares a live term on both paths."""
    adapter = chain_adapter(tokenizer, stacked=False)
    batch, _ = random_pairs(tokenizer, 0)
    assert earlier_tokens(batch["labels"]).chunk(2)[0].any()
    flags = ["--alpha0", "0.3", "--alpha-tilde", "0.2"]
    without = path_loss(adapter, batch, path, flags)[0]
    with_ul, metrics, _ = path_loss(adapter, batch, path, [*flags, "--unlikelihood", "0.7"])
    assert float(metrics["loss/unlikelihood"]) > 0
    torch.testing.assert_close(with_ul, without + 0.7 * metrics["loss/unlikelihood"])


def test_unlikelihood_term_and_its_gradient_equal_on_both_paths(tokenizer):
    """The term alone (in the loss above it is small next to the BT loss): fused_path's log pi~(a_j|s_t),
    dot products on the window, gives what the plain path's full log-softmax gives, value and gradient."""
    adapter = chain_adapter(tokenizer, stacked=False)
    batch, _ = random_pairs(tokenizer, 1)
    got = {}
    for path in ("plain", "fused"):
        adapter.head.zero_grad(set_to_none=True)
        args = train.parse_args(["--path", path, "--alpha0", "0.3", "--alpha-tilde", "0.2"])
        s = train.scores(adapter, batch, list(range(len(batch["labels"]) // 2)), FrozenCache(0), args, every_action=True)
        term = repetition_unlikelihood(s.logp_every, s.labels)
        term.backward()
        got[path] = term.detach(), [p.grad.clone() for p in adapter.head.parameters() if p.requires_grad]
    assert float(got["plain"][0]) > 0
    torch.testing.assert_close(got["fused"][0], got["plain"][0], rtol=1e-5, atol=1e-9)
    assert max(float(g.abs().max()) for g in got["plain"][1]) > 0
    for g_fused, g_plain in zip(got["fused"][1], got["plain"][1]):
        torch.testing.assert_close(g_fused, g_plain, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("stacked", [False, True])
def test_evaluation_is_the_same_on_both_paths(tokenizer, stacked):
    adapter = chain_adapter(tokenizer, stacked)
    _, examples = random_pairs(tokenizer, 2)
    collate = lambda e: data.collate(e, tokenizer.pad_token_id)  # noqa: E731
    flags = ["--alpha0", "0.6", "--alpha-tilde", "1.5", "--gamma", "0.9", "--batch-size", "2"]
    plain = train.evaluate(adapter, examples, FrozenCache(0), train.parse_args(["--path", "plain", *flags]), "cpu", collate)
    fused = train.evaluate(adapter, examples, FrozenCache(0), train.parse_args(flags), "cpu", collate)
    assert plain.keys() == fused.keys()
    for k in plain:
        assert fused[k] == pytest.approx(plain[k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("stacked", [False, True])
def test_fused_decoding_equals_the_plain_customised_logits(tokenizer, stacked):
    """sample.py's two paths, step by step with their KV caches: the same next-token distribution,
    and the same greedy answers."""
    from sample import next_logits
    adapter = chain_adapter(tokenizer, stacked).eval()
    ids, mask = padded_batch(tokenizer, "left")
    pos = M.positions(mask)
    caches = {p: [DynamicCache(config=adapter.base.config), adapter.new_head_cache()] for p in ("plain", "fused")}
    split = ids.shape[1] - 3
    for t in range(split, ids.shape[1] + 1):
        lo = 0 if t == split else t - 1
        logp = {}
        for p, c in caches.items():
            logits, *caches[p] = next_logits(adapter, ids[:, lo:t], mask[:, :t], pos[:, lo:t], *c, 0.6, 1.5, p)
            logp[p] = torch.log_softmax(logits, -1)  # (B, V)
        torch.testing.assert_close(logp["fused"], logp["plain"], rtol=1e-4, atol=1e-5)
    kw = dict(alpha0=0.6, alpha_tilde=1.5, max_new_tokens=8)
    assert generate(adapter, tokenizer, PROMPTS, path="plain", **kw) == generate(adapter, tokenizer, PROMPTS, **kw)


# ------------------------------------------------------------------------------------------------
# guards where a change would silently break the math


def test_projected_logsumexp_refuses_what_its_gradient_does_not_cover():
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="W must not require grad"):
        vocab_chunks.projected_logsumexp(x, torch.randn(10, 4, requires_grad=True))
    with pytest.raises(TypeError, match="τ must be a Python number"):
        vocab_chunks.projected_logsumexp(x, torch.randn(10, 4), torch.tensor(0.5))


def test_the_scored_window_refuses_a_response_that_is_not_one_run():
    from residual_q import scored_states
    labels = torch.tensor([[-100, 5, 6, -100, -100], [-100, 5, -100, 7, -100]])  # row 1: a hole in the response
    with pytest.raises(ValueError, match="not one contiguous run"):
        scored_states(labels)
    scored_states(labels[:1])  # one run: fine
