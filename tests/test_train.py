"""train.py and sample.py end to end on a tiny random Llama, run as the real scripts."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import model as M
import train
from tests.conftest import separable_pairs, write_jsonl
from support import loading
from support.frozen_cache import FrozenCache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def separable(tmp_path_factory):
    d = tmp_path_factory.mktemp("separable")
    return write_jsonl(d / "train.jsonl", separable_pairs(32)), write_jsonl(d / "test.jsonl", separable_pairs(8, 100))


def common_args(tiny_path, separable, out_dir):
    train_file, test_file = separable
    return ["--base-model", tiny_path, "--data", train_file, "--test-data", test_file, "--out-dir", str(out_dir),
            "--head-width", "32", "--head-layers", "1", "--head-heads", "2", "--batch-size", "8",
            "--lr", "3e-3", "--cutoff", "64", "--samples", "1", "--max-new-tokens", "4", "--device", "cpu"]


def test_one_optimiser_step_raises_the_margin_of_a_pair(tokenizer, tiny_path, separable):
    import data
    base, _ = loading.load_base(tiny_path)
    head = M.QHead(M.head_config_for(base, 32, 1, 2))
    adapter = M.QAdapter(base, head)
    pair = data.load_pairs(separable[0])[:1]
    batch = data.collate([data.tokenize_pair(tokenizer, pair[0], 64)], tokenizer.pad_token_id)
    opt = torch.optim.AdamW(p for p in head.parameters() if p.requires_grad)

    def margin():
        return train.batch_loss(adapter, batch, [0], FrozenCache(0), train.parse_args([]))

    loss, before = margin()
    loss.backward()
    opt.step()
    assert margin()[1]["rewards/margins"] > before["rewards/margins"]


def test_train_script_learns_a_separable_preference_and_sample_loads_it(tiny_path, separable, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), *common_args(tiny_path, separable, out), "--epochs", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval/rewards/accuracies"] >= 0.9
    assert summary["eval/longer_wins_accuracy"] == 0.5  # "Yes." and "No." are one token each
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, summary["steps"] + 1))
    assert sum("eval/kl" in r for r in records) == 4  # one evaluation per epoch
    assert {p.name for p in (out / "checkpoint").iterdir()} == {"head.safetensors", "config.json", "trainer_state.pt"}
    assert "pairwise accuracy" in done.stdout

    cmd = [sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(out), "--prompt", "Do you like cats?",
           "--max-new-tokens", "3", "--compare", "--out", str(tmp_path / "answers.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = json.loads((tmp_path / "answers.json").read_text())["answers"]
    assert set(answers[0]) == {"prompt", "customised", "finished", "frozen", "frozen_finished"}


def test_a_loaded_checkpoint_decodes_at_its_own_alphas_unless_told(tiny_path, separable, tmp_path):
    """sample.generate defaults to the α0 and α̃ the head was trained with (not 1); the dial overrides
    both; an adapter built by hand carries none, and decoding with it then asks for them."""
    import sample
    out = tmp_path / "run"
    train.main(common_args(tiny_path, separable, out) + ["--samples", "0", "--alpha0", "0.3", "--alpha-tilde", "0.2"])
    adapter, tok, config = loading.load_policy(out)
    assert (adapter.alpha0, adapter.alpha_tilde) == (config["alpha0"], config["alpha_tilde"]) == (0.3, 0.2)
    prompt = [[{"role": "user", "content": "Do you like cats?"}]]
    assert sample.generate(adapter, tok, prompt, max_new_tokens=4) == \
        sample.generate(adapter, tok, prompt, alpha0=0.3, alpha_tilde=0.2, max_new_tokens=4)
    dialled, _, _ = loading.load_policy(out, alpha0=0.5)
    assert (dialled.alpha0, dialled.alpha_tilde) == (0.5, 0.5)
    by_hand = M.QAdapter(adapter.base, adapter.head)
    with pytest.raises(ValueError, match="pass alpha0 and alpha_tilde"):
        sample.generate(by_hand, tok, prompt, max_new_tokens=2)
    assert sample.generate(by_hand, tok, prompt, max_new_tokens=2, frozen_only=True)  # pi1 needs no α


def test_resume_reproduces_an_uninterrupted_run(tiny_path, separable, tmp_path):
    full = train.main(common_args(tiny_path, separable, tmp_path / "full") + ["--epochs", "2", "--samples", "0"])
    part = common_args(tiny_path, separable, tmp_path / "part") + ["--epochs", "2", "--samples", "0"]
    train.main(part + ["--max-steps", "6"])  # stops inside the second epoch (4 steps an epoch)
    resumed = train.main(part + ["--resume"])
    a = load_file(tmp_path / "full" / "checkpoint" / "head.safetensors")
    b = load_file(tmp_path / "part" / "checkpoint" / "head.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert resumed["eval/rewards/margins"] == full["eval/rewards/margins"]
    lines = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    # the training records match exactly (the interrupted run also evaluated where it stopped)
    steps = lambda rs: [{k: v for k, v in r.items() if k != "pairs_per_s"} for r in rs if "loss" in r]  # noqa: E731
    assert steps(lines("full")) == steps(lines("part"))


@pytest.mark.parametrize("flags", [[], ["--cutoff", "5", "--max-prompt", "3"]])
def test_kept_frozen_outputs_give_what_recomputing_gives(tiny_path, separable, tmp_path, flags):
    """Epoch 2 reads the frozen hidden states and log Z1 kept from epoch 1 (--cache-gb); with the
    cache off it recomputes them. The trained heads agree to float rounding, also with --cutoff 5,
    where every answer is cut ("Yes." and its EOS need 3 tokens, 2 are left)."""
    runs = {}
    for name, budget in (("kept", "4"), ("recomputed", "0")):
        args = common_args(tiny_path, separable, tmp_path / name) + ["--epochs", "2", "--samples", "0",
                                                                     "--cache-gb", budget, *flags]
        runs[name] = train.main(args)
    a = load_file(tmp_path / "kept" / "checkpoint" / "head.safetensors")
    b = load_file(tmp_path / "recomputed" / "checkpoint" / "head.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert abs(runs["kept"]["eval/rewards/margins"] - runs["recomputed"]["eval/rewards/margins"]) < 1e-3


def test_train_script_reads_hh_rlhf_transcripts(tiny_path, tmp_path):
    """Rows as Anthropic/hh-rlhf publishes them ({"chosen": str, "rejected": str}, whole transcripts),
    from a local file: the script reads them, counts the rows it cannot use, and trains a step."""
    def as_transcript(messages):
        return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)
    rows = [{side: as_transcript(row[side]) for side in ("chosen", "rejected")} for row in separable_pairs(12)]
    rows += [{"chosen": "\n\nHuman: Hi?\n\nHuman: Hi?\n\nAssistant: A",   # two Human turns: bad roles
              "rejected": "\n\nHuman: Hi?\n\nHuman: Hi?\n\nAssistant: B"},
             {"chosen": "\n\nHuman: Hi?\n\nAssistant:", "rejected": "\n\nHuman: Hi?\n\nAssistant: B"}]  # empty
    hh = write_jsonl(tmp_path / "hh.jsonl", rows)
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), *common_args(tiny_path, (hh, ""), out),
           "--data-dir", "harmless-base", "--max-steps", "1", "--samples", "0"]  # --data-dir: ignored, recorded
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "hh.jsonl: 14 rows, 12 pairs kept, skipped: bad roles 1, empty response 1\n" in done.stdout
    assert "10 training pairs, 2 test pairs" in done.stdout  # split by prompt, --test-fraction 0.2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["data_dir"] == "harmless-base"
