"""Preference pairs for one DSP domain, from the data set as its authors publish it.

DSP (Cheng et al. 2023, "Everyone Deserves A Reward: Learning Customized Human Preferences") is
published in the GitHub repository Linear95/DSP, as data/domain_specific_preference.train.json and
data/domain_specific_preference.test.json: a JSON list of queries, each answered in five styles,

    {"query": str, "responses": {"academy": str, "business": str, "entertainment": str,
                                 "literature": str, "normal": str}}

The Q-Adapter paper customises a model to one domain at a time: that domain's answer is preferred
to each of the other four, so a query gives 4 pairs, written one a line (the other styles in the
order above) in the conversational format train.py reads (data.py, section 4):

    {"chosen":   [{"role": "user", "content": query}, {"role": "assistant", "content": the domain's answer}],
     "rejected": [{"role": "user", "content": query}, {"role": "assistant", "content": another answer}]}

The query and the answers are stripped of surrounding whitespace. A pair is dropped when its two
answers are the same or one is empty (it would teach nothing), and when its row has no query or
lacks one of its two answers. One line at the end counts the queries, the pairs written and the pairs
dropped by reason (4 pairs a query: written + dropped = 4 x queries). A file that is not a list of
{"query", "responses": {...}} rows is refused with one line naming the row (exit code 2). The
output is written whole or not at all.

    python dsp_pairs.py domain_specific_preference.train.json --domain academy --out dsp_academy_train.jsonl
    python dsp_pairs.py domain_specific_preference.test.json --domain academy --out dsp_academy_test.jsonl
    python train.py --data dsp_academy_train.jsonl --test-data dsp_academy_test.jsonl ...
"""
import argparse
import json
import os
from collections import Counter
from pathlib import Path

from support import cli
from support.data_files import DataError, read_rows

STYLES = ("academy", "business", "entertainment", "literature", "normal")  # the answers of each query
DOMAINS = STYLES[:4]  # the paper's targets; "normal" is the plain answer, always a rejected side


def build_parser():
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a DSP file as published: domain_specific_preference.{train,test}.json")
    ap.add_argument("--domain", required=True, choices=DOMAINS,
                    help="the preferred style: its answer is chosen, each of the other four is rejected "
                         "(normal, the plain answer, is not a target: it is what the four styles depart from)")
    ap.add_argument("--out", required=True, help="the pairs, one JSON object a line (.jsonl)")
    return ap


def query_pairs(where: str, row: dict, domain: str, dropped: Counter) -> list[dict]:
    """The 4 pairs of one query (domain's answer chosen, each other style's rejected), less those
    that teach nothing, counted in `dropped` by reason. A row not shaped as DSP's: SystemExit."""
    responses = row.get("responses")
    if not isinstance(responses, dict):
        raise SystemExit(f"error: {where}: expected a 'responses' object with the answers {', '.join(STYLES)}")
    query = _text(where, row, "query")
    answers = {style: _text(where, responses, style) for style in STYLES}
    pairs = []
    for other in (style for style in STYLES if style != domain):
        reason = drop_reason(query, answers[domain], answers[other], domain, other)
        if reason:
            dropped[reason] += 1
            continue
        user = {"role": "user", "content": query}
        pairs.append({"chosen": [user, {"role": "assistant", "content": answers[domain]}],
                      "rejected": [user, {"role": "assistant", "content": answers[other]}]})
    return pairs


def _text(where, fields, key):
    """fields[key] stripped; None when absent or null; a value that is not a string: SystemExit."""
    value = fields.get(key)
    if value is not None and not isinstance(value, str):
        raise SystemExit(f"error: {where}: field '{key}' should be a string, got {type(value).__name__}")
    return None if value is None else value.strip()


def drop_reason(query, chosen, rejected, domain, other):
    """Why the pair (query, chosen, rejected) is dropped, or None to keep it."""
    if not query:
        return "no query"
    if chosen is None or rejected is None:
        return f"no {domain if chosen is None else other} answer"
    if not chosen or not rejected:
        return "empty answer"
    if chosen == rejected:
        return "identical answers"
    return None


def write_atomically(out: Path, pairs: list[dict]):
    """One pair a line, through a temporary file in the same folder: a reader never sees half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(pair) + "\n" for pair in pairs)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"error: {out}: cannot write ({e.strerror})") from None


def main(argv=None):
    args = build_parser().parse_args(argv)
    source, out = Path(args.source), Path(args.out)
    if not source.is_file():
        raise SystemExit(f"error: {source}: no such file")
    if out.exists() and os.path.samefile(out, source):
        raise SystemExit(f"error: --out {out} is the input file: give another name")
    try:
        rows = read_rows(str(source))
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    pairs, dropped = [], Counter()
    for where, row in rows:
        pairs += query_pairs(where, row, args.domain, dropped)
    why = ", ".join(f"{reason} {n}" for reason, n in dropped.most_common()) or "none"
    if not pairs:
        raise SystemExit(f"error: {source.name}: no usable {args.domain} pair in {len(rows)} queries (dropped: {why})")
    write_atomically(out, pairs)
    print(f"{len(rows)} queries → {len(pairs)} pairs written to {out}; dropped: {why}")


if __name__ == "__main__":
    cli.run(main)
