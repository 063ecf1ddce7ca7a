"""data.py: reading files, turning rows into pairs, splitting by prompt, tokenizing, batching."""
import copy
import json
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
import torch

import data
from support import loading
from data import IGNORE, DataError, Pair

REAL_DSP = Path(__file__).parents[1] / "../shared/data/dsp/dsp_academy_pairs.jsonl"
EOS = 2  # <|im_end|> in SmolLM2


@pytest.fixture(scope="module")
def tok():
    return loading.load_tokenizer()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


IMPLICIT = {"chosen": [user("Hi?"), assistant("Hello!")], "rejected": [user("Hi?"), assistant("Go away.")]}


# ------------------------------------------------------------------------------------------------
# formats


def test_implicit_prompt():
    row = {"chosen": [user("Hi?"), assistant("Hello!"), user("How are you?"), assistant("Well.")],
           "rejected": [user("Hi?"), assistant("Hello!"), user("How are you?"), assistant("Bad.")]}
    prompt, chosen, rejected = data.to_pair(row)
    assert prompt == [user("Hi?"), assistant("Hello!"), user("How are you?")]
    assert (chosen, rejected) == ("Well.", "Bad.")


def test_explicit_prompt_strings():
    prompt, chosen, rejected = data.to_pair({"prompt": "Hi?", "chosen": " Hello!\n", "rejected": "Go away."})
    assert prompt == [user("Hi?")]
    assert (chosen, rejected) == ("Hello!", "Go away.")  # responses are stripped


def test_explicit_prompt_message_lists():
    row = {"prompt": [{"role": "system", "content": "Be kind."}, user("Hi?")],
           "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")], "score": 3}
    prompt, chosen, rejected = data.to_pair(row)
    assert prompt == [{"role": "system", "content": "Be kind."}, user("Hi?")]
    assert (chosen, rejected) == ("Hello!", "Go away.")


def test_extra_message_keys_are_dropped():
    row = {"chosen": [dict(user("Hi?"), name=None), assistant("Hello!")],
           "rejected": [dict(user("Hi?"), name=None), assistant("Go away.")]}
    assert data.to_pair(row)[0] == [user("Hi?")]


def test_jsonl_json_parquet_give_the_same_pairs(tmp_path, capsys):
    rows = [IMPLICIT, {"prompt": "Why?", "chosen": "Because.", "rejected": "No."}]
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", rows)
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"train": rows}))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([IMPLICIT, IMPLICIT]), tmp_path / "pairs.parquet")

    assert [w for w, _ in data.read_rows(jsonl)] == ["pairs.jsonl:1", "pairs.jsonl:2"]
    assert [w for w, _ in data.read_rows(str(tmp_path / "pairs.json"))] == ["pairs.json:[0]", "pairs.json:[1]"]
    assert [w for w, _ in data.read_rows(str(tmp_path / "pairs.parquet"))] == ["pairs.parquet:row 0", "pairs.parquet:row 1"]
    expected = [(p.prompt, p.chosen, p.rejected) for p in data.load_pairs(jsonl)]
    for name in ("pairs.json", "wrapped.json"):
        assert [(p.prompt, p.chosen, p.rejected) for p in data.load_pairs(str(tmp_path / name))] == expected
    parquet_pairs = data.load_pairs(str(tmp_path / "pairs.parquet"))
    assert [(p.prompt, p.chosen, p.rejected) for p in parquet_pairs] == [expected[0], expected[0]]
    assert "pairs.jsonl: 2 rows, 2 pairs kept\n" in capsys.readouterr().out


def test_blank_lines_are_ignored(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n" + json.dumps(IMPLICIT) + "\n\n" + json.dumps(IMPLICIT) + "\n")
    assert [w for w, _ in data.read_rows(str(path))] == ["pairs.jsonl:2", "pairs.jsonl:4"]


# ------------------------------------------------------------------------------------------------
# skip reasons


SKIPPED = {
    "missing field": {"chosen": [user("Hi?"), assistant("Hello!")]},
    "wrong type": {"chosen": "Hello!", "rejected": [user("Hi?"), assistant("Go away.")]},  # no prompt: two lists
    "not a transcript": {"chosen": "Hello!", "rejected": "Go away."},  # no prompt, two strings: transcripts
    "empty response": {"prompt": "Hi?", "chosen": "  ", "rejected": "Go away."},
    "chosen == rejected": {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Hello! "},
    "prompts differ": {"chosen": [user("Hi?"), assistant("Hello!")], "rejected": [user("Yo?"), assistant("No.")]},
    "bad roles": {"chosen": [user("Hi?"), user("Hi?"), assistant("Hello!")],
                  "rejected": [user("Hi?"), user("Hi?"), assistant("No.")]},
    "empty message": {"prompt": "", "chosen": "Hello!", "rejected": "Go away."},
}


@pytest.mark.parametrize("reason", SKIPPED)
def test_skip_reason(reason):
    with pytest.raises(data.Skip) as skip:
        data.to_pair(SKIPPED[reason])
    assert skip.value.reason == reason


@pytest.mark.parametrize("row", [
    {"chosen": [user("Hi?"), assistant("A")], "rejected": [user("Hi?"), user("B")]},         # last not assistant
    {"chosen": [assistant("A"), assistant("B")], "rejected": [assistant("A"), assistant("C")]},  # prompt not user
    {"prompt": [{"role": "robot", "content": "Hi?"}], "chosen": "A", "rejected": "B"},        # unknown role
    {"prompt": [user("Hi?"), {"role": "system", "content": "x"}, user("Hi?")], "chosen": "A", "rejected": "B"},
])
def test_bad_roles(row):
    with pytest.raises(data.Skip, match="bad roles"):
        data.to_pair(row)


def test_skips_are_counted_in_the_summary(tmp_path, capsys):
    rows = [IMPLICIT] + list(SKIPPED.values()) + [SKIPPED["chosen == rejected"]]
    pairs = data.load_pairs(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert len(pairs) == 1 and pairs[0].where == "mixed.jsonl:1"
    assert capsys.readouterr().out == (
        "mixed.jsonl: 10 rows, 1 pairs kept, skipped: chosen == rejected 2, missing field 1, wrong type 1, "
        "not a transcript 1, empty response 1, prompts differ 1, bad roles 1, empty message 1\n")


# ------------------------------------------------------------------------------------------------
# transcripts, as Anthropic/hh-rlhf publishes them


def transcript(*turns):
    r"""The transcript "\n\nHuman: t0\n\nAssistant: t1\n\nHuman: t2..." of turns t0, t1, t2, ..."""
    return "".join(f"\n\n{('Human', 'Assistant')[i % 2]}: {text}" for i, text in enumerate(turns))


def hh_row(*turns, chosen, rejected):
    return {"chosen": transcript(*turns, chosen), "rejected": transcript(*turns, rejected)}


def test_transcript_single_turn():
    row = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}
    assert data.to_pair(row) == ([user("Hi?")], "Hello!", "Go away.")


def test_transcript_multi_turn_keeps_the_earlier_turns_in_the_prompt():
    row = hh_row("Hi?", "Hello!", "How are you?", chosen="Well.", rejected="Bad.")
    assert data.to_pair(row) == ([user("Hi?"), assistant("Hello!"), user("How are you?")], "Well.", "Bad.")


def test_transcript_turns_start_only_at_a_paragraph():
    r"""Text such as "Human:" and "Assistant:" inside a turn stays text; each turn is stripped; the
    first turn may come without its "\n\n"."""
    question = 'He wrote "Human: hi" and then\nAssistant: hello\n\nso what is Human:?'
    row = {"chosen": f"Human: {question}\n\nAssistant:  Nothing. \n",
           "rejected": f"\n\nHuman:   {question}  \n\nAssistant: No idea."}
    assert data.to_pair(row) == ([user(question)], "Nothing.", "No idea.")
    assert data.transcript_messages(transcript("a", "b\n\nHuman:c")) == [user("a"), assistant("b\n\nHuman:c")]


TRANSCRIPT_SKIPS = [
    ("not a transcript", {"chosen": "Hello!", "rejected": "Go away."}),
    ("not a transcript", {"chosen": "Intro" + transcript("Hi?", "A"), "rejected": "Intro" + transcript("Hi?", "B")}),
    ("empty message", hh_row("", chosen="A", rejected="B")),
    ("empty message", hh_row("Hi?", "", "More?", chosen="A", rejected="B")),
    ("empty response", {"chosen": transcript("Hi?", "A"), "rejected": transcript("Hi?") + "\n\nAssistant:"}),
    ("bad roles", hh_row("Hi?", "A", chosen="B", rejected="C")),                 # two Assistant turns last
    ("bad roles", {"chosen": "\n\nHuman: Hi?\n\nHuman: Again?\n\nAssistant: A",  # two Human turns
                   "rejected": "\n\nHuman: Hi?\n\nHuman: Again?\n\nAssistant: B"}),
    ("bad roles", {"chosen": transcript("Hi?", "A", "More?"),                      # ends with a Human turn
                   "rejected": transcript("Hi?", "A", "Less?")}),
    ("bad roles", {"chosen": "\n\nAssistant: Hi.\n\nHuman: Q?\n\nAssistant: A",   # starts with Assistant
                   "rejected": "\n\nAssistant: Hi.\n\nHuman: Q?\n\nAssistant: B"}),
    ("prompts differ", {"chosen": transcript("Hi?", "A", "Q?", "X"), "rejected": transcript("Hi?", "B", "Q?", "Y")}),
    ("chosen == rejected", hh_row("Hi?", chosen="Same.", rejected=" Same."))
]


@pytest.mark.parametrize("reason, row", TRANSCRIPT_SKIPS)
def test_transcript_skip_reason(reason, row):
    with pytest.raises(data.Skip) as skip:
        data.to_pair(row)
    assert skip.value.reason == reason


def test_transcript_rows_in_a_file(tmp_path, capsys):
    rows = [hh_row("Hi?", chosen="Hello!", rejected="Go away."),
            hh_row("Hi?", "Hello!", "How are you?", chosen="Well.", rejected="Bad.")]
    rows += [row for _, row in TRANSCRIPT_SKIPS]
    pairs = data.load_pairs(write_jsonl(tmp_path / "hh.jsonl", rows))
    assert [(p.where, p.chosen) for p in pairs] == [("hh.jsonl:1", "Hello!"), ("hh.jsonl:2", "Well.")]
    assert capsys.readouterr().out == (
        "hh.jsonl: 13 rows, 2 pairs kept, skipped: bad roles 4, not a transcript 2, empty message 2, "
        "empty response 1, prompts differ 1, chosen == rejected 1\n")


REAL_HH = Path(__file__).parents[1] / "../shared/data/hh-rlhf/harmless_test.jsonl"


def test_real_hh_file_read_back_from_transcripts(tmp_path, capsys):
    """The local HH-RLHF file (converted to messages) written back as the hub's transcripts gives
    the same pairs, and its bad rows the same reasons."""
    if not REAL_HH.exists():
        pytest.skip("../shared/data not present")
    messages = data.load_pairs(str(REAL_HH))
    as_messages = capsys.readouterr().out
    rows = [json.loads(line) for line in REAL_HH.read_text().splitlines()]
    hh = [{side: "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in row[side])
           for side in ("chosen", "rejected")} for row in rows]  # roles as they are, broken alternation too
    transcripts = data.load_pairs(write_jsonl(tmp_path / "harmless_test.jsonl", hh))
    assert transcripts == messages
    assert capsys.readouterr().out == as_messages == (
        "harmless_test.jsonl: 2312 rows, 2299 pairs kept, skipped: prompts differ 5, empty response 4, bad roles 4\n")


# ------------------------------------------------------------------------------------------------
# hub data sets: --split and --data-dir reach datasets.load_dataset


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset replaced by one that records its calls and returns two HH rows."""
    import datasets
    calls = []

    def load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return [hh_row("Hi?", chosen="Hello!", rejected="Go away."), hh_row("Yo?", chosen="Hey.", rejected="No.")]
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_read_hub_passes_data_dir(fake_hub, capsys):
    pairs = data.load_pairs("Anthropic/hh-rlhf", "test", data_dir="harmless-base")
    assert fake_hub == [("Anthropic/hh-rlhf", {"data_dir": "harmless-base", "split": "test"})]
    assert [p.where for p in pairs] == ["Anthropic/hh-rlhf/harmless-base[test]:row 0",
                                        "Anthropic/hh-rlhf/harmless-base[test]:row 1"]
    assert capsys.readouterr().out == "Anthropic/hh-rlhf/harmless-base[test]: 2 rows, 2 pairs kept\n"
    data.read_rows("Anthropic/hh-rlhf")
    assert fake_hub[-1] == ("Anthropic/hh-rlhf", {"data_dir": None, "split": "train"})


def test_data_dir_is_ignored_for_a_local_file(fake_hub, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [IMPLICIT])
    assert data.load_pairs(path, "test", data_dir="harmless-base") == data.load_pairs(path)
    assert fake_hub == []


def test_train_py_flags_reach_the_hub(fake_hub, tok):
    import train
    args = train.parse_args(["--data", "Anthropic/hh-rlhf", "--data-dir", "harmless-base", "--split", "test",
                             "--test-data", "Anthropic/hh-rlhf", "--cutoff", "64"])
    train_set, test_set, _ = data.train_and_test_sets(args, tok)
    assert fake_hub == [("Anthropic/hh-rlhf", {"data_dir": "harmless-base", "split": "test"})] * 2
    assert len(train_set) == len(test_set) == 2
    config = {"data": "Anthropic/hh-rlhf", "data_dir": "harmless-base", "split": "test", "test_fraction": 0.5}
    assert len(data.held_out_of(config)) == 1 and fake_hub[-1][1]["data_dir"] == "harmless-base"


def test_hub_error_names_the_folder(monkeypatch):
    import datasets

    def load_dataset(name, **kwargs):
        raise FileNotFoundError(f"Couldn't find any data file at {kwargs['data_dir']}.\nMore lines.")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError) as error:
        data.load_pairs("Anthropic/hh-rlhf", data_dir="harmless-bsae")
    assert str(error.value) == ("Anthropic/hh-rlhf: cannot load data set split 'train' in 'harmless-bsae' "
                                "(Couldn't find any data file at harmless-bsae.)")


# ------------------------------------------------------------------------------------------------
# bad files


def error_of(source):
    with pytest.raises(DataError) as error:
        data.load_pairs(source)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    assert error_of(str(tmp_path / "nope.jsonl")) == f"{tmp_path / 'nope.jsonl'}: no such file"


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert error_of(str(tmp_path / "empty.jsonl")) == "empty.jsonl: empty file"
    (tmp_path / "empty.json").write_text("[]")
    assert error_of(str(tmp_path / "empty.json")) == "empty.json: no rows"


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(IMPLICIT) + "\n" + json.dumps(IMPLICIT) + "\n{'chosen': oops}\n")
    assert error_of(str(path)).startswith("broken.jsonl:3: invalid JSON")
    path.write_text(json.dumps(IMPLICIT) + "\n[1, 2]\n")
    assert error_of(str(path)) == "broken.jsonl:2: expected a JSON object, got list"


def test_not_utf8(tmp_path):
    (tmp_path / "latin.jsonl").write_bytes(json.dumps(IMPLICIT).encode() + b'\n{"chosen": "caf\xe9"}\n')
    assert error_of(str(tmp_path / "latin.jsonl")) == "latin.jsonl:2: not UTF-8 (byte 0xe9)"
    (tmp_path / "latin.json").write_bytes(b'[\n{"chosen": "caf\xe9"}]')
    assert error_of(str(tmp_path / "latin.json")) == "latin.json:2: not UTF-8 (byte 0xe9)"


@pytest.mark.parametrize("content", ['{"rows": []}', '"text"', '[1, 2]'])
def test_json_of_wrong_shape(tmp_path, content):
    (tmp_path / "shape.json").write_text(content)
    assert error_of(str(tmp_path / "shape.json")).startswith("shape.json: expected a list of objects")


def test_unknown_suffix_and_bad_parquet(tmp_path):
    (tmp_path / "pairs.txt").write_text("hello")
    assert "unknown file type" in error_of(str(tmp_path / "pairs.txt"))
    (tmp_path / "bad.parquet").write_text("not parquet at all")
    assert error_of(str(tmp_path / "bad.parquet")).startswith("bad.parquet: cannot read as parquet (")


def test_no_expected_keys(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Hi?", "answer": "Hello!"}] * 2)
    assert error_of(path) == "qa.jsonl: no 'chosen'/'rejected' fields (first row at qa.jsonl:1 has keys ['answer', 'question'])"


def test_no_usable_pair(tmp_path, capsys):
    path = write_jsonl(tmp_path / "same.jsonl", [SKIPPED["chosen == rejected"]] * 3)
    assert error_of(path) == "same.jsonl: no usable preference pair (first skipped: same.jsonl:1: chosen == rejected)"
    assert capsys.readouterr().out == "same.jsonl: 3 rows, 0 pairs kept, skipped: chosen == rejected 3\n"


def test_hub_name_that_cannot_be_loaded(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    message = error_of("no-such-user/no-such-preference-data")
    assert message.startswith("no-such-user/no-such-preference-data: cannot load data set split 'train' (")


# ------------------------------------------------------------------------------------------------
# split by prompt


def make_pairs(n_prompts, per_prompt):
    return [Pair([user(f"question {q}")], f"good {k}", f"bad {k}", f"x:{q}.{k}")
            for q in range(n_prompts) for k in range(per_prompt)]


def test_split_by_prompt():
    pairs = make_pairs(20, 4)
    train, test = data.split_by_prompt(pairs, 0.25, seed=0)
    train_prompts = {p.prompt[0]["content"] for p in train}
    test_prompts = {p.prompt[0]["content"] for p in test}
    assert not train_prompts & test_prompts
    assert len(test_prompts) == 5 and len(test) == 20
    assert sorted(train + test, key=lambda p: p.where) == sorted(pairs, key=lambda p: p.where)
    assert data.split_by_prompt(pairs, 0.25, seed=0) == (train, test)
    assert data.split_by_prompt(pairs, 0.25, seed=1) != (train, test)


def test_split_keeps_a_prompt_on_each_side():
    train, test = data.split_by_prompt(make_pairs(2, 3), 0.01, seed=0)
    assert len(train) == 3 and len(test) == 3
    train, test = data.split_by_prompt(make_pairs(2, 3), 0.99, seed=0)
    assert len(train) == 3 and len(test) == 3
    assert data.split_by_prompt(make_pairs(5, 2), 0.0, seed=0) == (make_pairs(5, 2), [])


def test_held_out_of_a_saved_run_is_the_split_train_py_made(tmp_path):
    pairs = make_pairs(20, 2)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in pairs))
    split = data.split_by_prompt(data.load_pairs(str(path)), 0.25, 3)
    config = {"data": str(path), "test_fraction": 0.25, "split_seed": 3, "seed": 7}
    assert data.held_out_of(config) == split[1]  # the training seed (7) does not move the split
    assert data.held_out_of({**config, "seed": 0}) == split[1]
    older = {"data": str(path), "test_fraction": 0.25, "seed": 3}  # saved before --split-seed: its seed split
    assert data.held_out_of(older) == split[1]
    assert data.held_out_of({**config, "test_data": str(path)}) == data.load_pairs(str(path))


# ------------------------------------------------------------------------------------------------
# tokenizing


PAIR = Pair([user("What is the capital of France?")], "Paris is the capital of France.", "I don't know.", "t:1")


def prompt_ids_of(tok, prompt):
    return list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"])


def test_tokenize_pair_masks_the_prompt(tok):
    example = data.tokenize_pair(tok, PAIR, cutoff=512)
    prompt_ids = prompt_ids_of(tok, PAIR.prompt)
    n = len(prompt_ids)
    for side, text in (("chosen", PAIR.chosen), ("rejected", PAIR.rejected)):
        ids, labels = example[f"{side}_ids"], example[f"{side}_labels"]
        assert len(ids) == len(labels)
        assert ids[:n] == prompt_ids
        assert labels[:n] == [IGNORE] * n
        assert IGNORE not in labels[n:] and labels[n:] == ids[n:]  # the first response token is labelled
        assert ids[-1] == EOS and ids.count(EOS) == prompt_ids.count(EOS) + 1  # nothing after EOS
        assert tok.decode(ids[n:]) == text + "<|im_end|>"


def test_truncation_keeps_end_of_prompt_and_start_of_response(tok):
    long_pair = Pair([user("word " * 100 + "LAST QUESTION?")], "yes " * 100, "no", "t:2")
    prompt_ids = prompt_ids_of(tok, long_pair.prompt)
    example = data.tokenize_pair(tok, long_pair, cutoff=64)
    ids, labels = example["chosen_ids"], example["chosen_labels"]
    assert len(ids) == 64 and labels.count(IGNORE) == 32
    assert ids[:32] == prompt_ids[-32:]
    assert ids[32:] == data.tokenize_pair(tok, long_pair, cutoff=4096)["chosen_ids"][len(prompt_ids):][:32]
    assert len(example["rejected_ids"]) < 64 and example["rejected_ids"][-1] == EOS
    short = data.tokenize_pair(tok, long_pair, cutoff=64, max_prompt=10)
    assert short["chosen_ids"][:10] == prompt_ids[-10:] and len(short["chosen_ids"]) == 64


def test_a_response_loses_tokens_only_past_the_cutoff(tok):
    pair = Pair([user("Hi")], "Hello there, how can I help you today?", "Hm.", "t:5")
    whole = data.tokenize_pair(tok, pair, cutoff=512)
    n = len(whole["chosen_ids"])
    fits = data.tokenize_pair(tok, pair, cutoff=n, max_prompt=n)  # the answer and its EOS just fit
    assert fits["chosen_ids"] == whole["chosen_ids"]
    short = data.tokenize_pair(tok, pair, cutoff=n - 1, max_prompt=n)  # its EOS does not
    assert short["chosen_ids"] == whole["chosen_ids"][:-1] and short["rejected_ids"] == whole["rejected_ids"]


def test_tokenize_pairs_in_chunks_equals_the_template_one_text_at_a_time(tok):
    """The batched path renders, then encodes many texts in one call; the ids must be those of
    apply_chat_template(tokenize=True) on each text, across chunk borders and with skipped pairs."""
    system = {"role": "system", "content": "Be brief."}
    pairs = [PAIR, Pair([system, user("Hi  there\n\n")], "Hello!", "Hm.", "t:3"),
             Pair([user("word " * 80)], "yes", "no", "t:4"),  # a prompt that fills the cutoff: None
             Pair([user("a"), assistant("b"), user("c?")], "d é ü 😀", "e", "t:5"),
             Pair([user("Why?")], "Because " * 30, "No.", "t:6")]
    examples = data.tokenize_pairs(tok, pairs, cutoff=64, max_prompt=64, chunk=2)
    assert len(examples) == len(pairs) and examples[2] is None
    for pair, example in zip(pairs[:2] + pairs[3:], examples[:2] + examples[3:]):
        prompt_ids = prompt_ids_of(tok, pair.prompt)
        for side, text in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            full = tok.apply_chat_template(pair.prompt + [assistant(text)], tokenize=True)["input_ids"]
            response = list(full[len(prompt_ids):])
            response = response[:response.index(EOS) + 1][:64 - len(prompt_ids)]
            assert example[f"{side}_ids"] == prompt_ids + response
            assert example[f"{side}_labels"] == [IGNORE] * len(prompt_ids) + response


def test_prompt_filling_the_cutoff_gives_none(tok):
    assert data.tokenize_pair(tok, PAIR, cutoff=16, max_prompt=16) is None
    assert data.tokenize_pair(tok, PAIR, cutoff=16, max_prompt=15) is not None


def test_template_that_breaks_the_prefix(tok):
    broken = copy.copy(tok)
    broken.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                            "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    with pytest.raises(DataError, match=r"does not keep the prompt as a prefix of the conversation \(t:1\)"):
        data.tokenize_pair(broken, PAIR, cutoff=512)


# ------------------------------------------------------------------------------------------------
# batching


def test_collate(tok):
    pairs = [PAIR, Pair([user("Hi")], "Hello there, how can I help you today?", "Hm.", "t:3")]
    examples = [data.tokenize_pair(tok, pair, cutoff=512) for pair in pairs]
    batch = data.collate(examples, pad_id=tok.pad_token_id)
    order = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    T = max(len(ids) for ids in order)
    for name in ("input_ids", "attention_mask", "labels"):
        assert batch[name].shape == (4, T) and batch[name].dtype == torch.long
    for i, ids in enumerate(order):
        n = len(ids)
        assert batch["input_ids"][i, :n].tolist() == ids
        assert batch["input_ids"][i, n:].eq(tok.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert batch["labels"][i, n:].eq(IGNORE).all()
    assert batch["labels"][0, :len(order[0])].tolist() == examples[0]["chosen_labels"]
    assert batch["labels"][3, :len(order[3])].tolist() == examples[1]["rejected_labels"]
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_pair_dataset_drops_long_prompts(tok, capsys):
    long_pair = Pair([user("word " * 200)], "yes", "no", "t:4")
    dataset = data.PairDataset(tok, [PAIR, long_pair], cutoff=128, max_prompt=128)
    assert len(dataset) == 1 and dataset[0] == data.tokenize_pair(tok, PAIR, 128, 128)
    assert "1 of 2 pairs dropped: prompt too long" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"no pair fits .* \(first: t:4\)"):
        data.PairDataset(tok, [long_pair], cutoff=128, max_prompt=128)


def test_pair_dataset_counts_the_prompts_it_cuts(tok, capsys):
    """A prompt longer than max_prompt keeps its end and the pair stays; the one line says how many."""
    n = data.tokenize_pair(tok, PAIR, 4096, 4096)["chosen_labels"].count(IGNORE)  # PAIR's prompt tokens
    long_pair = Pair([user("word " * 40)], "yes", "no", "t:5")
    dataset = data.PairDataset(tok, [PAIR, long_pair], cutoff=n + 64, max_prompt=n)
    assert len(dataset) == 2 and [e["prompt_cut"] for e in dataset] == [False, True]
    assert dataset[1]["chosen_labels"].count(IGNORE) == n
    assert f"1 of 2 prompts cut to their last {n} tokens" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# real data


def test_real_dsp_file(tok, capsys):
    if not REAL_DSP.exists():
        pytest.skip("../shared/data not present")
    pairs = data.load_pairs(str(REAL_DSP))
    assert len(pairs) == 2599
    assert capsys.readouterr().out == (
        "dsp_academy_pairs.jsonl: 2644 rows, 2599 pairs kept, skipped: chosen == rejected 44, empty response 1\n")
    train, test = data.split_by_prompt(pairs, 0.1, seed=0)
    assert len(train) + len(test) == 2599
    assert not {p.prompt[0]["content"] for p in train} & {p.prompt[0]["content"] for p in test}
    dataset = data.PairDataset(tok, pairs[:200], cutoff=512)  # the template keeps the prefix on real text
    assert all(e["chosen_ids"][:e["chosen_labels"].count(IGNORE)] == e["rejected_ids"][:e["rejected_labels"].count(IGNORE)]
               for e in dataset.examples)
