"""The LoRA Q-head, LoRA on the frozen model's layers as in the paper's Q-adapter (model.LoraHead, --q-head lora):
Q_R = W_out·(h_lora − h) reproduces the frozen model at step 0, runs through both paths, decodes
with its own KV cache, trains, saves its LoRA weights alone, loads and resumes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

import model as M
import train
from residual_q import customised_logits
from sample import generate, next_logits
from support import cli, loading
from tests.conftest import separable_pairs, tiny_llama, write_jsonl
from tests.test_fused_path import path_loss, random_pairs
from tests.test_model_sample import PROMPTS, adapter_for, padded_batch

ROOT = Path(__file__).resolve().parents[1]


def lora_adapter(base, seed=1, zero=True, below=()):
    """A LoRA head (r = 8 on q_proj, v_proj) on base; zero=False gives its B matrices random values,
    a trained head's stand-in (peft starts them at zero)."""
    torch.manual_seed(seed)
    head = M.LoraHead(base, M.LoraHeadConfig(base.config.hidden_size))
    if not zero:
        for name, p in head.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.2)
    return M.QAdapter(base, head.eval(), below, alpha0=1.0, alpha_tilde=1.0)


def stacked_or_not(tokenizer, stacked):
    """A nonzero LoRA head on the frozen model, or on top of a nonzero small head."""
    base = tiny_llama(tokenizer)
    below = [(adapter_for(base, seed=4, zero=False).head, 0.7, 1.4)] if stacked else []
    return lora_adapter(base, seed=3, zero=False, below=below)


# ------------------------------------------------------------------------------------------------
# step 0: the frozen model exactly


def test_a_fresh_lora_head_is_the_frozen_model_and_leaves_it_untouched(tokenizer):
    base = tiny_llama(tokenizer)
    adapter = lora_adapter(base)
    trained = [n for n, p in adapter.head.named_parameters() if p.requires_grad]
    assert len(trained) == 2 * 2 * 2 and all("lora_" in n for n in trained)  # 2 layers × (q, v) × (A, B)
    assert not any("lora" in n for n, _ in base.named_modules())  # the frozen model has no adapter in it
    ids, mask = padded_batch(tokenizer, "right")
    q_r, logp1, *_ = adapter(ids, mask)
    assert q_r.abs().max() == 0  # Q_R ≡ 0 at step 0, exactly
    reference = torch.log_softmax(base(input_ids=ids, attention_mask=mask).logits.float(), -1)
    for alpha in (1.0, 0.5):
        custom = torch.log_softmax(customised_logits(q_r, logp1, alpha, alpha), -1)
        torch.testing.assert_close(custom[mask.bool()], reference[mask.bool()], rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", ["fused", "plain"])
def test_a_fresh_lora_head_decodes_what_hf_generate_does(tokenizer, path):
    base = tiny_llama(tokenizer)
    ids, mask = padded_batch(tokenizer, "left")
    ref = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                        pad_token_id=tokenizer.pad_token_id)
    ref_text = [tokenizer.decode(r[ids.shape[1]:], skip_special_tokens=True).strip() for r in ref]
    ours = generate(lora_adapter(base), tokenizer, PROMPTS, max_new_tokens=12, path=path)
    assert [a for a, _ in ours] == ref_text


# ------------------------------------------------------------------------------------------------
# the fused path and the plain one, and decoding with KV caches


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("flags", [[], ["--alpha0", "0.6", "--alpha-tilde", "1.5", "--gamma", "0.9", "--beta", "0.05"],
                                   ["--alpha0", "0.1", "--alpha-tilde", "0.1", "--nll", "1", "--unlikelihood", "0.5"]])
def test_fused_loss_and_lora_gradient_equal_the_plain_path(tokenizer, stacked, flags):
    adapter = stacked_or_not(tokenizer, stacked)
    adapter.head.train()
    batch, _ = random_pairs(tokenizer, 0)
    plain_loss, plain_metrics, plain_grads = path_loss(adapter, batch, "plain", flags)
    fused_loss, fused_metrics, fused_grads = path_loss(adapter, batch, "fused", flags)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    for k in plain_metrics:
        torch.testing.assert_close(fused_metrics[k], plain_metrics[k], rtol=1e-5, atol=1e-5, msg=k)
    assert len(plain_grads) == 8  # the LoRA weights, and only they
    assert max(float(g.abs().max()) for g in plain_grads) > 1e-4
    for g_fused, g_plain in zip(fused_grads, plain_grads):
        torch.testing.assert_close(g_fused, g_plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stacked", [False, True])
def test_decoding_is_the_same_on_both_paths_with_kv_caches(tokenizer, stacked):
    adapter = stacked_or_not(tokenizer, stacked)
    ids, mask = padded_batch(tokenizer, "left")
    pos = M.positions(mask)
    caches = {p: [DynamicCache(config=adapter.base.config), adapter.new_head_cache()] for p in ("plain", "fused")}
    split = ids.shape[1] - 3
    for t in range(split, ids.shape[1] + 1):
        lo = 0 if t == split else t - 1  # the prefill reads the prompt, each later step one token
        logp = {}
        for p, c in caches.items():
            logits, *caches[p] = next_logits(adapter, ids[:, lo:t], mask[:, :t], pos[:, lo:t], *c, 0.6, 1.5, p)
            logp[p] = torch.log_softmax(logits, -1)  # (B, V)
        torch.testing.assert_close(logp["fused"], logp["plain"], rtol=1e-4, atol=1e-5)
    assert isinstance(caches["fused"][1][0], DynamicCache)  # the adapter pass keeps its own cache
    assert caches["fused"][1][0] is not caches["fused"][0]
    kw = dict(alpha0=0.6, alpha_tilde=1.5, max_new_tokens=8)
    assert generate(adapter, tokenizer, PROMPTS, path="plain", **kw) == generate(adapter, tokenizer, PROMPTS, **kw)


def test_kv_cached_decoding_matches_a_full_forward(tokenizer):
    """Q_R and log pi1 token by token, the frozen pass and the adapter pass each with its cache,
    equal the full forward."""
    adapter = lora_adapter(tiny_llama(tokenizer), zero=False)
    ids, mask = padded_batch(tokenizer, "left")
    q_full, lp_full, *_ = adapter(ids, mask)
    assert q_full.abs().max() > 1e-2  # a nonzero Q_R
    split, pos = ids.shape[1] - 4, M.positions(mask)
    caches = DynamicCache(config=adapter.base.config), adapter.new_head_cache()
    steps_q, steps_lp = [], []
    for lo, hi in [(0, split)] + [(t, t + 1) for t in range(split, ids.shape[1])]:
        q, lp, *caches = adapter(ids[:, lo:hi], mask[:, :hi], position_ids=pos[:, lo:hi], base_cache=caches[0],
                                 head_cache=caches[1])
        steps_q.append(q)
        steps_lp.append(lp)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps_q, 1)[real], q_full[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(steps_lp, 1)[real], lp_full[real], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# train.py --q-head lora end to end, its checkpoint, --resume, and what is refused


@pytest.fixture(scope="module")
def separable(tmp_path_factory):
    d = tmp_path_factory.mktemp("separable-lora")
    return write_jsonl(d / "train.jsonl", separable_pairs(32)), write_jsonl(d / "test.jsonl", separable_pairs(8, 100))


def lora_args(tiny_path, separable, out_dir):
    train_file, test_file = separable
    return ["--q-head", "lora", "--base-model", tiny_path, "--data", train_file, "--test-data", test_file,
            "--out-dir", str(out_dir), "--batch-size", "8", "--lr", "1e-2", "--cutoff", "64", "--samples", "1",
            "--max-new-tokens", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def lora_run(tiny_path, separable, tmp_path_factory):
    """train.py --q-head lora, run as the script: 4 epochs of 4 steps."""
    out = tmp_path_factory.mktemp("lora-run") / "run"
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *lora_args(tiny_path, separable, out),
                           "--epochs", "4"], capture_output=True, text=True, cwd=out.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, done.stdout


def test_train_script_learns_with_a_lora_head_and_keeps_only_its_lora_weights(lora_run, tiny_path):
    out, stdout = lora_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval/rewards/accuracies"] >= 0.9 and summary["eval/rewards/margins"] > 0.5
    assert "LoRA r=8 on q_proj,v_proj" in stdout
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["q_head"] == "lora" and config["head"] == {"base_hidden": 64, "rank": 8, "alpha": 16.0,
                                                             "targets": ["q_proj", "v_proj"]}
    saved = load_file(out / "checkpoint" / "head.safetensors")
    assert len(saved) == 8 and all("lora_" in k for k in saved)  # no frozen weight is saved
    assert summary["head_parameters"] == sum(v.numel() for v in saved.values())
    adapter, _, _ = loading.load_adapter(out)  # rebuilt on its base
    assert isinstance(adapter.head, M.LoraHead)
    for k, v in adapter.head.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_sample_script_loads_a_lora_checkpoint(lora_run, tmp_path):
    out, _ = lora_run
    cmd = [sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(out), "--prompt", "Do you like cats?",
           "--max-new-tokens", "3", "--compare", "--out", str(tmp_path / "answers.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = json.loads((tmp_path / "answers.json").read_text())["answers"]
    assert set(answers[0]) == {"prompt", "customised", "finished", "frozen", "frozen_finished"}


def test_resume_of_a_lora_run_reproduces_the_uninterrupted_run(tiny_path, separable, tmp_path):
    full = train.main(lora_args(tiny_path, separable, tmp_path / "full") + ["--epochs", "2", "--samples", "0"])
    part = lora_args(tiny_path, separable, tmp_path / "part") + ["--epochs", "2", "--samples", "0"]
    train.main(part + ["--max-steps", "6"])  # stops inside the second epoch (4 steps an epoch)
    resumed = train.main(part + ["--resume"])
    a = load_file(tmp_path / "full" / "checkpoint" / "head.safetensors")
    b = load_file(tmp_path / "part" / "checkpoint" / "head.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert resumed["eval/rewards/margins"] == full["eval/rewards/margins"]
    with pytest.raises(SystemExit, match="was trained with --q-head lora, not small"):
        train.main(part + ["--q-head", "small", "--resume"])


def test_stacking_on_or_composing_a_lora_head_is_refused_in_one_line(lora_run, tiny_path, separable, tmp_path,
                                                                      capsys):
    out, _ = lora_run
    argv = lora_args(tiny_path, separable, tmp_path / "on-lora") + ["--q-head", "small", "--base-head", str(out)]
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "a LoRA head (--q-head lora) cannot be stacked on" in err[-1]
    with pytest.raises(SystemExit, match="composing a LoRA head"):
        loading.load_composition([out, out], [0.5, 0.5])


def test_lora_flags_are_checked(tokenizer, tiny_path, separable, tmp_path):
    with pytest.raises(SystemExit, match="--lora-rank must be >= 1"):
        train.parse_args(["--q-head", "lora", "--lora-rank", "0"])
    with pytest.raises(SystemExit, match="--device-map is not supported with --q-head lora"):
        train.parse_args(["--q-head", "lora", "--device-map", "auto"])
    args = train.parse_args(["--q-head", "lora", "--lora-modules", "q_proj,wq"])
    with pytest.raises(SystemExit, match=r"--lora-modules: no layer named \['wq'\]"):
        train.new_head(args, tiny_llama(tokenizer))


def test_each_head_gets_the_learning_rate_that_won_for_it_unless_one_is_given():
    """DSP academy (docs/results.md): lr 2e-4 for the small head, 1e-4 for the LoRA Q-head; an
    explicit --lr wins, and the baselines keep the small head's default."""
    import baselines
    assert train.parse_args([]).lr == 2e-4
    assert train.parse_args(["--q-head", "lora"]).lr == 1e-4
    assert train.parse_args(["--q-head", "lora", "--lr", "3e-4"]).lr == 3e-4
    assert baselines.parse_args(["--method", "dpo"]).lr == 2e-4


def test_bench_measures_the_lora_heads_training_step(tmp_path):
    """bench.py's train_step_lora figure: a LoRA Q-head step on a random-weight model, timed against
    the frozen forward, in the table and the JSON (its process runs bench.py --measure)."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--random-model", "smollm2-135m", "--random-layers", "1",
                           "--device", "cpu", "--dtype", "float32", "--batch-size", "1", "--cutoff", "32", "--repeats", "1",
                           "--skip", "train_step,train_step_kept,train_step_disk,official,decode,decode_hf,max_batch",
                           "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LoRA Q-head's step (--q-head lora)" in done.stdout
    lora = json.loads(out.read_text())["results"]["train_step_lora"]
    assert lora["time_s"] > 0 and lora["floor_s"] > 0 and lora["peak_bytes"] > 0
