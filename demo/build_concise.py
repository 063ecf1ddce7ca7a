"""Builds the embedded demo preference: concise answers (demo/concise_{train,test}.jsonl).

For every prompt in demo/prompts.py, the embedded model (SmolLM2-135M-Instruct) answers twice,
greedily:
  rejected  its usual answer (the chat template's default system prompt), at most 128 new tokens,
            cut back to its last complete sentence; kept only with at least 3 sentences;
  chosen    its answer when the system prompt asks for one or two sentences, trimmed to its first
            two sentences; kept only if it is a real answer (demo.concise.is_degenerate is False)
            and at most half as long as the rejected one.
The pair's prompt is the user's message alone (so the default system prompt): the preference the
head has to learn is "answer like that without being asked". Prompts are then split by prompt,
seeded, into train and test. Both files are in the conversational format of ../shared/data.

    python demo/build_concise.py            # about 10 minutes on 2 CPU cores
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
import model as M  # noqa: E402
from demo.concise import first_sentences, is_degenerate, sentences  # noqa: E402
from demo.prompts import all_prompts  # noqa: E402

SHORT_SYSTEM = "You are a helpful AI assistant. Always answer in one or two short sentences."
_LAST_SENTENCE_END = re.compile(r".*[.!?][\"')\]]*(?=\s|$)", re.S)


def generate(base, tok, conversations, max_new_tokens, batch_size):
    """Greedy answers, batched with left padding: list of (text, finished)."""
    order = sorted(range(len(conversations)), key=lambda i: len(str(conversations[i])))
    answers = [None] * len(conversations)
    for start in tqdm(range(0, len(order), batch_size), desc=f"generating ≤{max_new_tokens} tokens"):
        idx = order[start:start + batch_size]
        enc = tok.apply_chat_template([conversations[i] for i in idx], add_generation_prompt=True,
                                      padding=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = base.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id)
        for i, row in zip(idx, out[:, enc["input_ids"].shape[1]:]):
            finished = bool((row == tok.eos_token_id).any())
            answers[i] = (tok.decode(row, skip_special_tokens=True).strip(), finished)
    return answers


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(Path(__file__).parent), help="where the two .jsonl files go")
    ap.add_argument("--test-prompts", type=int, default=110, help="prompts held out for the test file")
    ap.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    ap.add_argument("--batch-size", type=int, default=32, help="prompts generated at once")
    args = ap.parse_args()

    base, tok = M.load_base()
    tok.padding_side = "left"
    prompts = all_prompts()
    long = generate(base, tok, [[{"role": "user", "content": p}] for p in prompts], 128, args.batch_size)
    short = generate(base, tok, [[{"role": "system", "content": SHORT_SYSTEM}, {"role": "user", "content": p}]
                                 for p in prompts], 64, args.batch_size)

    pairs, dropped = [], {"rejected not long": 0, "chosen not usable": 0}
    for prompt, (rejected, finished), (chosen, _) in zip(prompts, long, short):
        if not finished:
            m = _LAST_SENTENCE_END.match(rejected)
            rejected = m.group(0) if m else ""
        chosen = first_sentences(chosen, 2)
        if len(sentences(rejected)) < 3 or is_degenerate(rejected):
            dropped["rejected not long"] += 1
        elif is_degenerate(chosen) or not re.search(r"[.!?][\"')\]]*$", chosen) or 2 * len(chosen) > len(rejected):
            dropped["chosen not usable"] += 1
        else:
            user = [{"role": "user", "content": prompt}]
            pairs.append({"chosen": user + [{"role": "assistant", "content": chosen}],
                          "rejected": user + [{"role": "assistant", "content": rejected}]})

    random.Random(args.seed).shuffle(pairs)  # one pair per prompt, so this is a split by prompt
    test, train = pairs[:args.test_prompts], pairs[args.test_prompts:]
    for name, rows in (("concise_train.jsonl", train), ("concise_test.jsonl", test)):
        with open(Path(args.out_dir) / name, "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"{len(prompts)} prompts -> {len(pairs)} pairs ({len(train)} train, {len(test)} test); "
          f"dropped: {dropped}")


if __name__ == "__main__":
    main()
