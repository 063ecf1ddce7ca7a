"""Builds the embedded demo preference: concise answers (demo/concise_{train,test}.jsonl).

For every prompt in demo/prompts.py the embedded model (SmolLM2-135M-Instruct) answers greedily
with its usual answer (at most 96 new tokens, cut back to its last complete sentence), kept only if
demo.concise.judge calls it "long". Then
  chosen   = that answer stopped after its first two sentences (or its first, when two would
             pass 40 words), kept only if judge calls it "concise", it does not end in ':' (a
             preamble such as "Here are some tips:"), and it has at most 2/3 of the words;
  rejected = the usual answer, stopped half-way through its last sentence.
So the two answers share their beginning and differ in where the model stops: the preference is
"make your point, then stop". Why the rejected answer never ends at a sentence end: its end-of-turn
token is scored too, and the loss pushes it down; ended after its third or later sentence, it
taught "do not stop at a sentence end", the opposite of the chosen answer's lesson (measured:
3% of generated test answers concise with that version, 15% with this one; docs/results.md).
Earlier still, the chosen answer came from a second generation with a system prompt asking for
brevity; the two answers then differed in wording everywhere, the Bradley–Terry loss was met by
those differences within a few steps, and the customised answers did not get shorter.
Prompts are split, seeded, into train and test; each prompt gives one pair, so the split is by
prompt. Both files use the conversational format (chosen and rejected message lists, the prompt
being their shared beginning).

    python demo/build_concise.py      # about 15 minutes on 2 CPU cores; the generations are cached
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
from demo.concise import first_sentences, judge, sentences  # noqa: E402
from demo.prompts import all_prompts  # noqa: E402
from support import loading  # noqa: E402

MAX_NEW_TOKENS = 96
_LAST_SENTENCE_END = re.compile(r".*[.!?][\"')\]]*(?=\s|$)", re.S)


def words(text):
    return len(re.findall(r"\w+", text))


def generate(base, tok, conversations, max_new_tokens, batch_size, cache, cache_file):
    """Greedy answers, batched with left padding: list of (text, finished). `cache` maps a
    conversation (as JSON) to its answer; only the missing ones are generated, and the cache file
    is rewritten after each batch."""
    keys = [json.dumps([conv, max_new_tokens]) for conv in conversations]
    todo = [i for i, k in enumerate(keys) if k not in cache]
    order = sorted(todo, key=lambda i: len(str(conversations[i])))
    for start in tqdm(range(0, len(order), batch_size), desc=f"generating ≤{max_new_tokens} tokens"):
        idx = order[start:start + batch_size]
        enc = tok.apply_chat_template([conversations[i] for i in idx], add_generation_prompt=True,
                                      padding=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = base.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id)
        for i, row in zip(idx, out[:, enc["input_ids"].shape[1]:]):
            finished = bool((row == tok.eos_token_id).any())
            cache[keys[i]] = (tok.decode(row, skip_special_tokens=True).strip(), finished)
        cache_file.write_text(json.dumps(cache))
    return [tuple(cache[k]) for k in keys]


def make_pair(prompt, answer, finished):
    """(pair, None) or (None, reason it was dropped)."""
    if not finished:  # cut off by the token budget: keep its complete sentences
        m = _LAST_SENTENCE_END.match(answer)
        answer = m.group(0) if m else ""
    if judge(answer, True) != "long":
        return None, "usual answer not long"
    chosen = first_sentences(answer, 2)
    if words(chosen) > 40:
        chosen = first_sentences(answer, 1)
    if judge(chosen, True) != "concise" or chosen.endswith(":") or 3 * words(chosen) > 2 * words(answer):
        return None, "no concise opening"
    # the rejected answer stops half-way through its last sentence, never at a sentence end
    last = sentences(answer)[-1]
    rejected = answer[:answer.rindex(last)] + " ".join(last.split()[:max(1, len(last.split()) // 2)])
    user = [{"role": "user", "content": prompt}]
    return {"chosen": user + [{"role": "assistant", "content": chosen}],
            "rejected": user + [{"role": "assistant", "content": rejected}]}, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(Path(__file__).parent), help="where the two .jsonl files go")
    ap.add_argument("--test-prompts", type=int, default=120, help="prompts held out for the test file")
    ap.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    ap.add_argument("--batch-size", type=int, default=32, help="prompts generated at once")
    args = ap.parse_args()

    base, tok = loading.load_base()
    tok.padding_side = "left"
    prompts = all_prompts()
    cache_file = loading.cache_dir() / "demo_concise_generations.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    answers = generate(base, tok, [[{"role": "user", "content": p}] for p in prompts], MAX_NEW_TOKENS,
                       args.batch_size, cache, cache_file)

    pairs, dropped = [], {}
    for prompt, (answer, finished) in zip(prompts, answers):
        pair, reason = make_pair(prompt, answer, finished)
        if pair:
            pairs.append(pair)
        else:
            dropped[reason] = dropped.get(reason, 0) + 1
    random.Random(args.seed).shuffle(pairs)  # one pair per prompt, so this is a split by prompt
    test, train = pairs[:args.test_prompts], pairs[args.test_prompts:]
    for name, rows in (("concise_train.jsonl", train), ("concise_test.jsonl", test)):
        with open(Path(args.out_dir) / name, "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"{len(prompts)} prompts -> {len(pairs)} pairs ({len(train)} train, {len(test)} test); "
          f"dropped: {dropped}")


if __name__ == "__main__":
    main()
