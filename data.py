"""Preference data: reading files and data sets, chat templates, tokenising, masking, batching.

The data contract, from a file on disk to a batch the loss can read:

1. Rows. `read_rows(source)` reads a local .jsonl / .json / .parquet file, or a Hugging Face data
   set by name, into (where, row) pairs; `where` names the row for messages: "pairs.jsonl:17"
   (jsonl line, 1-based), "pairs.json:[3]" (list index), "x.parquet:row 5", "name[train]:row 5"
   (row index, 0-based). A file that cannot be read raises DataError, one line naming the file.

2. Pairs. `to_pair(row)` accepts the formats TRL accepts:
     conversational, implicit prompt: {"chosen": [msgs..., assistant], "rejected": [msgs..., assistant]}
         the prompt is chosen[:-1], which must equal rejected[:-1];
     explicit prompt: {"prompt": str | [msgs], "chosen": str | [msgs], "rejected": str | [msgs]}
         a string prompt is one user message; a message-list response gives its last
         (assistant) message.
   A message is {"role": "system" | "user" | "assistant", "content": str}. The prompt is an optional
   system message, then user and assistant turns alternating, ending with a user turn. Responses
   are stripped of surrounding whitespace: the template marks where they start and end, and a
   leading space or newline would merge with the template's own newline into one token.
   An unusable row raises Skip(reason); `load_pairs` counts the reasons and prints one line.

3. Examples. `tokenize_pair` (`tokenize_pairs` for many at once) renders the prompt with the tokenizer's chat template and the
   generation prompt, then each response as the assistant turn that follows it:
       ids    = prompt_ids                + response_ids       (response ends with EOS, nothing after)
       labels = [IGNORE] * len(prompt_ids) + response_ids
   Labels are NOT shifted: labels[t] is the token at position t. The model's logits at t - 1 score
   it, so a consumer shifts once (`labels[:, 1:] != IGNORE`) and the first response token is scored.

4. Batches. `collate` stacks B examples into 2B right-padded rows, chosen first:
       input_ids, attention_mask, labels: (2B, T) long; rows 0..B-1 chosen, B..2B-1 rejected;
       padding: input_ids = pad_id, attention_mask = 0, labels = IGNORE.
"""
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from residual_q import IGNORE  # label of every token that is not scored: prompt, padding, anything after EOS
FILE_FORMATS = (".jsonl", ".json", ".parquet")


class DataError(Exception):
    """A one-line, user-facing message naming the file (and line or field) at fault."""


class Skip(Exception):
    """A row that cannot be used as a preference pair; `reason` is a short, stable counter key."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Pair:
    prompt: list[dict]  # chat messages, ending with a user message
    chosen: str         # the preferred response (y_w)
    rejected: str       # the other response (y_l)
    where: str          # the row it came from, e.g. "pairs.jsonl:17"


# ------------------------------------------------------------------------------------------------
# reading rows


def read_rows(source: str, split: str = "train") -> list[tuple[str, dict]]:
    """(where, row) for every row of a local .jsonl / .json / .parquet file or a hub data set
    (`split` is used for hub data sets only)."""
    path = Path(source)
    label = _label(source, split)
    if path.suffix in FILE_FORMATS:
        if not path.is_file():
            raise DataError(f"{source}: no such file")
        rows = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}[path.suffix](path)
    elif path.is_file():
        raise DataError(f"{source}: unknown file type (expected {', '.join(FILE_FORMATS)})")
    else:
        rows = _read_hub(source, split)
    if not rows:
        raise DataError(f"{label}: no rows")
    return rows


def _label(source, split):
    """How messages name the source: the file name, or "name[split]" for a hub data set."""
    path = Path(source)
    return path.name if path.suffix in FILE_FORMATS else f"{source}[{split}]"


def _read_bytes(path):
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if not raw.strip():
        raise DataError(f"{path.name}: empty file")
    return raw


def _not_utf8(where, error):
    return DataError(f"{where}: not UTF-8 (byte 0x{error.object[error.start]:02x})")


def _read_jsonl(path):
    rows = []
    for line_number, line in enumerate(_read_bytes(path).split(b"\n"), start=1):
        where = f"{path.name}:{line_number}"
        try:
            text = line.decode("utf-8-sig" if line_number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(where, e) from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        rows.append((where, row))
    return rows


def _read_json(path):
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_number = raw.count(b"\n", 0, e.start) + 1
        raise _not_utf8(f"{path.name}:{line_number}", e) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path.name}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
        data = data.get("data", data.get("train"))
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise DataError(f'{path.name}: expected a list of objects (or {{"data": [...]}}, {{"train": [...]}})')
    return [(f"{path.name}:[{i}]", row) for i, row in enumerate(data)]


def _read_parquet(path):
    import pyarrow.parquet

    try:
        data = pyarrow.parquet.read_table(path).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path.name}: cannot read as parquet ({_first_line(e)})") from None
    return [(f"{path.name}:row {i}", row) for i, row in enumerate(data)]


def _read_hub(name, split):
    import datasets

    try:
        data = datasets.load_dataset(name, split=split)
    except Exception as e:  # the library raises many kinds; the user needs only its first line
        raise DataError(f"{name}: cannot load data set split {split!r} ({_first_line(e)})") from None
    label = _label(name, split)
    return [(f"{label}:row {i}", row) for i, row in enumerate(data)]


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# ------------------------------------------------------------------------------------------------
# rows -> preference pairs


def to_pair(row: dict) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen text, rejected text), or Skip(reason)."""
    if "chosen" not in row or "rejected" not in row:
        raise Skip("missing field")
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


def load_pairs(source: str, split: str = "train") -> list[Pair]:
    """Every usable preference pair of a file or data set; prints one summary line."""
    rows = read_rows(source, split)
    label = _label(source, split)
    if not any("chosen" in row or "rejected" in row for _, row in rows):
        where, row = rows[0]
        raise DataError(f"{label}: no 'chosen'/'rejected' fields (first row at {where} has keys {sorted(row)})")
    pairs, skipped, first_skip = [], Counter(), None
    for where, row in rows:
        try:
            prompt, chosen, rejected = to_pair(row)
        except Skip as skip:
            skipped[skip.reason] += 1
            first_skip = first_skip or f"{where}: {skip.reason}"
            continue
        pairs.append(Pair(prompt, chosen, rejected, where))
    summary = f"{label}: {len(rows)} rows, {len(pairs)} pairs kept"
    if skipped:
        summary += ", skipped: " + ", ".join(f"{reason} {n}" for reason, n in skipped.most_common())
    print(summary)
    if not pairs:
        raise DataError(f"{label}: no usable preference pair (first skipped: {first_skip})")
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


# ------------------------------------------------------------------------------------------------
# pairs -> token ids and labels


def tokenize_pair(tokenizer, pair: Pair, cutoff: int, max_prompt: int | None = None) -> dict | None:
    """{"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"}: lists of ints with
    len(ids) <= cutoff; None when the prompt leaves no room for a response.
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
    example = {}
    for side, full_ids in (("chosen", chosen_full), ("rejected", rejected_full)):
        response_ids = _response_ids(tokenizer, pair, prompt_ids, full_ids)[:room]
        if not response_ids:
            return None
        example[f"{side}_ids"] = kept_prompt + response_ids
        example[f"{side}_labels"] = [IGNORE] * len(kept_prompt) + response_ids
    return example


def _response_ids(tokenizer, pair, prompt_ids, full_ids):
    """The tokens the template puts after the prompt for this assistant turn, up to and
    including the first EOS (what the template adds after it, e.g. a newline, is not scored)."""
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
    """The tokenized examples of a list of pairs; pairs whose prompt fills the cutoff are dropped."""

    def __init__(self, tokenizer, pairs: list[Pair], cutoff: int, max_prompt: int | None = None):
        max_prompt = cutoff // 2 if max_prompt is None else max_prompt
        self.examples = [e for e in tokenize_pairs(tokenizer, pairs, cutoff, max_prompt) if e is not None]
        dropped = len(pairs) - len(self.examples)
        if dropped:
            print(f"{dropped} of {len(pairs)} pairs dropped: prompt too long "
                  f"(cutoff {cutoff}, prompt kept to {max_prompt} tokens)")
        if not self.examples:
            where = pairs[0].where if pairs else "no pairs given"
            raise DataError(f"no pair fits in cutoff {cutoff} with a prompt of {max_prompt} tokens (first: {where})")

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]
