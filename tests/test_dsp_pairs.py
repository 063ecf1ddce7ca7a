"""dsp_pairs.py: DSP as published (a list of queries with five answers) -> one domain's preference pairs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import dsp_pairs
from support import cli
from tests.conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = SHARED_DATA / "dsp" / "domain_specific_preference_sample.json"
ACADEMY_PAIRS = SHARED_DATA / "dsp" / "dsp_academy_pairs.jsonl"
NO_SAMPLE = "needs ../shared/data/dsp (the DSP sample and pair files) beside the repository"


def answers(**changes):
    """The five answers of a query, named after their style, with some changed."""
    return {**{style: f"{style} answer" for style in dsp_pairs.STYLES}, **changes}


def conversation(query, answer):
    return [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]


def convert(tmp_path, rows, capsys, domain="academy"):
    """Runs the script on rows (written as a .json list): (exit code, the pairs written or None,
    stdout, stderr)."""
    source, out = tmp_path / "dsp.json", tmp_path / "pairs.jsonl"
    source.write_text(json.dumps(rows))
    try:
        cli.run(dsp_pairs.main, [str(source), "--domain", domain, "--out", str(out)])
        code = 0
    except SystemExit as e:
        code = e.code
    pairs = [json.loads(line) for line in out.read_text().splitlines()] if code == 0 else None
    printed = capsys.readouterr()
    return code, pairs, printed.out, printed.err


def test_four_pairs_a_query_in_style_order(tmp_path, capsys):
    code, pairs, out, _ = convert(tmp_path, [{"query": "Q?", "responses": answers()}], capsys, "business")
    assert code == 0
    assert pairs == [{"chosen": conversation("Q?", "business answer"), "rejected": conversation("Q?", f"{s} answer")}
                     for s in ("academy", "entertainment", "literature", "normal")]
    assert list(pairs[0]) == ["chosen", "rejected"] and list(pairs[0]["chosen"][0]) == ["role", "content"]
    assert out == f"1 queries → 4 pairs written to {tmp_path / 'pairs.jsonl'}; dropped: none\n"


def test_what_is_dropped_and_counted(tmp_path, capsys):
    rows = [
        {"query": " Q1?\n", "responses": answers(academy="\n A1 ", normal="  N1\n")},  # stripped, all kept
        {"query": "Q2?", "responses": answers(business="", literature="   ")},        # 2 empty answers
        {"query": "Q3?", "responses": answers(entertainment="academy answer ")},        # identical after strip
        {"query": "Q4?", "responses": {s: a for s, a in answers().items() if s != "academy"}},  # no academy
        {"query": "Q5?", "responses": answers(normal=None)},                            # no normal answer
        {"responses": answers()},                                                        # no query
        {"query": "  ", "responses": answers()},                                         # blank query
        {"query": "Q8?", "responses": answers(academy="")},                              # every pair: empty
    ]
    code, pairs, out, _ = convert(tmp_path, rows, capsys)
    assert code == 0
    others = ("business", "entertainment", "literature", "normal")
    expected = [("Q1?", "A1", a if a != "normal answer" else "N1") for a in (f"{s} answer" for s in others)]
    expected += [("Q2?", "academy answer", a) for a in ("entertainment answer", "normal answer")]
    expected += [("Q3?", "academy answer", a) for a in ("business answer", "literature answer", "normal answer")]
    expected += [("Q5?", "academy answer", a) for a in ("business answer", "entertainment answer", "literature answer")]
    assert pairs == [{"chosen": conversation(q, c), "rejected": conversation(q, r)} for q, c, r in expected]
    assert out == (f"8 queries → 12 pairs written to {tmp_path / 'pairs.jsonl'}; dropped: no query 8, "
                   f"empty answer 6, no academy answer 4, identical answers 1, no normal answer 1\n")
    assert 12 + 8 + 6 + 4 + 1 + 1 == 4 * len(rows)


def test_the_output_reads_as_pairs(tmp_path, capsys):
    import data
    rows = [{"query": f"Q{i}?", "responses": answers(academy=f"A{i}")} for i in range(3)]
    convert(tmp_path, rows, capsys)
    pairs = data.load_pairs(str(tmp_path / "pairs.jsonl"))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs[:2]] == [
        ([{"role": "user", "content": "Q0?"}], "A0", "business answer"),
        ([{"role": "user", "content": "Q0?"}], "A0", "entertainment answer")]
    assert len(pairs) == 12


# ------------------------------------------------------------------------------------------------
# bad input: one line, exit code 2, nothing written


@pytest.mark.parametrize("rows, message", [
    ({"query": "Q?"}, 'dsp.json: expected a list of objects (or {"data": [...]}, {"train": [...]})'),
    ([{"query": "Q?", "responses": answers()}, {"query": "Q?"}],
     "dsp.json:[1]: expected a 'responses' object with the answers academy, business, entertainment, "
     "literature, normal"),
    ([{"query": "Q?", "responses": ["a", "b"]}], "dsp.json:[0]: expected a 'responses' object"),
    ([{"query": 7, "responses": answers()}], "dsp.json:[0]: field 'query' should be a string, got int"),
    ([{"query": "Q?", "responses": answers(business=["x"])}],
     "dsp.json:[0]: field 'business' should be a string, got list"),
    ([{"query": "Q?", "responses": answers(academy=" ")}],
     "dsp.json: no usable academy pair in 1 queries (dropped: empty answer 4)"),
])
def test_bad_rows(tmp_path, capsys, rows, message):
    code, _, out, err = convert(tmp_path, rows, capsys)
    assert code == 2 and out == "" and not (tmp_path / "pairs.jsonl").exists()
    assert err.startswith("error: " + message) and err.count("\n") == 1


def test_bad_file_and_flags(tmp_path, capsys):
    source = tmp_path / "dsp.json"
    source.write_text(json.dumps([{"query": "Q?", "responses": answers()}]))
    cases = [([str(tmp_path / "nope.json"), "--domain", "academy", "--out", "x.jsonl"],
              f"error: {tmp_path / 'nope.json'}: no such file"),
             ([str(source), "--domain", "academy", "--out", str(source)],
              f"error: --out {source} is the input file: give another name"),
             ([str(source), "--domain", "normal", "--out", "x.jsonl"],
              "error: argument --domain: invalid choice: 'normal'")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            cli.run(dsp_pairs.main, argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert json.loads(source.read_text())[0]["query"] == "Q?"  # the input is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dsp.json"]


def test_a_failed_write_leaves_no_file(tmp_path, capsys, monkeypatch):
    """The pairs go to a temporary file, renamed over --out at the end: a failure leaves neither."""
    (tmp_path / "pairs.jsonl").write_text("the old pairs\n")

    def full_disk(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(dsp_pairs.os, "replace", full_disk)
    code, _, _, err = convert(tmp_path, [{"query": "Q?", "responses": answers()}], capsys)
    assert code == 2 and err == f"error: {tmp_path / 'pairs.jsonl'}: cannot write (No space left on device)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dsp.json", "pairs.jsonl"]
    assert (tmp_path / "pairs.jsonl").read_text() == "the old pairs\n"


# ------------------------------------------------------------------------------------------------
# the published format: the sample of the test file, against the pair files built from it


@pytest.mark.skipif(not SAMPLE.is_file() or not ACADEMY_PAIRS.is_file(), reason=NO_SAMPLE)
def test_the_sample_gives_the_lines_of_the_academy_pair_file(tmp_path):
    """The sample is 12 queries of the test file (its first 13 less the 8th); its academy pairs are,
    byte for byte and in order, the lines the pair file holds for those queries."""
    out = tmp_path / "academy.jsonl"
    done = subprocess.run([sys.executable, str(ROOT / "dsp_pairs.py"), str(SAMPLE), "--domain", "academy",
                           "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"12 queries → 48 pairs written to {out}; dropped: none\n" and done.stderr == ""
    ours = out.read_text().splitlines()
    published = ACADEMY_PAIRS.read_text().splitlines()
    queries = [row["query"] for row in json.loads(SAMPLE.read_text())]
    assert ours == [line for line in published if json.loads(line)["chosen"][0]["content"] in queries]
    assert ours == published[:28] + published[32:52]

    import data
    assert len(data.load_pairs(str(out))) == 48
