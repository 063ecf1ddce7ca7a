"""On a CUDA GPU, in bfloat16 as train.py and sample.py run there: the fused training loss and head
gradient equal the plain path's, the fused decoding logits equal the plain ones, and greedy decoding
is Hugging Face's. The same checks run on the CPU elsewhere (test_fused_path.py, test_bf16.py); here
the frozen model's kernels are the GPU's. Skipped where torch sees no GPU (gpu/check.sh runs them).
At the end, on the CPU: the pieces of bench.py --random-model that gpu/check.sh measures with."""
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

import bench
import model as M
import train
from residual_q import IGNORE
from sample import generate, next_logits
from support.frozen_cache import FrozenCache
from tests.conftest import tiny_llama
from tests.test_fused_path import chain_adapter, path_loss, random_pairs
from tests.test_model_sample import PROMPTS, adapter_for, padded_batch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")

CUDA = "cuda"
FLAGS = ["--alpha0", "0.6", "--alpha-tilde", "1.5", "--gamma", "0.9", "--beta", "0.05"]


@pytest.fixture
def no_tf32():
    """float32 matrix products in float32 (torch's default), in case the machine turned TF32 on."""
    matmul = torch.backends.cuda.matmul
    before, matmul.allow_tf32 = matmul.allow_tf32, False
    yield
    matmul.allow_tf32 = before


def on_cuda(batch):
    return {k: v.to(CUDA) for k, v in batch.items()}


def max_abs(xs, ys):
    return max(float((x - y).abs().max()) for x, y in zip(xs, ys))


@needs_cuda
@pytest.mark.parametrize("stacked", [False, True])
def test_fused_loss_and_gradient_equal_the_plain_path_in_float32_on_cuda(tokenizer, stacked, no_tf32):
    """In float32 the two paths differ only in the order of float32 sums: as tight as on the CPU."""
    adapter = chain_adapter(tokenizer, stacked).to(CUDA)
    batch = on_cuda(random_pairs(tokenizer, 0)[0])
    plain_loss, plain_metrics, plain_grads = path_loss(adapter, batch, "plain", FLAGS)
    fused_loss, fused_metrics, fused_grads = path_loss(adapter, batch, "fused", FLAGS)
    assert plain_loss.device.type == CUDA
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-5)
    for k in plain_metrics:
        torch.testing.assert_close(fused_metrics[k], plain_metrics[k], rtol=1e-4, atol=1e-5, msg=k)
    assert max(float(g.abs().max()) for g in plain_grads) > 1e-4  # a real gradient, not zeros on both sides
    for g_fused, g_plain in zip(fused_grads, plain_grads):
        torch.testing.assert_close(g_fused, g_plain, rtol=1e-4, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("stacked", [False, True])
def test_fused_loss_and_gradient_equal_the_plain_path_in_bf16_on_cuda(tokenizer, stacked):
    """A bf16 frozen model on the GPU. The fused path runs the chosen and the rejected rows apart,
    each cut to its own length, so the GPU may pick other kernels than for the plain path's whole
    batch, and the bf16 hidden states may differ by a rounding. So: (1) fed the plain path's own
    hidden states, the fused path gives its loss and gradient to float32 rounding (everything after
    the frozen model is exact); (2) end to end, the two agree to what bf16 hidden states allow
    (a wrong index or term would miss by far more)."""
    adapter = chain_adapter(tokenizer, stacked, torch.bfloat16).to(CUDA)
    batch = on_cuda(random_pairs(tokenizer, 1)[0])
    plain_loss, plain_metrics, plain_grads = path_loss(adapter, batch, "plain", FLAGS)
    # (1) the same hidden states: the plain path's, through the frozen-output cache
    mask = batch["attention_mask"]
    hidden, _ = adapter.hidden(batch["input_ids"], mask, M.positions(mask))  # (2B, T, D), as the plain path runs it
    assert hidden.dtype == torch.bfloat16
    keys = list(range(len(batch["labels"]) // 2))
    cache = FrozenCache(1.0)
    cache.put([(k, side) for side in ("chosen", "rejected") for k in keys], hidden, mask)
    adapter.head.zero_grad(set_to_none=True)
    loss, metrics = train.batch_loss(adapter, batch, keys, cache, train.parse_args(["--path", "fused", *FLAGS]))
    loss.backward()
    grads = [p.grad.clone() for p in adapter.head.parameters() if p.requires_grad]
    torch.testing.assert_close(loss.detach(), plain_loss, rtol=1e-5, atol=1e-5)
    for k in plain_metrics:
        torch.testing.assert_close(metrics[k], plain_metrics[k], rtol=1e-4, atol=1e-5, msg=k)
    for g, g_plain in zip(grads, plain_grads):
        torch.testing.assert_close(g, g_plain, rtol=1e-4, atol=1e-5)
    # (2) end to end, each path running the frozen model its own way (the loss and the gradient: the
    # metrics include accuracies, which a rounding can flip)
    fused_loss, _, fused_grads = path_loss(adapter, batch, "fused", FLAGS)
    scale = max(float(g.abs().max()) for g in plain_grads)
    assert scale > 1e-4
    assert abs(float(fused_loss) - float(plain_loss)) <= 1e-2 * max(1.0, abs(float(plain_loss))), \
        (float(fused_loss), float(plain_loss))
    assert max_abs(fused_grads, plain_grads) <= 5e-2 * scale, (max_abs(fused_grads, plain_grads), scale)


@needs_cuda
@pytest.mark.parametrize("stacked", [False, True])
def test_fused_decoding_logits_equal_the_plain_ones_in_bf16_on_cuda(tokenizer, stacked):
    """sample.py's two paths step by step with their KV caches: both run the frozen model on the same
    tokens with the same shapes, so the same bf16 hidden states, then float32: the same next-token
    distribution, and the same greedy answers."""
    adapter = chain_adapter(tokenizer, stacked, torch.bfloat16).eval().to(CUDA)
    ids, mask = (x.to(CUDA) for x in padded_batch(tokenizer, "left"))
    pos = M.positions(mask)
    caches = {p: [DynamicCache(config=adapter.base.config), adapter.new_head_cache()] for p in ("plain", "fused")}
    split = ids.shape[1] - 3
    for t in range(split, ids.shape[1] + 1):
        lo = 0 if t == split else t - 1  # the prefill reads the prompt, each later step one token
        logp = {}
        for p, c in caches.items():
            logits, *caches[p] = next_logits(adapter, ids[:, lo:t], mask[:, :t], pos[:, lo:t], *c, 0.6, 1.5, p)
            assert logits.device.type == CUDA and logits.dtype == torch.float32
            logp[p] = torch.log_softmax(logits, -1)  # (B, V)
        torch.testing.assert_close(logp["fused"], logp["plain"], rtol=1e-4, atol=1e-4)
    kw = dict(alpha0=0.6, alpha_tilde=1.5, max_new_tokens=8)
    assert generate(adapter, tokenizer, PROMPTS, path="plain", **kw) == generate(adapter, tokenizer, PROMPTS, **kw)


@needs_cuda
def test_bf16_greedy_decoding_on_cuda_is_hugging_faces(tokenizer):
    """A zero head with α0 = α̃ is the frozen model: sample.generate's greedy answers (both paths) are
    Hugging Face generate's on the same GPU. Hugging Face's logits are bf16 and ours float32, so a
    step whose two best logits are within a bf16 rounding of each other may go either way: where
    the answers differ, that must be the reason."""
    base = tiny_llama(tokenizer).to(torch.bfloat16).to(CUDA)
    adapter = adapter_for(base).to(CUDA)
    ids, mask = (x.to(CUDA) for x in padded_batch(tokenizer, "left"))
    ref = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                        pad_token_id=tokenizer.pad_token_id, output_scores=True, return_dict_in_generate=True)
    ref_text = [tokenizer.decode(r[ids.shape[1]:], skip_special_tokens=True).strip() for r in ref.sequences]
    for path in ("fused", "plain"):
        ours = [a for a, _ in generate(adapter, tokenizer, PROMPTS, max_new_tokens=12, path=path)]
        for row, (a, b) in enumerate(zip(ours, ref_text)):
            if a == b:
                continue
            scores = torch.stack([s[row].float() for s in ref.scores])  # (steps, V) Hugging Face's logits
            top2 = scores.topk(2, dim=-1).values  # (steps, 2)
            gap = float((top2[:, 0] - top2[:, 1]).min())
            rounding = float(top2[:, 0].abs().max()) * 2 ** -7  # one bf16 rounding step at the largest logit
            assert gap <= rounding, (f"path {path}, prompt {row}: {a!r} != Hugging Face's {b!r}, and no step was "
                                     f"a near-tie (smallest gap between the two best logits {gap:.2e} > {rounding:.2e})")


# ------------------------------------------------------------------------------------------------
# bench.py --random-model, on the CPU: what gpu/check.sh's figures are built from


def test_the_random_shapes_are_the_real_models():
    """Built on the meta device (no memory): SmolLM2-135M's 134.5M parameters with tied embeddings,
    Llama-3.1-8B's 8.03B untied, in the dtype asked, with their RoPE bases for the head."""
    counts = {}
    for name, tied, theta in (("smollm2-135m", True, 1e5), ("llama-3.1-8b", False, 5e5)):
        m = bench.random_model(name, None, torch.device("meta"), torch.bfloat16)
        counts[name] = sum(p.numel() for p in m.parameters())
        assert m.config.tie_word_embeddings == tied and M.head_config_for(m).rope_theta == theta
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert counts == {"smollm2-135m": 134_515_008, "llama-3.1-8b": 8_030_261_248}
    assert bench.random_config("llama-3.1-8b", layers=2).num_hidden_layers == 2


def test_a_random_batch_is_data_collate_s_layout():
    batch = bench.random_batch(3, 64, 1000, 0, "cpu")
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape == (6, 64) and bool(mask.all())
    assert torch.equal(ids[:3, :4], ids[3:, :4]) and not torch.equal(ids[:3], ids[3:])  # a shared prompt of 64/16
    assert bool((labels[:, :4] == IGNORE).all()) and torch.equal(labels[:, 4:], ids[:, 4:])
    assert torch.equal(bench.random_batch(3, 64, 1000, 0, "cpu")["input_ids"], ids)  # seeded


def test_the_predicted_largest_batch_is_docs_speed_md_s():
    """docs/speed.md: 41 pairs x 512 on 24 GiB at head width 256, 22 at 1024 (Llama-3.1-8B, bf16)."""
    args = lambda width: SimpleNamespace(random_model="llama-3.1-8b", head_width=width, random_layers=None,  # noqa: E731
                                         dtype="auto")
    m = {"memory_cap_bytes": 24 * 2**30, "length": 512}
    assert bench.predicted_pairs(args(256), m) == 41 and bench.predicted_pairs(args(1024), m) == 22
    assert bench.predicted_pairs(SimpleNamespace(**{**vars(args(256)), "random_model": "smollm2-135m"}), m) is None


def test_decoding_random_token_ids_is_hugging_faces_greedy_decoding():
    """The prompts of the decode_hf figure are token ids (bench.TokenIds stands in for a tokenizer):
    sample.generate's greedy answers from the frozen model and Hugging Face generate's, in float32."""
    base = bench.random_model("smollm2-135m", 1, torch.device("cpu"), torch.float32)
    setup = SimpleNamespace(base=base, tok=bench.TokenIds(base.config), device=torch.device("cpu"))
    prompts = list(torch.randint(base.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(0)))
    adapter = M.QAdapter(base, M.QHead(M.head_config_for(base, 32, 1, 2)))
    ours = [a for a, _ in generate(adapter, setup.tok, prompts, max_new_tokens=5, frozen_only=True, stop_at_eos=False)]
    theirs = bench.hf_generate(setup, prompts, 5)
    assert ours == theirs and all(len(a.split()) == 5 for a in ours)
