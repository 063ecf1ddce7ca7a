"""Reading preference data into rows: local .jsonl / .json / .parquet files and hub data sets.

`read_rows(source)` returns (where, row) pairs; `where` names the row for messages: "pairs.jsonl:17"
(jsonl line, 1-based), "pairs.json:[3]" (list index), "x.parquet:row 5", "name[train]:row 5" or,
with a data_dir, "name/harmless-base[train]:row 5" (row index, 0-based). A file that cannot be read
raises DataError, one line naming the file (and line) at fault. What a row must hold is data.py's
business (data.to_pair).
"""
import json
from pathlib import Path

FILE_FORMATS = (".jsonl", ".json", ".parquet")


class DataError(Exception):
    """A one-line, user-facing message naming the file (and line or field) at fault."""


def read_rows(source: str, split: str = "train", data_dir: str | None = None) -> list[tuple[str, dict]]:
    """(where, row) for every row of a local .jsonl / .json / .parquet file or a hub data set.
    `split` and `data_dir` (the folder inside the data set's repository, e.g. "harmless-base" for
    Anthropic/hh-rlhf) are used for hub data sets only; a local file ignores them."""
    path = Path(source)
    name = label(source, split, data_dir)
    if path.suffix in FILE_FORMATS:
        if not path.is_file():
            raise DataError(f"{source}: no such file")
        rows = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}[path.suffix](path)
    elif path.is_file():
        raise DataError(f"{source}: unknown file type (expected {', '.join(FILE_FORMATS)})")
    else:
        rows = _read_hub(source, split, data_dir)
    if not rows:
        raise DataError(f"{name}: no rows")
    return rows


def label(source, split, data_dir=None):
    """How messages name the source: the file name, or "name[split]" ("name/data_dir[split]") for a
    hub data set."""
    path = Path(source)
    if path.suffix in FILE_FORMATS:
        return path.name
    return f"{source}/{data_dir}[{split}]" if data_dir else f"{source}[{split}]"


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


def _read_hub(name, split, data_dir=None):
    import datasets

    where = label(name, split, data_dir)
    try:
        data = datasets.load_dataset(name, data_dir=data_dir, split=split)
    except Exception as e:  # the library raises many kinds; the user needs only its first line
        folder = f" in {data_dir!r}" if data_dir else ""
        raise DataError(f"{name}: cannot load data set split {split!r}{folder} ({_first_line(e)})") from None
    return [(f"{where}:row {i}", row) for i, row in enumerate(data)]


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__

