"""judge.py: the style classifier that judges answers without the model being judged."""
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer

import data
import judge
from data import Pair

REAL_DSP = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "dsp" / "dsp_academy_pairs.jsonl"

TOPICS = ["rain", "volcanoes", "bread", "tides", "magnets", "bees", "glaciers", "rust", "comets", "coral",
          "wind", "salt", "thunder", "moss", "caves", "owls"]


def formal(topic):
    return (f"In summary, the available evidence indicates that {topic} can be understood through established "
            f"principles. Furthermore, the literature suggests several mechanisms; consequently, {topic} "
            f"remains a subject of careful study.")


def pirate(topic):
    return f"Arr matey! {topic.capitalize()} be a grand thing, ye scallywag! Yo ho, hoist the sails and mind the {topic}!"


def pirate_other(topic):
    return f"Ahoy! Shiver me timbers, {topic} be wild, says I! Arr, ye landlubber, {topic} be fun!"


def tiny_pairs(topics):
    """Two clearly different styles: formal prose is chosen over two pirate voices."""
    return [Pair([{"role": "user", "content": f"Tell me about {t}."}], formal(t), other(t), f"tiny:{i}")
            for i, t in enumerate(topics) for other in (pirate, pirate_other)]


@pytest.fixture(scope="module")
def tiny_judge():
    return judge.fit(tiny_pairs(TOPICS[:12]), min_df=1)


def test_tiny_styles_are_told_apart_on_held_out_topics(tiny_judge):
    held_out = TOPICS[12:]
    in_style = tiny_judge.prob([formal(t) for t in held_out])
    other = tiny_judge.prob([pirate(t) for t in held_out] + [pirate_other(t) for t in held_out])
    assert min(in_style) > 0.5 > max(other)
    result = judge.held_out(tiny_judge, tiny_pairs(held_out))
    assert result["pairwise_accuracy"] == 1.0 and result["per_answer_accuracy"] == 1.0
    assert result["answers"] == 3 * len(held_out)  # each formal answer once, though it is in 2 pairs
    assert tiny_judge.adherence([formal("sand"), pirate("sand")]) == pytest.approx(
        {"adherence": 0.5, "mean_prob": np.mean(tiny_judge.prob([formal("sand"), pirate("sand")])), "n": 2})
    assert tiny_judge.adherence([]) == {"adherence": 0.0, "mean_prob": 0.0, "n": 0}


def test_answers_are_deduplicated_and_fit_is_deterministic():
    texts, labels = judge.labelled_answers(tiny_pairs(TOPICS[:3]))
    assert len(texts) == 9 and sum(labels) == 3
    a, b = judge.fit(tiny_pairs(TOPICS[:12]), min_df=1), judge.fit(tiny_pairs(TOPICS[:12]), min_df=1)
    assert a.to_dict() == b.to_dict()


def test_features_are_sklearns_tfidf(tiny_judge):
    """The judge rebuilds TF-IDF from its stored arrays; it must match sklearn's own transform."""
    train, _ = judge.labelled_answers(tiny_pairs(TOPICS[:12]))
    queries = [formal("sand"), pirate("sand"), "Nothing in common at all."]
    expected = []
    for params in (judge.WORDS, judge.CHARS):
        vec = TfidfVectorizer(analyzer=params["analyzer"], ngram_range=tuple(params["ngram_range"]),
                              lowercase=params["lowercase"], min_df=1, max_features=None if params is judge.WORDS
                              else 50000, sublinear_tf=True).fit(train)
        expected.append(vec.transform(queries))
    np.testing.assert_allclose(tiny_judge._features(queries).toarray(), sp.hstack(expected).toarray(), atol=1e-12)


def test_save_and_load_give_identical_probabilities(tiny_judge, tmp_path):
    texts = [formal("sand"), pirate("sand"), pirate_other("clouds"), "A plain answer."]
    tiny_judge.save(tmp_path / "judge.json")
    saved = (tmp_path / "judge.json").read_text()
    assert json.loads(saved)["format"] == judge.FORMAT  # JSON, nothing pickled
    loaded = judge.Judge.load(tmp_path / "judge.json")
    assert loaded.prob(texts) == tiny_judge.prob(texts)


def test_a_file_that_is_not_a_judge_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(SystemExit, match="not a saved judge"):
        judge.Judge.load(bad)
    with pytest.raises(SystemExit, match="cannot read"):
        judge.Judge.load(tmp_path / "missing.json")


def test_read_answers(tmp_path):
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(["one", "two"]))
    assert judge.read_answers(strings) == {"answers": ["one", "two"]}
    sampled = tmp_path / "sampled.json"  # sample.py --compare --out
    sampled.write_text(json.dumps({"alpha0": 1, "answers": [{"prompt": [], "customised": "a", "frozen": "b"},
                                                            {"prompt": [], "customised": "c", "frozen": "d"}]}))
    assert judge.read_answers(sampled) == {"customised": ["a", "c"], "frozen": ["b", "d"]}
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"answers": 3}))
    with pytest.raises(SystemExit, match="expected a JSON list of strings"):
        judge.read_answers(wrong)


def test_cli_fits_caches_and_scores(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QADAPTER_CACHE", str(tmp_path / "cache"))
    rows = [{"chosen": [p.prompt[0], {"role": "assistant", "content": p.chosen}],
             "rejected": [p.prompt[0], {"role": "assistant", "content": p.rejected}]} for p in tiny_pairs(TOPICS)]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps([formal("sand"), pirate("sand")]))
    args = ["--data", str(pairs_file), "--min-df", "1", "--test-fraction", "0.25", "--score", str(answers),
            "--out", str(tmp_path / "out.json")]
    judge.main(args)
    assert "fitted on" in capsys.readouterr().out
    judge.main(args)
    assert "loaded from" in capsys.readouterr().out  # the second run reads the cached arrays
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["held_out"]["pairwise_accuracy"] == 1.0
    assert out["score"]["answers"]["adherence"] == 0.5
    with pytest.raises(SystemExit) as bad:
        judge.main(["--data", str(pairs_file), "--threshold", "2"])
    assert "--threshold must be in (0, 1)" in str(bad.value.code)


@pytest.mark.skipif(not REAL_DSP.exists(), reason=f"needs the DSP data at {REAL_DSP} (../shared/data beside the repo)")
def test_real_dsp_academy_held_out_accuracy():
    """Fitted on train.py's training queries only; measured on the held-out ones (about 0.77 pairwise)."""
    pairs = data.load_pairs(str(REAL_DSP))
    train, test = data.split_by_prompt(pairs, 0.2, 0)
    assert not {judge._key(p) for p in train} & {judge._key(p) for p in test}
    result = judge.held_out(judge.fit(train), test)
    assert result["queries"] == 132
    assert result["pairwise_accuracy"] > 0.72
    assert result["pairwise_accuracy"] > result["baseline_longer_wins"] + 0.05
    assert result["mean_prob_in_style"] > result["mean_prob_other_styles"] + 0.08
