"""explain.py: the per-token numbers are residual_q.py's, they add up to R, and the views show them."""
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import explain
import residual_q as rq
import train
from tests.conftest import separable_pairs, tiny_llama, write_jsonl
from tests.test_model_sample import adapter_for

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "Tell me about <tags> & rain."}]
ANSWERS = ["Rain is <b>water</b> & \"drops\".\n\n  Next line,\tindented.", "No."]


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A tiny random Llama with a nonzero head, and one batch of two answers to one prompt."""
    adapter = adapter_for(tiny_llama(tokenizer), zero=False)
    return adapter, explain.encode(tokenizer, PROMPT, ANSWERS, 128)


@torch.no_grad()
def by_hand(adapter, batch, alpha0, alpha_tilde, gamma):
    """The per-token numbers with the indices written out: response token p is action a_t of state t = p - 1."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    q_r, logp1, *_ = adapter(ids, mask)  # (B, T, V)
    v = rq.soft_value(q_r, logp1, alpha0, alpha_tilde)  # (B, T)
    logratio = torch.log_softmax(rq.customised_logits(q_r, logp1, alpha0, alpha_tilde), -1) - logp1
    rows = []
    for b in range(ids.shape[0]):
        tokens = []
        for p in (labels[b] != rq.IGNORE).nonzero().flatten().tolist():
            t, a = p - 1, int(ids[b, p])
            last = p + 1 == ids.shape[1] or labels[b, p + 1] == rq.IGNORE
            v_next = 0.0 if last else float(v[b, t + 1])
            q = float(q_r[b, t, a])
            tokens.append(dict(id=a, q=q, v_next=v_next, r2=q - gamma * v_next, logratio=float(logratio[b, t, a]),
                               up=int(logratio[b, t].argmax()), down=int(logratio[b, t].argmin())))
        rows.append(tokens)
    return rows


@pytest.mark.parametrize("alpha0, alpha_tilde, gamma", [(1.0, 1.0, 1.0), (0.6, 1.5, 1.0), (1.0, 1.0, 0.9)])
def test_per_token_numbers_are_the_residual_q_functions(tokenizer, tiny, alpha0, alpha_tilde, gamma):
    adapter, batch = tiny
    rows = explain.explain(adapter, tokenizer, batch, alpha0, alpha_tilde, gamma, top_k=3)
    expected = by_hand(adapter, batch, alpha0, alpha_tilde, gamma)
    with torch.no_grad():
        q_r, logp1, *_ = adapter(batch["input_ids"], batch["attention_mask"])
    v = rq.soft_value(q_r, logp1, alpha0, alpha_tilde)
    r2 = rq.derived_reward(rq.gather_actions(q_r, batch["labels"]), v, batch["labels"], gamma)  # (B, T-1)
    _, scored = rq.next_tokens(batch["labels"])
    for b, (row, want) in enumerate(zip(rows, expected)):
        assert len(row["tokens"]) == len(want) == int((batch["labels"][b] != rq.IGNORE).sum())
        got = {k: torch.tensor([t[k] for t in row["tokens"]]) for k in ("r2", "q", "v_next", "logratio")}
        for k in got:
            torch.testing.assert_close(got[k], torch.tensor([t[k] for t in want]), rtol=0, atol=1e-5)
        torch.testing.assert_close(got["r2"], r2[b][scored[b]], rtol=0, atol=1e-6)  # derived_reward itself
        assert [t["id"] for t in row["tokens"]] == [t["id"] for t in want]
        assert [t["raised"][0]["id"] for t in row["tokens"]] == [t["up"] for t in want]
        assert [t["lowered"][0]["id"] for t in row["tokens"]] == [t["down"] for t in want]
        assert all(len(t["raised"]) == len(t["lowered"]) == 3 for t in row["tokens"])
        assert all(t["raised"][0]["logratio"] >= t["raised"][-1]["logratio"] >= t["lowered"][-1]["logratio"]
                   >= t["lowered"][0]["logratio"] for t in row["tokens"])
        assert row["sum_r2"] == pytest.approx(row["return"], abs=1e-4)  # Σ r2 = R
        assert row["return"] == pytest.approx(float(rq.response_return(r2, batch["labels"])[b]), abs=1e-6)
        if gamma == 1:  # R = α̃·log pi~(y|x) − α0·log pi1(y|x) + V(s0)
            assert row["telescoped"] == pytest.approx(row["return"], abs=1e-4)
    assert "".join(t["text"] for t in rows[0]["tokens"]).startswith(ANSWERS[0])  # then the template's EOS


def test_a_response_cut_at_the_cutoff_ends_where_it_is_cut(tokenizer, tiny):
    adapter, _ = tiny
    batch = explain.encode(tokenizer, PROMPT, ANSWERS, 30)  # the first answer is cut, the second ("No.") is not
    assert batch["input_ids"][0, -1] != tokenizer.eos_token_id
    rows = explain.explain(adapter, tokenizer, batch, 0.6, 1.5, 1.0)
    assert rows[0]["tokens"][-1]["v_next"] == 0.0  # the cut answer's last state is terminal
    for row in rows:  # Σ r2 = R = α̃·log pi~(y|x) − α0·log pi1(y|x) + V(s_0)
        assert row["sum_r2"] == pytest.approx(row["return"], abs=1e-4)
        assert row["telescoped"] == pytest.approx(row["return"], abs=1e-4)


def test_min_p_lists_only_tokens_one_of_the_two_policies_would_pick(tokenizer, tiny):
    adapter, batch = tiny
    rows = explain.explain(adapter, tokenizer, batch, 1.0, 1.0, 1.0, top_k=50, min_p=1e-4)  # uniform: 2e-5
    tokens = [tok for row in rows for tok in row["tokens"]]
    for tok in tokens:
        assert all(max(x["p"], x["p1"]) >= 1e-4 * (1 - 1e-5) for x in tok["raised"] + tok["lowered"])
        assert all(x["logratio"] > 0 for x in tok["raised"]) and all(x["logratio"] < 0 for x in tok["lowered"])
    assert 0 < sum(len(tok["raised"]) for tok in tokens) < 50 * len(tokens)  # some listed, not all
    for tok in explain.explain(adapter, tokenizer, batch, 1.0, 1.0, 1.0, top_k=50, min_p=0.0)[0]["tokens"]:
        assert len(tok["raised"]) == len(tok["lowered"]) == 50  # the whole vocabulary


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_a_zero_head_with_alpha0_equal_to_alpha_tilde_rewards_nothing(tokenizer, alpha):
    """Q_R = 0 so r2 = −γ·V(s'), and V(s) = α̃·logsumexp(log pi1) = 0 when α0 = α̃: every r2 is 0, pi~ = pi1."""
    adapter = adapter_for(tiny_llama(tokenizer), zero=True)
    batch = explain.encode(tokenizer, PROMPT, ANSWERS, 128)
    for row in explain.explain(adapter, tokenizer, batch, alpha, alpha, 1.0):
        for tok in row["tokens"]:
            assert tok["q"] == 0.0
            assert tok["r2"] == pytest.approx(0.0, abs=1e-5) and tok["v_next"] == pytest.approx(0.0, abs=1e-5)
            assert tok["logratio"] == pytest.approx(0.0, abs=1e-5)
        assert row["return"] == pytest.approx(0.0, abs=1e-4) and row["telescoped"] == pytest.approx(0.0, abs=1e-4)
    # α0 ≠ α̃: still Q_R = 0, so r2 = −V(s_{t+1}), no longer 0
    for row in explain.explain(adapter, tokenizer, batch, 0.5, 1.0, 1.0):
        assert all(t["r2"] == pytest.approx(-t["v_next"], abs=1e-6) for t in row["tokens"])
        assert any(abs(t["r2"]) > 1e-3 for t in row["tokens"])


class Spans(HTMLParser):
    """The token spans of a page: (section index, attributes, text inside, the ↵ markers excluded)."""

    def __init__(self):
        super().__init__()
        self.spans, self.stack, self.section, self.external = [], [], -1, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "h2":
            self.section += 1
        if attrs.get("src") or (attrs.get("href") or "").startswith("http") or tag == "link":
            self.external.append((tag, attrs))
        if tag == "span":
            if attrs.get("class") == "t":
                self.spans.append([self.section, attrs, ""])
            self.stack.append(attrs.get("class"))

    def handle_endtag(self, tag):
        if tag == "span":
            self.stack.pop()

    def handle_data(self, text):
        if self.stack and self.stack[-1] == "t":
            self.spans[-1][2] += text


def test_the_html_page_holds_one_span_per_token_with_its_numbers(tokenizer, tiny):
    adapter, batch = tiny
    rows = explain.explain(adapter, tokenizer, batch, 1.0, 1.0, 1.0)
    page = explain.html_page(rows, ["chosen", "rejected"], PROMPT[0]["content"], "tiny <model>", 1.0, 1.0, 1.0)
    parser = Spans()
    parser.feed(page)
    parser.close()
    assert not parser.external and "<script src" not in page  # self-contained
    assert "<tags>" not in page and "&lt;tags&gt;" in page  # escaped
    for section, row in enumerate(rows):
        spans = [s for s in parser.spans if s[0] == section]
        assert len(spans) == len(row["tokens"])
        for (_, attrs, text), tok in zip(spans, row["tokens"]):
            assert text == tok["text"] == attrs["data-text"]  # whitespace and newlines kept as they are
            for key, attr in (("r2", "data-r2"), ("q", "data-q"), ("v_next", "data-v-next"), ("logratio", "data-logratio")):
                assert float(attrs[attr]) == pytest.approx(tok[key], abs=1e-6)
            assert [x["id"] for x in json.loads(attrs["data-raised"])] == [x["id"] for x in tok["raised"]]
            assert [x["id"] for x in json.loads(attrs["data-lowered"])] == [x["id"] for x in tok["lowered"]]
    assert "they agree" in page


def test_the_plain_terminal_view_shows_each_token_with_its_r2(tokenizer, tiny):
    adapter, batch = tiny
    row = explain.explain(adapter, tokenizer, batch, 1.0, 1.0, 1.0)[0]
    scale = max(abs(t["r2"]) for t in row["tokens"])
    plain = explain.terminal_text(row["tokens"], scale, color=False)
    assert "\x1b" not in plain and plain.count("[+") + plain.count("[-") == len(row["tokens"])
    assert plain.startswith(f"{row['tokens'][0]['text']}[{row['tokens'][0]['r2']:+.2f}]")
    coloured = explain.terminal_text(row["tokens"], scale, color=True)
    assert "\x1b[48;5;" in coloured and coloured.replace("\x1b[0m", "").count("\n") == plain.count("\n")


@pytest.fixture(scope="module")
def tiny_run(tiny_path, tmp_path_factory):
    """A tiny run directory written by train.py (two steps on a separable preference)."""
    d = tmp_path_factory.mktemp("explain-run")
    pairs = write_jsonl(d / "pairs.jsonl", separable_pairs(16))
    train.main(["--base-model", tiny_path, "--data", pairs, "--test-data", pairs, "--out-dir", str(d / "run"),
                "--head-width", "32", "--head-layers", "1", "--head-heads", "2", "--batch-size", "8", "--lr", "3e-3",
                "--cutoff", "64", "--samples", "0", "--eval-limit", "4", "--device", "cpu"])
    return d / "run", pairs


def test_the_script_runs_end_to_end_on_a_tiny_checkpoint(tiny_run, tmp_path):
    run, pairs = tiny_run
    cmd = [sys.executable, str(ROOT / "explain.py"), "--checkpoint", str(run), "--pairs", pairs, "--index", "3",
           "--html", str(tmp_path / "e.html"), "--json", str(tmp_path / "e.json"), "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\x1b" not in done.stdout and "(they agree)" in done.stdout and "=== rejected" in done.stdout
    result = json.loads((tmp_path / "e.json").read_text())
    assert [a["name"] for a in result["answers"]] == ["chosen", "rejected"]
    assert [a["text"] for a in result["answers"]] == ["Yes.", "No."]
    assert all(a["return"] == pytest.approx(a["telescoped"], abs=1e-4) for a in result["answers"])
    parser = Spans()
    parser.feed((tmp_path / "e.html").read_text())
    assert len(parser.spans) == sum(len(a["tokens"]) for a in result["answers"])


def test_answers_from_the_command_line_and_from_decoding(tiny_run, capsys):
    run, _ = tiny_run
    rows = explain.main(["--checkpoint", str(run), "--prompt", "Do you like tea?", "--answer", "Yes.", "--no-color",
                         "--device", "cpu"])
    assert len(rows) == 1 and "=== answer:" in capsys.readouterr().out
    rows = explain.main(["--checkpoint", str(run), "--prompt", "Do you like tea?", "--generate",
                         "--max-new-tokens", "4", "--top-k", "0", "--device", "cpu"])
    assert len(rows) == 2 and all(t["raised"] == [] for row in rows for t in row["tokens"])
    # a composition of the head with itself, and a γ other than 1 (no identity then)
    rows = explain.main(["--checkpoint", str(run), "--checkpoint", str(run), "--weights", "0.5", "0.5",
                         "--prompt", "Hi", "--answer", "Yes.", "--answer", "No.", "--gamma", "0.5", "--device", "cpu"])
    assert len(rows) == 2 and "γ = 1 only" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--pairs", "PAIRS", "--index", "99"], "--index 99"),
    (["--pairs", "PAIRS", "--answer", "x"], "exactly one of"),
    (["--prompt", "hi"], "exactly one of"),
    (["--pairs", "PAIRS", "--prompt", "hi"], "--prompt goes with"),
    (["--prompt", "hi", "--answer", "a", "--answer", "b", "--answer", "c"], "at most twice"),
    (["--pairs", "missing.jsonl"], "no such file"),
    (["--pairs", "PAIRS", "--top-k", "-1"], "--top-k"),
])
def test_bad_input_is_one_line_and_exit_code_2(tiny_run, flags, message, capsys):
    from support import cli
    run, pairs = tiny_run
    argv = ["--checkpoint", str(run), "--device", "cpu"] + [pairs if f == "PAIRS" else f for f in flags]
    with pytest.raises(SystemExit) as exit_:
        cli.run(explain.main, argv)
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and message in err[0]


def test_the_embedded_model_with_a_one_step_head(tmp_path):
    """The embedded SmolLM2 (skips where it is not installed): a head after one step, a held-out demo pair."""
    train_file, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train_file.write_text("".join((ROOT / "demo" / "child_train.jsonl").read_text().splitlines(keepends=True)[:2]))
    test.write_text((ROOT / "demo" / "child_test.jsonl").read_text().splitlines(keepends=True)[0])
    train.main(["--data", str(train_file), "--test-data", str(test), "--batch-size", "2", "--cutoff", "128",
                "--head-width", "32", "--head-layers", "1", "--head-heads", "2", "--samples", "0",
                "--out-dir", str(tmp_path / "run"), "--device", "cpu"])
    rows = explain.main(["--checkpoint", str(tmp_path / "run"), "--pairs", str(test), "--index", "0", "--cutoff", "128",
                         "--html", str(tmp_path / "e.html"), "--device", "cpu"])
    assert len(rows) == 2 and all(row["return"] == pytest.approx(row["telescoped"], abs=1e-3) for row in rows)
    assert all(len(row["tokens"]) > 10 for row in rows)
