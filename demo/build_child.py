"""Builds the embedded demo preference: answers a child would understand (demo/child_{train,test}.jsonl).

For every other prompt in demo/prompts.py (--every 2: 480 prompts) the embedded model (SmolLM2-135M-Instruct) answers greedily
twice, at most 96 new tokens each, cut back to the last complete sentence when the budget cut it:
  rejected = its usual answer to the prompt, kept only if demo.child.judge calls it "plain";
  chosen   = its answer when the prompt ends with INSTRUCTION ("Explain it to a five-year-old
             child."), kept only if judge calls it "child" (child talk, and no loop).
The pair's prompt is the plain one, without the instruction: the head learns to make the model
talk to a child unasked. The signal is in every token of the answer (the opening, the words, the
comparisons), not in one decision such as where to stop, and the frozen model does not already
prefer the chosen answer (it is not what it says when asked plainly: on the held-out pairs its own
log-probability margin ranks the chosen answer first about as rarely as chance or less; train.py
prints it as "frozen log-prob margin").
Prompts are split, seeded, into train and test; each prompt gives one pair, so the split is by
prompt. Both files use the conversational format (chosen and rejected message lists, the prompt
being their shared beginning).

    python demo/build_child.py        # about 15 minutes on 2 CPU cores; the generations are cached
                                      # by prompt in $QADAPTER_CACHE, so a rerun takes seconds
"""
import argparse
import json
import random
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from demo.child import judge  # noqa: E402
from demo.prompts import all_prompts  # noqa: E402
from support import loading  # noqa: E402

MAX_NEW_TOKENS = 96
INSTRUCTION = "Explain it to a five-year-old child."
# the text up to its last sentence end: . ! ? (or a closing quote/bracket after one) before a space or the end
LAST_SENTENCE_END = re.compile(r".*[.!?][\"')\]]*(?=\s|$)", re.S)


def generate(base, tok, conversations, max_new_tokens, batch_size, cache, cache_file):
    """The frozen model's greedy answers, batched with left padding: list of (text, finished), finished
    when it ended the answer itself (EOS). `cache` maps a conversation (as JSON) to its answer; only
    the missing ones are generated, and the cache file is rewritten after each batch."""
    keys = [json.dumps([conv, max_new_tokens]) for conv in conversations]
    todo = [i for i, k in enumerate(keys) if k not in cache]
    order = sorted(todo, key=lambda i: len(str(conversations[i])))  # like lengths together: less padding
    for start in tqdm(range(0, len(order), batch_size), desc=f"generating ≤{max_new_tokens} tokens"):
        idx = order[start:start + batch_size]
        enc = tok.apply_chat_template([conversations[i] for i in idx], add_generation_prompt=True,
                                      padding=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = base.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id)
        for i, row in zip(idx, out[:, enc["input_ids"].shape[1]:]):  # (new tokens,) of each answer
            finished = bool((row == tok.eos_token_id).any())
            cache[keys[i]] = (tok.decode(row, skip_special_tokens=True).strip(), finished)
        cache_file.write_text(json.dumps(cache))
    return [tuple(cache[k]) for k in keys]


def complete_sentences(answer, finished):
    """The answer as the model ended it, or, when the token budget cut it, up to its last sentence end."""
    if finished:
        return answer
    m = LAST_SENTENCE_END.match(answer)
    return m.group(0) if m else ""


def make_pair(prompt, usual, styled):
    """(pair, None) or (None, reason it was dropped); usual and styled are (text, finished)."""
    usual, styled = complete_sentences(*usual), complete_sentences(*styled)
    if judge(usual) != "plain":
        return None, f"usual answer {judge(usual)}"
    if judge(styled) != "child":
        return None, f"asked answer {judge(styled)}"
    user = [{"role": "user", "content": prompt}]
    return {"chosen": user + [{"role": "assistant", "content": styled}],
            "rejected": user + [{"role": "assistant", "content": usual}]}, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(Path(__file__).parent), help="where the two .jsonl files go")
    ap.add_argument("--test-prompts", type=int, default=60, help="prompts held out for the test file")
    ap.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    ap.add_argument("--batch-size", type=int, default=32, help="prompts generated at once")
    ap.add_argument("--every", type=int, default=2, help="use every N-th prompt of demo/prompts.py (1: all 959)")
    args = ap.parse_args()

    base, tok = loading.load_base()
    tok.padding_side = "left"
    prompts = all_prompts()[::args.every]
    cache_file = loading.cache_dir() / "demo_child_generations.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    usual = generate(base, tok, [[{"role": "user", "content": p}] for p in prompts], MAX_NEW_TOKENS,
                     args.batch_size, cache, cache_file)
    styled = generate(base, tok, [[{"role": "user", "content": f"{p} {INSTRUCTION}"}] for p in prompts],
                      MAX_NEW_TOKENS, args.batch_size, cache, cache_file)

    pairs, dropped = [], {}
    for prompt, u, s in zip(prompts, usual, styled):
        pair, reason = make_pair(prompt, u, s)
        if pair:
            pairs.append(pair)
        else:
            dropped[reason] = dropped.get(reason, 0) + 1
    random.Random(args.seed).shuffle(pairs)  # one pair per prompt, so this is a split by prompt
    test, train = pairs[:args.test_prompts], pairs[args.test_prompts:]
    for name, rows in (("child_train.jsonl", train), ("child_test.jsonl", test)):
        with open(Path(args.out_dir) / name, "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"{len(prompts)} prompts -> {len(pairs)} pairs ({len(train)} train, {len(test)} test); "
          f"dropped: {dropped}")


if __name__ == "__main__":
    main()
