"""Several preferences: stacking a head on a customised policy, and composing heads with weights."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import model as M
import sample
import train
from residual_q import customised_logits
from tests.conftest import separable_pairs, tiny_llama, write_jsonl
from tests.test_evaluate import ARC_ROWS
from support import cli, fused_path, loading
from support.frozen_cache import FrozenCache

ROOT = Path(__file__).resolve().parents[1]


def random_head(base, seed):
    """A head with a nonzero output layer (a trained head's stand-in)."""
    torch.manual_seed(seed)
    head = M.QHead(M.head_config_for(base, 32, 1, 2))
    torch.nn.init.normal_(head.up.weight, std=0.5)
    return head.eval()


@pytest.fixture(scope="module")
def base(tokenizer):
    return tiny_llama(tokenizer)


def batch(tokenizer):
    enc = tokenizer(["The cat sat on the mat.", "Hi"], padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def log_policy(adapter, ids, mask, alpha0, alpha_tilde):
    out = adapter(ids, mask)  # (B, T, V) each
    return torch.log_softmax(customised_logits(out.q_r, out.logp1, alpha0, alpha_tilde), dim=-1)


def test_a_zero_head_on_a_chain_reproduces_the_chain(base, tokenizer):
    """pi~_ab with Q_R^b = 0 and α0_b = α̃_b is pi~_a exactly, in every path: the full forward, the
    training scores, and cached decoding."""
    ids, mask = batch(tokenizer)
    head_a = random_head(base, 1)
    a = M.QAdapter(base, head_a)
    want = log_policy(a, ids, mask, 0.8, 1.3)  # (B, T, V) log pi~_a
    zero = M.QHead(M.head_config_for(base, 32, 1, 2))
    ab = M.QAdapter(base, zero, below=[(head_a, 0.8, 1.3)])
    for alpha in (1.0, 0.5):
        got = log_policy(ab, ids, mask, alpha, alpha)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # log pi1 as the training loss sees it is log pi~_a
    states = torch.arange(ids.shape[1]).expand(2, -1)[:, :-1]
    actions = ids[:, 1:]
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    _, logp1_sa, *_ = fused_path.fused_scores(ab, ids, mask, states, actions, valid, 0.5, 0.5)
    expected = want[:, :-1].gather(-1, actions[..., None])[..., 0]
    torch.testing.assert_close(logp1_sa[valid], expected[valid], rtol=0, atol=1e-5)
    # decoding one token at a time with the caches of both heads gives the same distribution
    base_cache, head_cache = DynamicCache(config=base.config), ab.new_head_cache()
    row = ids[:1, :6]
    for t in range(row.shape[1]):
        logits, base_cache, head_cache = fused_path.next_logits(ab, row[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.long),
                                                        torch.tensor([[t]]), base_cache, head_cache, 0.5, 0.5)
        torch.testing.assert_close(torch.log_softmax(logits, -1), want[:1, t], rtol=0, atol=1e-4)


def test_weighted_heads_add_their_residual_q_functions(base, tokenizer):
    ids, mask = batch(tokenizer)
    h1, h2 = random_head(base, 1), random_head(base, 2)
    q = lambda head: M.QAdapter(base, head)(ids, mask).q_r  # noqa: E731
    q1, q2 = q(h1), q(h2)
    torch.testing.assert_close(q(M.WeightedHeads([h1, h2], [0.3, -1.5])), 0.3 * q1 - 1.5 * q2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q(M.WeightedHeads([h1, h2], [1.0, 0.0])), q1, rtol=0, atol=1e-6)


def test_composed_decoding_runs_the_frozen_model_once_per_step(base, tokenizer):
    """Three heads, one frozen forward per token; the cached decoding equals the full forward."""
    heads = M.WeightedHeads([random_head(base, s) for s in (1, 2, 3)], [0.5, 0.25, 1.0])
    adapter = M.QAdapter(base, heads, alpha0=1.0, alpha_tilde=1.0)
    calls = []
    hook = base.get_decoder().register_forward_hook(lambda *_: calls.append(1))
    try:
        answers = sample.generate(adapter, tokenizer, [[{"role": "user", "content": "Hi"}]], max_new_tokens=5,
                                  stop_at_eos=False)
    finally:
        hook.remove()
    assert len(calls) == 5 and len(answers) == 1
    ids, mask = batch(tokenizer)
    full = log_policy(adapter, ids[:1], mask[:1], 1.0, 1.0)
    caches = DynamicCache(config=base.config), adapter.new_head_cache()
    for t in range(4):
        logits, _, _ = fused_path.next_logits(adapter, ids[:1, t:t + 1], torch.ones(1, t + 1, dtype=torch.long),
                                           torch.tensor([[t]]), caches[0], caches[1], 1.0, 1.0)
        torch.testing.assert_close(torch.log_softmax(logits, -1), full[:, t], rtol=0, atol=1e-4)


def test_the_chains_log_ratio_to_the_base_model_equals_the_full_computation(base, tokenizer):
    """compose.base_log_ratio_margins (chunked, at the taken actions) is Σ_t log pi~_ab − log pi_base
    over each response, chosen minus rejected, computed here from the full (2B, T, V) tensors."""
    import compose
    import data
    from residual_q import next_tokens
    answers = [("Yes, gladly.", "No."), ("Blue.", "It is green, I think, mostly."), ("Four.", "Five or six.")]
    pairs = [data.Pair([{"role": "user", "content": f"Question {i}?"}], c, r, f"row {i}") for i, (c, r) in enumerate(answers)]
    examples = [data.tokenize_pair(tokenizer, p, 64) for p in pairs]
    collate = lambda e: data.collate(e, tokenizer.pad_token_id)  # noqa: E731
    ab = M.QAdapter(base, random_head(base, 2), below=[(random_head(base, 1), 0.8, 1.3)])
    margins = compose.base_log_ratio_margins(ab, examples, FrozenCache(1.0), (0.6, 1.2), 2, "cpu", collate)
    batch = collate(examples)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    log_pi = log_policy(ab, ids, mask, 0.6, 1.2)[:, :-1]  # (2B, T-1, V)
    log_base = torch.log_softmax(base(input_ids=ids, attention_mask=mask).logits.float(), -1)[:, :-1]
    actions, response = next_tokens(labels)  # (2B, T-1)
    ratio = ((log_pi - log_base).gather(-1, actions[..., None])[..., 0] * response).sum(-1)  # (2B,)
    chosen, rejected = ratio.chunk(2)
    torch.testing.assert_close(margins, chosen - rejected, rtol=1e-4, atol=1e-4)
    assert margins.abs().max() > 1e-2  # the heads move the policy: not trivially 0


# ------------------------------------------------------------------------------------------------
# the scripts: train.py --base-head, sample.py with a chain and with several heads


def run_args(tiny_path, data, out, *extra):
    return ["--base-model", tiny_path, "--data", data, "--test-data", "", "--out-dir", str(out),
            "--head-width", "32", "--head-layers", "1", "--head-heads", "2", "--batch-size", "4",
            "--cutoff", "64", "--samples", "0", "--device", "cpu", "--lr", "3e-3", *extra]


@pytest.fixture(scope="module")
def runs(tiny_path, tmp_path_factory):
    """Head a on the base; head b stacked on a; head c on the base (for composing with a)."""
    d = tmp_path_factory.mktemp("several")
    data = write_jsonl(d / "pairs.jsonl", separable_pairs(20))
    train.main(run_args(tiny_path, data, d / "a", "--epochs", "2"))
    train.main(run_args(tiny_path, data, d / "b", "--max-steps", "2", "--base-head", str(d / "a"), "--alpha0", "0.5"))
    train.main(run_args(tiny_path, data, d / "c", "--max-steps", "2", "--seed", "1"))
    return d, data


def test_a_stacked_checkpoint_names_its_chain_and_loads_it(runs):
    d, _ = runs
    config = json.loads((d / "b" / "checkpoint" / "config.json").read_text())
    assert [Path(c["path"]) for c in config["base_heads"]] == [(d / "a" / "checkpoint").resolve()]
    adapter, _, _ = loading.load_adapter(d / "b")
    a_config = json.loads((d / "a" / "checkpoint" / "config.json").read_text())
    assert len(adapter.below) == 1 and adapter.below_alphas == [(a_config["alpha0"], a_config["alpha_tilde"])]
    a, _, _ = loading.load_adapter(d / "a")
    torch.testing.assert_close(adapter.below[0].up.weight, a.head.up.weight, rtol=0, atol=0)


def test_sample_decodes_a_chain_and_a_composition(runs, tmp_path):
    d, _ = runs
    for flags in (["--checkpoint", str(d / "b")],
                  ["--checkpoint", str(d / "a"), "--checkpoint", str(d / "c"), "--weights", "0.5", "1.5"]):
        out = tmp_path / "answers.json"
        cli.run(sample.main, flags + ["--prompt", "Do you like tea?", "--max-new-tokens", "3", "--device", "cpu",
                                      "--out", str(out)])
        assert len(json.loads(out.read_text())["answers"]) == 1


def test_a_missing_or_changed_link_is_a_clear_error(runs, tmp_path, capsys):
    d, data = runs
    for name in ("a", "b"):
        shutil.copytree(d / name, tmp_path / name)
    config_path = tmp_path / "b" / "checkpoint" / "config.json"
    config = json.loads(config_path.read_text())
    config["base_heads"][0]["path"] = str((tmp_path / "a" / "checkpoint").resolve())
    config_path.write_text(json.dumps(config))
    loading.load_adapter(tmp_path / "b")  # the copy, pointed at the copied link, loads

    (tmp_path / "a" / "checkpoint" / "head.safetensors").write_bytes(
        (d / "c" / "checkpoint" / "head.safetensors").read_bytes())  # another head in its place
    with pytest.raises(SystemExit, match="which has changed since"):
        loading.load_adapter(tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    with pytest.raises(SystemExit, match="which is missing"):
        loading.load_adapter(tmp_path / "b")


def test_base_head_flags_must_name_the_real_chain(runs, tiny_path, tmp_path, capsys):
    d, data = runs
    # b was trained on a; naming c below b is wrong
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, run_args(tiny_path, data, tmp_path / "x", "--base-head", str(d / "c"),
                                     "--base-head", str(d / "b")))
    assert e.value.code == 2 and "was not trained on top of it at place 1" in capsys.readouterr().err
    # naming it right is accepted, and gives a chain of two
    train.main(run_args(tiny_path, data, tmp_path / "y", "--max-steps", "1", "--base-head", str(d / "a"),
                        "--base-head", str(d / "b")))
    config = json.loads((tmp_path / "y" / "checkpoint" / "config.json").read_text())
    assert len(config["base_heads"]) == 2
    assert len(loading.load_adapter(tmp_path / "y")[0].below) == 2


def test_composing_heads_of_different_bases_is_refused(runs, tokenizer, tmp_path, capsys):
    d, _ = runs
    other = tmp_path / "other"
    shutil.copytree(d / "c", other)
    config = json.loads((other / "checkpoint" / "config.json").read_text())
    (other / "checkpoint" / "config.json").write_text(json.dumps({**config, "base_model": "someone/else"}))
    with pytest.raises(SystemExit) as e:
        cli.run(sample.main, ["--checkpoint", str(d / "a"), "--checkpoint", str(other), "--prompt", "hi",
                              "--device", "cpu"])
    assert e.value.code == 2 and "trained on someone/else" in capsys.readouterr().err


def test_compose_sweep_script(runs, tmp_path):
    d, data = runs
    out = tmp_path / "sweep"
    arc = write_jsonl(tmp_path / "arc.jsonl", ARC_ROWS)
    done = subprocess.run([sys.executable, str(ROOT / "compose.py"), "--checkpoint", str(d / "a"), "--checkpoint",
                           str(d / "c"), "--steps", "3", "--out", str(out), "--device", "cpu", "--joint", str(d / "c"),
                           "--reference", str(d / "b"), "--arc-easy", arc, "--mc-limit", "1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads(out.with_suffix(".json").read_text())
    assert [r["weights"] for r in table["rows"]] == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    a_alone, c_alone = table["rows"][0], table["rows"][-1]
    summary_a = json.loads((d / "a" / "summary.json").read_text())
    # weight (1, 0) is head a alone: its held-out accuracy is the one train.py measured
    assert a_alone["a/accuracy"] == pytest.approx(summary_a["eval/rewards/accuracies"])
    assert a_alone["a/margin"] == pytest.approx(summary_a["eval/rewards/margins"], rel=1e-4)
    # one head on the base with α0 = α̃ = 1: its log-ratio to the base ranks as its return R does
    assert a_alone["a/logratio_accuracy"] == a_alone["a/accuracy"]
    assert c_alone["c/kl_to_joint"] == pytest.approx(0.0, abs=1e-6)  # (0, 1) is head c, here also "the joint head"
    assert a_alone["a/kl_to_joint"] > 1e-4
    assert set(table["references"]) == {"c (joint)", "b"}
    assert table["references"]["c (joint)"]["c/accuracy"] == c_alone["c/accuracy"]
    # b (stacked on a) was trained and evaluated by train.py on a's held-out pairs: the same numbers,
    # although the frozen outputs kept for the composed heads came first (b's log Z1 is pi~_a's)
    summary_b = json.loads((d / "b" / "summary.json").read_text())
    for column, key in (("a/margin", "eval/rewards/margins"), ("a/kl_to_frozen", "eval/kl")):
        assert table["references"]["b"][column] == pytest.approx(summary_b[key], rel=1e-4, abs=1e-6), column
    table_md = out.with_suffix(".md").read_text()
    assert "| weights |" in table_md and "| arc_easy/acc |" in table_md.splitlines()[0]
    # ARC-Easy through lm-eval (arc_easy_local), 1 of the 2 questions: under pi_w at each weight, the frozen model once
    assert all(r["arc_easy/acc"] in (0.0, 1.0) for r in table["rows"]) and table["frozen"]["arc_easy/acc"] in (0.0, 1.0)
    frozen_row = next(line for line in table_md.splitlines() if line.startswith("| frozen |"))
    assert frozen_row.split("|")[-2].strip() == f"{table['frozen']['arc_easy/acc']:.3f}"  # the last column


def test_compose_checks_the_arc_easy_file_up_front(tmp_path, capsys):
    """A missing or malformed --arc-easy file is one line naming it, before any model loads."""
    import compose
    flags = ["--checkpoint", "a", "--checkpoint", "c", "--arc-easy"]
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(ARC_ROWS[0]) + "\n{\"question\": \n")
    bad_row = write_jsonl(tmp_path / "row.jsonl", [ARC_ROWS[0], {**ARC_ROWS[1], "answerKey": "Z"}])
    for path, message in ((str(tmp_path / "missing.jsonl"), r"error: --arc-easy .*missing.jsonl: no such file"),
                          (str(bad_json), r"error: --arc-easy bad.jsonl:2: invalid JSON \("),
                          (bad_row, r"error: --arc-easy row.jsonl:2: not an ARC row"),
                          ("allenai/ai2_arc", r"error: --arc-easy allenai/ai2_arc: expected an ARC-Easy .jsonl file")):
        with pytest.raises(SystemExit) as e:
            cli.run(compose.main, flags + [path])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.splitlines()) == 1 and re.match(message, err), err
