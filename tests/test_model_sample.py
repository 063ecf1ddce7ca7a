"""The frozen model, the head, and decoding: a zero head reproduces Hugging Face exactly."""
import pytest
import torch
from transformers import DynamicCache

import model as M
from residual_q import customised_logits
from sample import generate, pick_next
from tests.conftest import tiny_llama
from support import fused_path, loading

PROMPTS = [[{"role": "user", "content": "Hello there, how are you today?"}],
           [{"role": "user", "content": "Name a colour."}],
           [{"role": "user", "content": "What is two plus two, and why is that so?"}]]


def adapter_for(base, seed=1, zero=True):
    torch.manual_seed(seed)
    head = M.QHead(M.head_config_for(base, width=32, layers=1, heads=2))
    if not zero:
        torch.nn.init.normal_(head.up.weight, std=0.5)
    return M.QAdapter(base, head.eval(), alpha0=1.0, alpha_tilde=1.0)


def padded_batch(tokenizer, side):
    tokenizer.padding_side = side
    enc = tokenizer.apply_chat_template(PROMPTS, add_generation_prompt=True, padding=True,
                                        return_tensors="pt", return_dict=True)
    return enc["input_ids"], enc["attention_mask"]


def test_frozen_and_head_at_init(tokenizer):
    base = tiny_llama(tokenizer)
    adapter = adapter_for(base)
    assert not any(p.requires_grad for p in base.parameters())
    assert all(p.requires_grad for p in adapter.head.up.parameters())
    ids, mask = padded_batch(tokenizer, "right")
    q_r, logp1, *_ = adapter(ids, mask)
    assert q_r.shape == logp1.shape == (3, ids.shape[1], len(tokenizer))
    assert q_r.abs().max() == 0  # Q_R ≡ 0 at step 0


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_zero_head_reproduces_the_frozen_model(tokenizer, alpha):
    base = tiny_llama(tokenizer)
    adapter = adapter_for(base)
    ids, mask = padded_batch(tokenizer, "right")
    q_r, logp1, *_ = adapter(ids, mask)
    reference = torch.log_softmax(base(input_ids=ids, attention_mask=mask).logits.float(), -1)
    custom = torch.log_softmax(customised_logits(q_r, logp1, alpha, alpha), -1)
    real = mask.bool()
    torch.testing.assert_close(custom[real], reference[real], rtol=0, atol=1e-5)


def test_zero_head_greedy_matches_hf_generate(tokenizer):
    base = tiny_llama(tokenizer)
    adapter = adapter_for(base)
    ids, mask = padded_batch(tokenizer, "left")
    ref = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                        pad_token_id=tokenizer.pad_token_id)
    ref_text = [tokenizer.decode(r[ids.shape[1]:], skip_special_tokens=True).strip() for r in ref]
    ours = generate(adapter, tokenizer, PROMPTS, max_new_tokens=12)
    assert [a for a, _ in ours] == ref_text


def test_kv_cached_decoding_matches_a_full_forward(tokenizer):
    """A nonzero head: Q_R and log pi1 computed token by token with both caches equal the full pass."""
    base = tiny_llama(tokenizer)
    adapter = adapter_for(base, zero=False)
    ids, mask = padded_batch(tokenizer, "left")
    q_full, lp_full, *_ = adapter(ids, mask)
    split = ids.shape[1] - 4
    pos = M.positions(mask)
    caches = DynamicCache(config=base.config), adapter.new_head_cache()
    q0, lp0, *caches = adapter(ids[:, :split], mask[:, :split], position_ids=pos[:, :split],
                                  base_cache=caches[0], head_cache=caches[1])
    steps_q, steps_lp = [q0], [lp0]
    for t in range(split, ids.shape[1]):
        q, lp, *caches = adapter(ids[:, t:t + 1], mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                                    base_cache=caches[0], head_cache=caches[1])
        steps_q.append(q)
        steps_lp.append(lp)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps_q, 1)[real], q_full[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(steps_lp, 1)[real], lp_full[real], rtol=1e-4, atol=1e-4)


def test_saved_head_loads_identically(tokenizer, tmp_path, tiny_path):
    base, _ = loading.load_base(tiny_path)
    adapter = adapter_for(base, zero=False)
    loading.save_adapter(tmp_path, adapter.head, {"base_model": tiny_path, "alpha0": 1.0, "alpha_tilde": 1.0})
    loaded, _, config = loading.load_adapter(tmp_path)
    ids, mask = padded_batch(tokenizer, "right")
    torch.testing.assert_close(loaded(ids, mask)[0], adapter(ids, mask)[0])
    assert config["base_model"] == tiny_path


def test_top_k_and_top_p_keep_only_the_likeliest_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    drawn = {int(pick_next(logits, 1.0, 2, 1.0, g)) for _ in range(200)}
    assert drawn == {0, 1}
    drawn = {int(pick_next(logits, 1.0, 0, 0.7, g)) for _ in range(200)}
    assert drawn == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 ≥ 0.7
    assert int(pick_next(logits, 0.0, 0, 1.0, g)) == 0


def test_embedded_model_zero_head_greedy_matches_hf(tokenizer):
    base, tok = loading.load_base()
    adapter = adapter_for(base)
    ids, mask = padded_batch(tok, "left")
    ref = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                        pad_token_id=tok.pad_token_id)
    ref_text = [tok.decode(r[ids.shape[1]:], skip_special_tokens=True).strip() for r in ref]
    assert [a for a, _ in generate(adapter, tok, PROMPTS, max_new_tokens=16)] == ref_text


def test_fused_scores_equal_the_residual_q_functions_on_whole_tensors(tokenizer):
    """fused_path.fused_scores (one combined projection) gives the same Q_R(s,a), log pi1(a|s) and V(s)."""
    import residual_q as rq
    base = tiny_llama(tokenizer)
    adapter = adapter_for(base, zero=False)
    ids, mask = padded_batch(tokenizer, "right")
    labels = ids.masked_fill(mask == 0, rq.IGNORE)
    labels[:, :4] = rq.IGNORE  # a 4-token prompt
    states, window_labels = rq.scored_states(labels)
    actions, _ = rq.next_tokens(window_labels)
    actions = torch.cat([actions, torch.zeros_like(actions[:, :1])], 1)  # the last state takes none
    for alpha0, alpha_tilde in [(1.0, 1.0), (0.3, 2.0)]:
        valid = torch.cat([window_labels[:, :1] == rq.IGNORE, window_labels[:, 1:] != rq.IGNORE], 1)
        q_sa, logp1_sa, v, *_ = fused_path.fused_scores(adapter, ids, mask, states, actions, valid, alpha0, alpha_tilde)
        q_r, logp1, *_ = adapter(ids, mask, states)
        _, m = rq.next_tokens(window_labels)
        torch.testing.assert_close(q_sa[:, :-1][m], rq.gather_actions(q_r, window_labels)[m], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logp1_sa[:, :-1][m], rq.gather_actions(logp1, window_labels)[m], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v[valid], rq.soft_value(q_r, logp1, alpha0, alpha_tilde)[valid], rtol=1e-4, atol=1e-4)
