"""A lever against the demo's loops, measured and not kept: pairs against the head's own loops.

A head trained on demo/child_train.jsonl writes the child style, but about one answer in six
loops ("It's like a special box that helps you keep your passwords safe..." three times). Its
training pairs never showed it such an answer: both sides were written by the frozen model, so
the states a loop passes through are ones the head was never trained on, and made-up loops (an
answer with one of its sentences repeated) did not help: the head ranked them and looped as before.

This script takes the loops the head *actually* writes. Given that head's greedy answers to the
training prompts (sample.py --out on demo/child_train.jsonl), every answer that demo.child.judge
calls degenerate becomes one more pair for its prompt, rejected = the looping answer, chosen =
  --chosen asked   the prompt's chosen answer (the frozen model asked for the style, no loop);
  --chosen prefix  the loop's own beginning, ended at the last sentence before the loop starts
                   (when that is still a child answer): the two sides share a prefix and part
                   where the loop begins.
The output holds the training pairs followed by these; held-out prompts are never read. Run it
again on a head trained on its output for a second round (--pairs takes that output).

What it did (docs/results.md, the demo table): nothing beyond seed noise. Loops on the held-out
prompts stayed at 0.13-0.15, and on the training prompts the retrained head fixed 31 of the 42
loops it was shown and wrote 38 new ones elsewhere: each head loops somewhere, not in one place.

    python sample.py --checkpoint runs/demo --prompts-file demo/child_train.jsonl \\
        --max-new-tokens 96 --batch-size 16 --out runs/demo/train_answers.json
    python demo/build_child_loops.py --answers runs/demo/train_answers.json
"""
import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from demo.build_child import complete_sentences  # noqa: E402
from demo.child import judge  # noqa: E402
from support.data_files import DataError, read_rows  # noqa: E402

HERE = Path(__file__).parent


def before_the_loop(text):
    """The answer up to the last sentence end before its loop starts ("" if no sentence ends
    before it; the whole answer if it has no loop). The loop is the first word 3-gram that occurs
    4 times or more; it starts at that 3-gram's second occurrence."""
    words = list(re.finditer(r"\w+", text.lower()))
    grams = [tuple(w.group() for w in words[i:i + 3]) for i in range(len(words) - 2)]
    counts, seen = Counter(grams), Counter()
    for i, g in enumerate(grams):
        seen[g] += 1
        if seen[g] == 2 and counts[g] >= 4:
            return complete_sentences(text[:words[i].start()], finished=False)
    return text


def loop_pairs(pairs, answers, chosen_side="asked"):
    """One pair per looping answer: (a clean answer, the loop). The clean answer is the prompt's
    chosen answer ("asked"), or ("prefix") the loop's own beginning, ended before the loop starts,
    when that is a child answer (else the asked one): the two sides then share a prefix and part
    where the loop begins. Pairs and answers are matched by prompt text; answers to prompts that
    are not in `pairs` are an error."""
    by_prompt = {}
    for p in pairs:  # the first pair of a prompt: its original one, when pairs holds an earlier round's loops
        by_prompt.setdefault(p["chosen"][0]["content"], p)
    out = []
    for a in answers:
        prompt = a["prompt"][-1]["content"]
        if prompt not in by_prompt:
            raise SystemExit(f"error: --answers: prompt {prompt[:60]!r} is not in the training pairs")
        text = a["customised"]
        if judge(text) == "degenerate" and text.strip():
            chosen = by_prompt[prompt]["chosen"]
            clean = before_the_loop(text)
            if chosen_side == "prefix" and judge(clean) == "child":
                chosen = chosen[:-1] + [{"role": "assistant", "content": clean}]
            out.append({"chosen": chosen, "rejected": chosen[:-1] + [{"role": "assistant", "content": text}]})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--answers", required=True, help="sample.py --out file: a head's answers to the training prompts")
    ap.add_argument("--pairs", default=str(HERE / "child_train.jsonl"), help="the training pairs")
    ap.add_argument("--chosen", default="asked", choices=["asked", "prefix"],
                    help="the clean side of a loop pair: the prompt's asked-for answer, or the loop's own beginning")
    ap.add_argument("--out", default="runs/child_loops_train.jsonl", help="training pairs + loop pairs")
    args = ap.parse_args(argv)
    try:
        pairs = [row for _, row in read_rows(args.pairs)]
    except DataError as e:
        raise SystemExit(f"error: --pairs {e}")
    try:
        answers = json.loads(Path(args.answers).read_text(encoding="utf-8"))["answers"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: --answers {args.answers}: not a sample.py --out file ({type(e).__name__}: {e})")
    extra = loop_pairs(pairs, answers, args.chosen)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs + extra)
    print(f"{len(answers)} answers, {len(extra)} loop; wrote {len(pairs)} + {len(extra)} pairs to {args.out}")


if __name__ == "__main__":
    main()
