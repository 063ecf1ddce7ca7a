"""baselines.py: the SFT and DPO losses on hand-made tensors, the masks, the reference, and a tiny
end-to-end run of each method on a tiny random Llama."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import baselines
import data
from residual_q import IGNORE, response_logprob
from tests.conftest import separable_pairs, write_jsonl
from support import loading


def test_dpo_loss_by_hand():
    # pair 1: chosen gained 1 nat over the reference, rejected lost 1; pair 2: the other way round
    policy = torch.tensor([-1.0, -5.0, -3.0, -2.0])  # chosen 1, chosen 2, rejected 1, rejected 2
    ref = torch.tensor([-2.0, -4.0, -2.0, -3.0])
    loss, m = baselines.dpo_loss(policy, ref, beta=0.1)
    # margins β·((π_c − ref_c) − (π_r − ref_r)): 0.1·(1 − (−1)) = 0.2 and 0.1·(−1 − 1) = −0.2
    expected = -(F.logsigmoid(torch.tensor(0.2)) + F.logsigmoid(torch.tensor(-0.2))) / 2
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(m["rewards/chosen"], torch.tensor(0.0))  # (0.1 + −0.1) / 2
    torch.testing.assert_close(m["rewards/rejected"], torch.tensor(0.0))  # (−0.1 + 0.1) / 2
    torch.testing.assert_close(m["rewards/margins"], torch.tensor(0.0))
    assert float(m["rewards/accuracies"]) == 0.5


def test_dpo_loss_is_log2_when_policy_equals_reference_and_falls_with_the_margin():
    x = torch.tensor([-3.0, -7.0])
    loss, _ = baselines.dpo_loss(x, x, beta=0.5)
    assert math.isclose(float(loss), math.log(2), rel_tol=1e-6)
    better, _ = baselines.dpo_loss(torch.tensor([-2.0, -8.0]), x, beta=0.5)
    assert float(better) < math.log(2)
    # β scales the log-ratio: TRL's -logsigmoid(β·Δ)
    loss, _ = baselines.dpo_loss(torch.tensor([-2.0, -8.0]), x, beta=0.5)
    assert math.isclose(float(loss), -math.log(1 / (1 + math.exp(-0.5 * 2))), rel_tol=1e-6)


def test_sft_loss_is_the_mean_nll_of_the_masked_tokens():
    token_logps = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(baselines.sft_loss(token_logps, mask), torch.tensor(2.0))  # (1 + 2 + 3) / 3


def hand_batch(tokenizer):
    """Two pairs of different lengths, right-padded: prompt masked, first response token scored."""
    pairs = [data.Pair([{"role": "user", "content": "Hi?"}], "Yes.", "No, not at all.", "x"),
             data.Pair([{"role": "user", "content": "A longer question here?"}], "Sure thing.", "No.", "y")]
    return data.collate([data.tokenize_pair(tokenizer, p, 64) for p in pairs], tokenizer.pad_token_id)


def test_window_log_probs_equal_the_full_forward(tokenizer, tiny_path):
    """token_logprobs scores exactly the response tokens (first one included, nothing after EOS,
    no padding), the same as log_softmax over the whole sequence."""
    base, _ = loading.load_base(tiny_path)
    batch = hand_batch(tokenizer)
    logp, mask = baselines.token_logprobs(base, batch["input_ids"], batch["attention_mask"], batch["labels"])
    full = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (4, T, V)
    torch.testing.assert_close(logp.sum(-1), response_logprob(full, batch["labels"]), rtol=1e-5, atol=1e-5)
    response_tokens = (batch["labels"] != IGNORE).sum(-1)
    assert mask.sum(-1).tolist() == response_tokens.tolist()


def test_reference_is_the_base_with_the_adapter_disabled(tokenizer, tiny_path):
    """At init LoRA's B = 0: policy = reference, DPO loss = log 2. After a step the policy moves, the
    reference (adapter disabled) still gives the frozen base's log-probs, and the margin grows."""
    base, _ = loading.load_base(tiny_path)
    batch = hand_batch(tokenizer)
    frozen = response_logprob(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["labels"])
    args = baselines.parse_args(["--method", "dpo", "--base-model", tiny_path, "--lora-targets", "q_proj,v_proj"])
    peft_model = baselines.lora_model(base, args)
    loss, before = baselines.batch_loss(peft_model, batch, args, "cpu")
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-5)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    loss.backward()
    opt.step()
    _, after = baselines.batch_loss(peft_model, batch, args, "cpu")
    assert after["rewards/margins"] > before["rewards/margins"]
    lm = peft_model.get_base_model()
    with torch.no_grad(), peft_model.disable_adapter():
        ref = baselines.token_logprobs(lm, batch["input_ids"], batch["attention_mask"], batch["labels"])[0].sum(-1)
    with torch.no_grad():
        policy = baselines.token_logprobs(lm, batch["input_ids"], batch["attention_mask"], batch["labels"])[0].sum(-1)
    torch.testing.assert_close(ref, frozen, rtol=1e-5, atol=1e-5)
    assert (policy - ref).abs().max() > 1e-4


def lora_with_random_update(tiny_path, seed=0):
    """A DPO LoRA model on the tiny base whose B matrices are random (at init they are 0)."""
    base, _ = loading.load_base(tiny_path)
    args = baselines.parse_args(["--method", "dpo", "--base-model", tiny_path, "--lora-targets", "q_proj,v_proj"])
    peft_model = baselines.lora_model(base, args).eval()
    torch.manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return peft_model


def test_scaled_update_is_w_plus_s_times_the_lora_update(tiny_path):
    """Inside scaled_update(s) every LoRA layer computes x·(W + s·(α/r)·B·A)ᵀ, written here by hand;
    s = 0 is the frozen model, s = 1 the trained one, and the scale comes back on leaving."""
    from peft.tuners.lora import LoraLayer
    peft_model = lora_with_random_update(tiny_path)
    layer = next(m for m in peft_model.modules() if isinstance(m, LoraLayer))
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
    scaling = layer.lora_alpha["default"] / layer.r["default"]
    x = torch.randn(3, A.shape[1])
    with torch.no_grad():
        for s in (0.0, 0.5, 1.0, 2.0):
            with baselines.scaled_update(peft_model, s):
                out = layer(x)
            expected = x @ (layer.base_layer.weight + s * scaling * B @ A).T
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert layer.scaling["default"] == scaling
        ids = torch.tensor([[1, 5, 9, 14, 3]])
        with peft_model.disable_adapter():
            frozen = peft_model(input_ids=ids).logits
        with baselines.scaled_update(peft_model, 0.0):
            torch.testing.assert_close(peft_model(input_ids=ids).logits, frozen)
        trained = peft_model(input_ids=ids).logits
        with baselines.scaled_update(peft_model, 1.0):
            torch.testing.assert_close(peft_model(input_ids=ids).logits, trained)
        assert (trained - frozen).abs().max() > 1e-3


def test_sft_step_raises_the_likelihood_of_the_chosen_answers_only(tokenizer, tiny_path):
    base, _ = loading.load_base(tiny_path)
    batch = hand_batch(tokenizer)
    args = baselines.parse_args(["--method", "sft", "--base-model", tiny_path])
    peft_model = baselines.lora_model(base, args)
    loss, m = baselines.batch_loss(peft_model, batch, args, "cpu")
    assert set(m) == {"loss", "rewards/chosen"} and float(m["rewards/chosen"]) == 0.0
    chosen = batch["labels"][:2]
    n_tokens = int((chosen != IGNORE).sum())
    lm = peft_model.get_base_model()
    expected = -response_logprob(lm(input_ids=batch["input_ids"][:2],
                                    attention_mask=batch["attention_mask"][:2]).logits, chosen).sum() / n_tokens
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    loss.backward()
    opt.step()
    assert float(baselines.batch_loss(peft_model, batch, args, "cpu")[0]) < float(loss)


@pytest.fixture(scope="module")
def separable(tmp_path_factory):
    d = tmp_path_factory.mktemp("separable-baselines")
    return write_jsonl(d / "train.jsonl", separable_pairs(32)), write_jsonl(d / "test.jsonl", separable_pairs(8, 100))


def baseline_args(method, tiny_path, separable, out_dir, *extra):
    train_file, test_file = separable
    return ["--method", method, "--base-model", tiny_path, "--data", train_file, "--test-data", test_file,
            "--out-dir", str(out_dir), "--batch-size", "8", "--lr", "2e-2", "--cutoff", "64", "--samples", "1",
            "--max-new-tokens", "3", "--device", "cpu", "--lora-r", "4", *extra]


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_end_to_end_run_writes_a_checkpoint_evaluate_can_load(method, tiny_path, separable, tmp_path):
    out = tmp_path / method
    summary = baselines.main(baseline_args(method, tiny_path, separable, out, "--epochs", "3"))
    assert summary["steps"] == 12 and summary["method"] == method
    assert summary["eval/rewards/accuracies"] >= 0.9  # "Yes." over "No." is learnt by both
    assert summary["eval/kl"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "grad_norm" in r]
    assert [r["step"] for r in train_records] == list(range(1, 13))
    keys = {"loss", "rewards/chosen", "grad_norm", "lr"} | (
        {"rewards/rejected", "rewards/margins", "rewards/accuracies"} if method == "dpo" else set())
    assert keys <= set(train_records[0])
    assert sum("eval/kl" in r for r in records) == 3
    files = {p.name for p in (out / "checkpoint").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["method"] == method and config["base_model"] == tiny_path and config["dpo_beta"] == 0.1

    # the saved adapter reproduces the trained policy
    peft_model, tok, _ = baselines.load_checkpoint(out)
    args = baselines.parse_args(baseline_args(method, tiny_path, separable, tmp_path / "unused"))
    test_set = data.PairDataset(tok, data.load_pairs(separable[1]), 64)
    again = baselines.evaluate(peft_model, test_set, args, "cpu", lambda e: data.collate(e, tok.pad_token_id))
    assert math.isclose(again["eval/rewards/margins"], summary["eval/rewards/margins"], rel_tol=1e-4, abs_tol=1e-5)


def test_bad_flags_fail_in_one_line(tiny_path, separable, tmp_path):
    with pytest.raises(SystemExit, match="error: --lora-targets"):
        baselines.main(baseline_args("dpo", tiny_path, separable, tmp_path / "x", "--lora-targets", "nope_proj"))
    with pytest.raises(SystemExit, match="error: --dpo-beta"):
        baselines.parse_args(["--method", "dpo", "--dpo-beta", "0"])
    with pytest.raises(SystemExit, match="error: --resume"):
        baselines.parse_args(["--method", "sft", "--resume"])
    with pytest.raises(SystemExit, match="error: --unlikelihood is a term of train.py"):
        baselines.parse_args(["--method", "dpo", "--unlikelihood", "1"])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="already holds a run: --overwrite starts again"):
        baselines.main(baseline_args("dpo", tiny_path, separable, tmp_path / "old"))
    with pytest.raises(SystemExit, match="not a checkpoint written by baselines.py"):
        baselines.load_checkpoint(tmp_path)
