"""The demo preference's scorer (demo/child.py): hand-written answers of each verdict, and the
shipped pairs: the chosen side talks to a child, the rejected side does not."""
import json
from pathlib import Path

import pytest

from demo.child import adherence, judge

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
        assert set(written[side]) == {"adherence", "degenerate", "plain", "n", "kl"}
    assert written["frozen"]["kl"] == 0.0 and written["customised"]["kl"] >= 0.0
    assert written["asked"]["n"] == 3 and written["asked"]["instruction"] == show.INSTRUCTION
    no_reference = show.main([str(run), "--max-new-tokens", "6", "--shown", "0", "--asked", "", "--device", "cpu"])
    assert "asked" not in no_reference
    show.main([str(run), "--max-new-tokens", "6", "--shown", "0", "--asked", "", "--alpha0", "0.08", "--device", "cpu"])
    dialled = json.loads((run / "demo-alpha0.08.json").read_text())
    assert dialled["alpha0"] == dialled["alpha_tilde"] == 0.08 and dialled["prompts"] == 3


def test_loop_pairs_reject_only_the_heads_looping_answers():
    from demo.build_child_loops import loop_pairs

    def pair(prompt, chosen, rejected):
        user = [{"role": "user", "content": prompt}]
        return {"chosen": user + [{"role": "assistant", "content": chosen}],
                "rejected": user + [{"role": "assistant", "content": rejected}]}

    pairs = [pair(f"question {i}?", CHILD[i], PLAIN[i]) for i in range(3)]
    answers = [{"prompt": [{"role": "user", "content": "question 0?"}], "customised": DEGENERATE[2]},
               {"prompt": [{"role": "user", "content": "question 1?"}], "customised": CHILD[4]},
               {"prompt": [{"role": "user", "content": "question 2?"}], "customised": DEGENERATE[0]}]
    # only the looping answer becomes a pair (a child answer is fine, an empty one is no loop to show)
    assert loop_pairs(pairs, answers) == [pair("question 0?", CHILD[0], DEGENERATE[2])]
    with pytest.raises(SystemExit, match="not in the training pairs"):
        loop_pairs(pairs, [{"prompt": [{"role": "user", "content": "held out?"}], "customised": "x"}])


def test_the_prefix_side_ends_before_the_loop_starts():
    from demo.build_child_loops import before_the_loop, loop_pairs
    loop = "Imagine a big box." + " It is like a toy." * 5
    assert before_the_loop(loop) == "Imagine a big box. It is like a toy."  # "it is like" starts again here
    assert before_the_loop("It is like a toy. It is like a toy. It is like a toy. It is like a toy.") \
        == "It is like a toy."
    assert before_the_loop("It is like it is like it is like it is like") == ""  # no sentence ends before
    assert before_the_loop(CHILD[0]) == CHILD[0]  # no loop: the whole answer
    user = [{"role": "user", "content": "q?"}]
    pairs = [{"chosen": user + [{"role": "assistant", "content": CHILD[1]}],
              "rejected": user + [{"role": "assistant", "content": PLAIN[0]}]}]
    prefix = loop_pairs(pairs, [{"prompt": user, "customised": loop}], "prefix")
    assert prefix[0]["chosen"][-1]["content"] == "Imagine a big box. It is like a toy."
    assert prefix[0]["rejected"][-1]["content"] == loop
    # a loop with no child answer before it falls back to the asked-for answer
    fallback = loop_pairs(pairs, [{"prompt": user, "customised": DEGENERATE[2]}], "prefix")
    assert fallback[0]["chosen"][-1]["content"] == CHILD[1]


def test_loop_pairs_script_names_a_bad_input_in_one_line(tmp_path):
    from demo.build_child_loops import main
    (tmp_path / "answers.json").write_text('{"no answers": []}')
    with pytest.raises(SystemExit, match=r"--answers .*answers.json: not a sample.py --out file \(KeyError"):
        main(["--answers", str(tmp_path / "answers.json")])
    with pytest.raises(SystemExit, match=r"--pairs .*missing.jsonl: no such file"):
        main(["--answers", str(tmp_path / "answers.json"), "--pairs", str(tmp_path / "missing.jsonl")])
