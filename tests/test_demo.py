"""The demo preference's scorer (demo/child.py): hand-written answers of each verdict, how varied
a set of answers is, and the shipped pairs: the chosen side talks to a child, the rejected side
does not. Then demo/show.py end to end on a tiny run."""
import json
from pathlib import Path

import pytest

from demo.child import adherence, is_degenerate, judge, opening, variety

ROOT = Path(__file__).resolve().parents[1]

CHILD = [
    "Imagine you have a big box of toys. When you put them away, the box is tidy again.",
    "Alright, little buddy, the sun is a giant ball of fire that keeps us warm.",
    "Hey there! Rain is water falling from the clouds when they get too heavy.",
    "A mortgage is like a big promise. Grown-ups borrow money for a house, like a big loan of toys.",
    "Pretend the Earth is a spinning top that leans a little to one side.",
]
PLAIN = [
    "The Earth's seasons are caused by the tilt of its axis relative to the plane of its orbit.",
    "A mortgage is a loan secured by real estate, repaid in monthly instalments over many years.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "To make a vinaigrette, whisk three parts olive oil with one part vinegar, salt and pepper.",
]
DEGENERATE = [
    "",
    "Yes.",
    "Little buddy, little buddy, little buddy, little buddy, little buddy, little buddy, little buddy.",
    "Imagine a big box. " * 6,
    "!!! ??? ...",
]


@pytest.mark.parametrize("text", CHILD)
def test_child_talk_is_child(text):
    assert judge(text) == "child"


@pytest.mark.parametrize("text", PLAIN)
def test_an_ordinary_answer_is_plain(text):
    assert judge(text) == "plain"


@pytest.mark.parametrize("text", DEGENERATE)
def test_empty_or_looping_answers_are_degenerate_even_in_child_talk(text):
    assert judge(text) == "degenerate"


def test_adherence_counts_each_verdict():
    texts = CHILD[:2] + PLAIN[:1] + DEGENERATE[:1]
    assert adherence(texts, [True] * 4) == {"adherence": 0.5, "degenerate": 0.25, "plain": 0.25, "n": 4}


def test_is_degenerate_is_the_rule_judge_uses():
    assert all(is_degenerate(t) for t in DEGENERATE) and not any(is_degenerate(t) for t in CHILD + PLAIN)
    assert is_degenerate("cat dog cow dog cat cow cow cat dog dog cow cat")  # no 3-gram twice, but 3 words of 12
    assert not is_degenerate("cat dog cow dog cat cow cow cat dog")  # 9 words: too short for the 30% rule


def test_an_opening_is_the_first_three_words_lowercased():
    assert opening("Imagine you have a big box.") == "imagine you have"
    assert opening("Hey, there! Rain is water.") == "hey there rain"
    assert opening("Yes.") == "yes" and opening("") == ""


def test_variety_counts_distinct_openings_and_bigrams():
    answers = ["Imagine you have a box.",  # bigrams: imagine you, you have, have a, a box
               "imagine, you have a toy",  # imagine you, you have, have a, a toy: 1 new
               "The sun is hot."]          # the sun, sun is, is hot: 3 new
    assert variety(answers) == {"openings": 2 / 3, "distinct2": 8 / 11, "top_opening": "imagine you have",
                                "top_count": 2}
    # bigrams are taken within an answer, never across two: "box the" is no bigram here
    assert variety(["a box", "the box"]) == {"openings": 1.0, "distinct2": 1.0, "top_opening": "a box", "top_count": 1}
    assert variety(["Same answer here."] * 4)["openings"] == 0.25
    assert variety(["Same answer here."] * 4)["distinct2"] == 2 / 8
    assert variety([]) == {"openings": 0.0, "distinct2": 0.0, "top_opening": "", "top_count": 0}


def test_the_shipped_demo_pairs_hold_the_preference():
    for name in ("child_train.jsonl", "child_test.jsonl"):
        rows = [json.loads(line) for line in (ROOT / "demo" / name).read_text().splitlines()]
        assert len(rows) >= 40
        for row in rows:
            assert row["chosen"][:-1] == row["rejected"][:-1]  # one prompt, without the instruction
            assert "five-year-old" not in row["chosen"][0]["content"]
            assert judge(row["chosen"][-1]["content"]) == "child"
            assert judge(row["rejected"][-1]["content"]) == "plain"


def test_show_runs_end_to_end_and_writes_its_numbers(tiny_path, tmp_path):
    """demo/show.py on a tiny run trained as make demo trains (--unlikelihood 3): both answers per
    held-out prompt, the scorer's numbers, demo.json; at the dial make demo shows, demo-alpha0.08.json."""
    import train
    from demo import show
    test = tmp_path / "test.jsonl"
    test.write_text("".join((ROOT / "demo" / "child_test.jsonl").read_text().splitlines(keepends=True)[:3]))
    run = tmp_path / "run"
    train.main(["--base-model", tiny_path, "--data", str(ROOT / "demo" / "child_train.jsonl"), "--test-data", str(test),
                "--train-limit", "8", "--batch-size", "4", "--head-width", "32", "--head-layers", "1", "--head-heads", "2",
                "--cutoff", "96", "--samples", "0", "--unlikelihood", "3", "--out-dir", str(run), "--device", "cpu"])
    result = show.main([str(run), "--max-new-tokens", "6", "--shown", "1", "--device", "cpu"])
    written = json.loads((run / "demo.json").read_text())
    assert written["prompts"] == result["prompts"] == 3 and len(written["answers"]) == 3
    for side in ("frozen", "customised"):
        assert set(written[side]) == {"adherence", "degenerate", "plain", "n", "kl", "openings", "distinct2",
                                      "top_opening", "top_count"}
        assert 0 < written[side]["openings"] <= 1 and 0 <= written[side]["distinct2"] <= 1
    assert written["frozen"]["kl"] == 0.0 and written["customised"]["kl"] >= 0.0
    assert written["temperature"] == 0.0 and "seed" not in written  # greedy by default
    assert written["asked"]["n"] == 3 and written["asked"]["instruction"] == show.INSTRUCTION
    no_reference = show.main([str(run), "--max-new-tokens", "6", "--shown", "0", "--asked", "", "--device", "cpu"])
    assert "asked" not in no_reference
    show.main([str(run), "--max-new-tokens", "6", "--shown", "0", "--asked", "", "--alpha0", "0.08", "--device", "cpu"])
    dialled = json.loads((run / "demo-alpha0.08.json").read_text())
    assert dialled["alpha0"] == dialled["alpha_tilde"] == 0.08 and dialled["prompts"] == 3
    sampled = show.main([str(run), "--max-new-tokens", "6", "--shown", "0", "--alpha0", "0.08", "--temperature", "1",
                         "--device", "cpu"])
    assert json.loads((run / "demo-alpha0.08-t1.json").read_text())["seed"] == sampled["seed"] == 0
    assert sampled["temperature"] == 1.0 and sampled["top_p"] == 0.9 and sampled["asked"]["n"] == 3
    again = show.main([str(run), "--max-new-tokens", "6", "--shown", "0", "--alpha0", "0.08", "--temperature", "1",
                       "--asked", "", "--device", "cpu"])
    assert again["answers"] == sampled["answers"]  # seeded: the same samples
