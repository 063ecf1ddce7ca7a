r"""Preference data: what a batch holds, and how pairs of chat messages become one.

The data contract, from a preference pair to a batch the loss can read:

1. Pairs. A `Pair` is a prompt (chat messages: an optional system message, then user and assistant
   turns alternating, ending with a user turn) and two responses, chosen (y_w) and rejected (y_l).

2. Examples. `tokenize_pair` (`tokenize_pairs` for many at once) renders the prompt with the
   tokenizer's chat template and the generation prompt, then each response as the assistant turn
   that follows it:
       ids    = prompt_ids                + response_ids
       labels = [IGNORE] * len(prompt_ids) + response_ids
   Labels are NOT shifted: labels[t] is the token at position t. The model's logits at t - 1 score
   it, so a consumer shifts once (residual_q.next_tokens) and the first response token is scored.
   The response runs to the first EOS of the turn, included; what the template adds after it
   (SmolLM2 and Llama-3.1: a newline) is not scored. A template whose turns end with a token
   other than the tokenizer's EOS keeps the whole rendered turn, its trailing text included.
   Long pairs: the prompt keeps its last max_prompt tokens (default cutoff // 2, the last
   question), each response its first tokens up to the cutoff (a cut response is scored as far as
   it goes, and its last state is terminal: R is the return of that prefix, as DPO scores it).

3. Batches. `collate` stacks B examples into 2B right-padded rows, chosen first:
       input_ids, attention_mask, labels: (2B, T) long; rows 0..B-1 chosen, B..2B-1 rejected;
       padding: input_ids = pad_id, attention_mask = 0, labels = IGNORE.

4. Files. `load_pairs(source)` reads a local .jsonl / .json / .parquet file or a hub data set
   (support/data_files.py; `split` and `data_dir` choose the part of a hub data set) and keeps the
   rows `to_pair` accepts, in the formats TRL accepts:
     conversational, implicit prompt: {"chosen": [msgs..., assistant], "rejected": [msgs..., assistant]}
         the prompt is chosen[:-1], which must equal rejected[:-1];
     explicit prompt: {"prompt": str | [msgs], "chosen": str | [msgs], "rejected": str | [msgs]}
         a string prompt is one user message; a message-list response gives its last
         (assistant) message;
     transcripts, as Anthropic/hh-rlhf publishes them: {"chosen": str, "rejected": str}, each a whole
         conversation "\n\nHuman: ...\n\nAssistant: ...\n\nHuman: ...\n\nAssistant: answer";
         `transcript_messages` turns each into messages, then it is the implicit-prompt case.
   A message is {"role": "system" | "user" | "assistant", "content": str}. Responses are stripped
   of surrounding whitespace: the template marks where they start and end, and a leading space or
   newline would merge with the template's own newline into one token. An unusable row raises
   Skip(reason); `load_pairs` counts the reasons and prints one line.
"""
import json
import random
import re
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm import tqdm

from residual_q import IGNORE  # label of every token that is not scored: prompt, padding, anything after EOS
from support.data_files import FILE_FORMATS, DataError, label, read_rows  # noqa: F401 (FILE_FORMATS: sample.py)


@dataclass
class Pair:
    prompt: list[dict]  # chat messages, ending with a user message
    chosen: str         # the preferred response (y_w)
    rejected: str       # the other response (y_l)
    where: str          # the row it came from, e.g. "pairs.jsonl:17"


# ------------------------------------------------------------------------------------------------
# pairs -> token ids and labels


def tokenize_pair(tokenizer, pair: Pair, cutoff: int, max_prompt: int | None = None) -> dict | None:
    """{"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"}: lists of ints with
    len(ids) <= cutoff, and "prompt_cut": whether the prompt lost tokens to max_prompt; None when
    the prompt leaves no room for a response.
    The prompt keeps its last max_prompt tokens (default cutoff // 2), each response its start."""
    return tokenize_pairs(tokenizer, [pair], cutoff, max_prompt)[0]


def tokenize_pairs(tokenizer, pairs: list[Pair], cutoff: int, max_prompt: int | None = None,
                   chunk: int = 256) -> list[dict | None]:
    """tokenize_pair for many pairs, faster: the chat template renders the three texts of each
    pair (prompt with the generation prompt, prompt + chosen, prompt + rejected), and the tokenizer
    encodes a chunk of texts in one call. This is what apply_chat_template(tokenize=True) does one
    text at a time (render, then encode without special tokens), so the ids are the same."""
    max_prompt = cutoff // 2 if max_prompt is None else max_prompt
    examples = []
    with tqdm(total=len(pairs), desc="tokenizing", unit="pair") as bar:
        for start in range(0, len(pairs), chunk):
            part = pairs[start:start + chunk]
            texts = []
            for pair in part:
                texts.append(tokenizer.apply_chat_template(pair.prompt, add_generation_prompt=True, tokenize=False))
                for text in (pair.chosen, pair.rejected):
                    turn = pair.prompt + [{"role": "assistant", "content": text}]
                    texts.append(tokenizer.apply_chat_template(turn, tokenize=False))
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]  # 3 lists per pair
            for i, pair in enumerate(part):
                examples.append(_example(tokenizer, pair, *ids[3 * i:3 * i + 3], cutoff, max_prompt))
            bar.update(len(part))
    return examples


def _example(tokenizer, pair, prompt_ids, chosen_full, rejected_full, cutoff, max_prompt):
    """One pair's example from its three token lists (see tokenize_pair)."""
    kept_prompt = prompt_ids[max(len(prompt_ids) - max_prompt, 0):]  # keep the end: the last question
    room = max(cutoff - len(kept_prompt), 0)
    example = {"prompt_cut": len(kept_prompt) < len(prompt_ids)}
    for side, full_ids in (("chosen", chosen_full), ("rejected", rejected_full)):
        whole = _response_ids(tokenizer, pair, prompt_ids, full_ids)
        response_ids = whole[:room]
        if not response_ids:
            return None
        example[f"{side}_ids"] = kept_prompt + response_ids
        example[f"{side}_labels"] = [IGNORE] * len(kept_prompt) + response_ids
    return example


def _response_ids(tokenizer, pair, prompt_ids, full_ids):
    """The tokens the template puts after the prompt for this assistant turn, up to and
    including the first EOS; without an EOS in the turn, all of them (see the module doc)."""
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise DataError(f"chat template of {tokenizer.name_or_path} does not keep the prompt as a "
                        f"prefix of the conversation ({pair.where})")
    response_ids = full_ids[len(prompt_ids):]
    if tokenizer.eos_token_id in response_ids:
        response_ids = response_ids[:response_ids.index(tokenizer.eos_token_id) + 1]
    return response_ids


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """B tokenized pairs -> one batch of 2B right-padded rows: chosen 0..B-1, rejected B..2B-1."""
    ids = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    labels = [e["chosen_labels"] for e in examples] + [e["rejected_labels"] for e in examples]
    T = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), T), pad_id, dtype=torch.long)     # (2B, T)
    attention_mask = torch.zeros((len(ids), T), dtype=torch.long)       # (2B, T)
    label_ids = torch.full((len(ids), T), IGNORE, dtype=torch.long)     # (2B, T)
    for i, (row_ids, row_labels) in enumerate(zip(ids, labels)):
        input_ids[i, :len(row_ids)] = torch.tensor(row_ids)
        attention_mask[i, :len(row_ids)] = 1
        label_ids[i, :len(row_labels)] = torch.tensor(row_labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}




class PairDataset(torch.utils.data.Dataset):
    """The tokenized examples of a list of pairs; pairs whose prompt fills the cutoff are dropped,
    and one line says how many were dropped and how many prompts were cut to max_prompt."""

    def __init__(self, tokenizer, pairs: list[Pair], cutoff: int, max_prompt: int | None = None):
        if not pairs:
            raise DataError("no pairs to tokenise")
        max_prompt = cutoff // 2 if max_prompt is None else max_prompt
        self.examples = [e for e in tokenize_pairs(tokenizer, pairs, cutoff, max_prompt) if e is not None]
        dropped, cut = len(pairs) - len(self.examples), sum(e["prompt_cut"] for e in self.examples)
        notes = [f"{dropped} of {len(pairs)} pairs dropped: prompt too long (cutoff {cutoff}, prompt kept to "
                 f"{max_prompt} tokens)"] if dropped else []
        notes += [f"{cut} of {len(pairs)} prompts cut to their last {max_prompt} tokens (--max-prompt)"] if cut else []
        if notes:
            print("; ".join(notes))
        if not self.examples:
            raise DataError(f"no pair fits in cutoff {cutoff} with a prompt of {max_prompt} tokens "
                            f"(first: {pairs[0].where})")

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


# ------------------------------------------------------------------------------------------------
# rows of a file -> preference pairs


class Skip(Exception):
    """A row that cannot be used as a preference pair; `reason` is a short, stable counter key."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def to_pair(row: dict) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen text, rejected text), or Skip(reason); the formats: section 4 above."""
    if "chosen" not in row or "rejected" not in row:
        raise Skip("missing field")
    if row.get("prompt") is None and isinstance(row["chosen"], str) and isinstance(row["rejected"], str):
        row = {"chosen": transcript_messages(row["chosen"]), "rejected": transcript_messages(row["rejected"])}
    if row.get("prompt") is None:  # implicit prompt: the conversation before the last message
        chosen, rejected = _messages(row["chosen"]), _messages(row["rejected"])
        if chosen[:-1] != rejected[:-1]:
            raise Skip("prompts differ")
        prompt = chosen[:-1]
    elif isinstance(row["prompt"], str):
        prompt = [{"role": "user", "content": row["prompt"]}]
    else:
        prompt = _messages(row["prompt"])
    _check_prompt(prompt)
    chosen_text, rejected_text = _response(row["chosen"]), _response(row["rejected"])
    if not chosen_text or not rejected_text:
        raise Skip("empty response")
    if chosen_text == rejected_text:
        raise Skip("chosen == rejected")
    return prompt, chosen_text, rejected_text


TURN = re.compile(r"\n\n(Human|Assistant):(?: |\Z)")  # a turn starts a paragraph; "Human:" inside one is text
ROLES = {"Human": "user", "Assistant": "assistant"}


def transcript_messages(text: str) -> list[dict]:
    r"""A transcript as messages: "\n\nHuman: q\n\nAssistant: a ..." -> [{"role": "user",
    "content": "q"}, {"role": "assistant", "content": "a"}, ...], each content stripped. Only
    "\n\nHuman: " and "\n\nAssistant: " start a turn (the first may lack its "\n\n", a last empty
    one its space). Roles are not checked here: to_pair checks them as for any message list.
    No turn, or text before the first one: Skip("not a transcript")."""
    before, *turns = TURN.split("\n\n" + text.lstrip())  # [before, role, content, role, content, ...]
    if not turns or before.strip():
        raise Skip("not a transcript")
    return [{"role": ROLES[role], "content": content.strip()} for role, content in zip(turns[::2], turns[1::2])]


def _messages(value):
    """A non-empty list of {"role": str, "content": str}, keeping only those two keys."""
    if not isinstance(value, list) or not value:
        raise Skip("wrong type")
    for message in value:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise Skip("wrong type")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check_prompt(prompt):
    """An optional system message, then user / assistant alternating, ending with user."""
    roles = [m["role"] for m in prompt]
    if roles[:1] == ["system"]:
        roles = roles[1:]
    alternating = ["user", "assistant"] * len(roles)
    if not roles or roles != alternating[:len(roles)] or roles[-1] != "user":
        raise Skip("bad roles")
    if any(not m["content"].strip() for m in prompt):
        raise Skip("empty message")


def _response(value):
    """The response text: a string, or the content of the last (assistant) message of a list."""
    if isinstance(value, str):
        return value.strip()
    last = _messages(value)[-1]
    if last["role"] != "assistant":
        raise Skip("bad roles")
    return last["content"].strip()


def load_pairs(source: str, split: str = "train", data_dir: str | None = None) -> list[Pair]:
    """Every usable preference pair of a file or data set; prints one summary line. `split` and
    `data_dir` (the folder inside a hub data set's repository) are ignored for a local file."""
    rows = read_rows(source, split, data_dir)
    name = label(source, split, data_dir)
    if not any("chosen" in row or "rejected" in row for _, row in rows):
        where, row = rows[0]
        raise DataError(f"{name}: no 'chosen'/'rejected' fields (first row at {where} has keys {sorted(row)})")
    pairs, skipped, first_skip = [], Counter(), None
    for where, row in rows:
        try:
            prompt, chosen, rejected = to_pair(row)
        except Skip as skip:
            skipped[skip.reason] += 1
            first_skip = first_skip or f"{where}: {skip.reason}"
            continue
        pairs.append(Pair(prompt, chosen, rejected, where))
    summary = f"{name}: {len(rows)} rows, {len(pairs)} pairs kept"
    if skipped:
        summary += ", skipped: " + ", ".join(f"{reason} {n}" for reason, n in skipped.most_common())
    print(summary)
    if not pairs:
        raise DataError(f"{name}: no usable preference pair (first skipped: {first_skip})")
    return pairs


def split_by_prompt(pairs: list[Pair], test_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, test): about test_fraction of the distinct prompts go to test, with all their pairs,
    so no prompt is on both sides. With >= 2 prompts and test_fraction > 0 each side gets at
    least one prompt. Deterministic for a seed; each side keeps the input order."""
    key = lambda pair: json.dumps(pair.prompt, sort_keys=True)
    prompts = list(dict.fromkeys(key(pair) for pair in pairs))  # distinct, in first-seen order
    random.Random(seed).shuffle(prompts)
    n_test = round(test_fraction * len(prompts))
    if test_fraction > 0 and len(prompts) >= 2:
        n_test = min(max(n_test, 1), len(prompts) - 1)
    test_prompts = set(prompts[:n_test])
    train = [pair for pair in pairs if key(pair) not in test_prompts]
    test = [pair for pair in pairs if key(pair) in test_prompts]
    return train, test


def held_out_of(config: dict) -> list[Pair]:
    """The held-out pairs of a saved run (its config.json): its --test-data, or the split of its
    --data that train.py made (a run saved before --split-seed existed split with its --seed)."""
    split, data_dir = config.get("split", "train"), config.get("data_dir")
    if config.get("test_data"):
        return load_pairs(config["test_data"], split, data_dir)
    _, test = split_by_prompt(load_pairs(config["data"], split, data_dir), config.get("test_fraction", 0.2),
                              config.get("split_seed", config.get("seed", 0)))
    return test


def train_and_test_sets(args, tok):
    """train.py's data: (train set, test set, test pairs) from --data, --test-data (or a split of
    --data by prompt; both read with --split and --data-dir), --train-limit, --eval-limit, --cutoff,
    --max-prompt. A bad file is a one-line error (SystemExit)."""
    try:
        train_pairs = load_pairs(args.data, args.split, args.data_dir)
        if args.test_data:
            test_pairs = load_pairs(args.test_data, args.split, args.data_dir)
        else:
            train_pairs, test_pairs = split_by_prompt(train_pairs, args.test_fraction, args.split_seed)
            if not test_pairs:
                raise DataError(f"{label(args.data, args.split, args.data_dir)}: every pair has the same prompt, so "
                                     f"splitting by prompt leaves no test pairs: give --test-data FILE")
        train_pairs, test_pairs = train_pairs[:args.train_limit or None], test_pairs[:args.eval_limit or None]
        train_set = PairDataset(tok, train_pairs, args.cutoff, args.max_prompt)
        test_set = PairDataset(tok, test_pairs, args.cutoff, args.max_prompt)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    print(f"{len(train_set)} training pairs, {len(test_set)} test pairs")
    return train_set, test_set, test_pairs
