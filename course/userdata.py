"""Your own data: read a JSONL or CSV export, validate every row, split it without leakage.

Two row shapes are accepted, the two that TRL's SFTTrainer trains on:
- prompt/completion pairs: `{"prompt": "lights off", "completion": "lights(level=0)"}` (JSONL,
  or a CSV with the columns prompt and completion);
- chat messages: `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}`,
  ending with the assistant turn the model should learn.

Every row becomes chat messages (a pair becomes one user and one assistant turn, after an
optional system message). Nothing is dropped silently: a bad row raises a `UserDataError`
naming its line and field, or, with `errors="skip"`, lands in `skipped` with that reason.
Examples longer than `max_length` tokens are counted and refused unless asked to drop or
truncate them: the trainer would otherwise cut the sequence at max_length, and a cut
answer loses its end-of-turn token, so the model never learns to stop there.
Files are read as spreadsheets and databases export them (`read_text`, `read_rows`): UTF-8 with or
without a BOM, UTF-16 with one, another encoding when named; CSV with , ; or tab; no file without rows.
Worked example: a file with lines `{"prompt": "a", "completion": "b"}` and `{"prompt": "", "completion": "b"}`
-> with errors="skip": 1 example, skipped [Skipped(line=2, field='prompt', reason='empty')].
"""

import codecs
import csv
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "user", "assistant")
TOO_LONG = ("error", "drop", "truncate")
# Byte order marks that name a UTF-16 file (Unicode standard, section 23.8); UTF-8's is just dropped.
UTF16_BOMS = ((codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
DELIMITERS = (",", ";", "\t")
DEFAULT_DELIMITER = {".csv": ",", ".tsv": "\t"}  # when the header line holds none (a single column)
RESAVE = (  # how each tool writes UTF-8
    "Save it as UTF-8 (Excel: Save As > 'CSV UTF-8 (Comma delimited)'; LibreOffice: Save As > "
    "Edit filter settings > Character set 'Unicode (UTF-8)'; Notepad: Save As > Encoding 'UTF-8')"
)


class UserDataError(ValueError):
    """One bad row: `line` (1-based, as an editor shows it), `field`, `reason`."""

    def __init__(self, line: int, field: str | None, reason: str):
        self.line, self.field, self.reason = line, field, reason
        where = f"line {line}" + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class Skipped:
    line: int
    field: str | None
    reason: str
    raw: str  # the row as it was in the file, so nothing is lost


@dataclass
class UserData:
    examples: list[dict] = field(default_factory=list)  # {"line": int, "messages": [...]}
    skipped: list[Skipped] = field(default_factory=list)
    too_long: list[int] = field(default_factory=list)  # lines longer than max_length (whatever was done)
    truncated: list[int] = field(default_factory=list)  # lines whose last user turn was shortened
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (line, line of its first copy)

    def summary(self) -> str:
        return (
            f"{len(self.examples)} examples, {len(self.skipped)} skipped, {len(self.too_long)} longer than "
            f"max_length ({len(self.truncated)} truncated), {len(self.duplicates)} exact duplicates"
        )


def _text(value, line: int, name: str) -> str:
    if not isinstance(value, str):
        raise UserDataError(line, name, f"expected a string, got {type(value).__name__} {value!r:.40}")
    if not value.strip():
        raise UserDataError(line, name, "empty")
    return value


def to_messages(row, line: int, system: str | None = None) -> list[dict]:
    """One row (a dict from JSON or CSV) as chat messages; UserDataError names what is wrong."""
    if not isinstance(row, dict):
        raise UserDataError(line, None, f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        turns = row["messages"]
        if not isinstance(turns, list) or not turns:
            raise UserDataError(line, "messages", "expected a non-empty list of {role, content} objects")
        messages = []
        for i, turn in enumerate(turns):
            where = f"messages[{i}]"
            if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
                raise UserDataError(line, where, "expected an object with 'role' and 'content'")
            if turn["role"] not in ROLES:
                raise UserDataError(line, f"{where}.role", f"expected one of {ROLES}, got {turn['role']!r}")
            messages.append(
                {"role": turn["role"], "content": _text(turn["content"], line, f"{where}.content")}
            )
        if messages[-1]["role"] != "assistant":
            raise UserDataError(line, "messages", "the last turn must be the assistant's answer to learn")
        if not any(m["role"] == "user" for m in messages):
            raise UserDataError(line, "messages", "no user turn")
        if system is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        return messages
    for name in ("prompt", "completion"):
        if name not in row:
            raise UserDataError(
                line,
                name,
                f"missing (a row needs 'messages', or 'prompt' and 'completion'; got {sorted(row)})",
            )
    prompt, completion = _text(row["prompt"], line, "prompt"), _text(row["completion"], line, "completion")
    head = [] if system is None else [{"role": "system", "content": system}]
    return [*head, {"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def _line_of(before: str) -> int:  # the line after `before`, counted as the readers below count them
    return len(io.StringIO(before + "x", newline="").readlines())


def read_text(path: str | Path, encoding: str | None = None) -> str:
    """The file's text; a ValueError names the line and byte offset where it is not in its encoding.

    Default: UTF-16 after a UTF-16 byte order mark (Excel's "Unicode Text", PowerShell 5's `>`), else
    UTF-8; a leading BOM is dropped (Excel's "CSV UTF-8" and Notepad write one; json and csv keep it).
    Nothing is guessed: cp1252 (older Excel's plain "CSV") decodes any bytes, so a wrong guess would
    turn 'é' into 'Ã©' silently; a learner whose file is in another encoding names it.
    """
    path, data = Path(path), Path(path).read_bytes()
    encoding = encoding or next((name for bom, name in UTF16_BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(encoding)
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r}; expected a codec name such as 'cp1252'") from None
    except UnicodeDecodeError as err:
        bad, line = data[err.start : err.end], _line_of(data[: err.start].decode(encoding, "replace"))
        near = data[max(data.rfind(b"\n", 0, err.start) + 1, err.start - 20) : err.end + 20].splitlines()[0]
        seen_as = (
            ""
            if codecs.lookup(encoding).name == "cp1252"
            else f": there {bad!r} is {bad.decode('cp1252', 'replace')!r}"
        )
        raise ValueError(
            f"{path.name} is not {encoding}: line {line}, byte offset {err.start}: {bad!r} ({err.reason}) "
            f"in {near!r}. {RESAVE}, or pass the encoding it was saved in, e.g. encoding='cp1252' "
            f"(Windows-1252, what older Excel writes{seen_as})."
        ) from None
    if "\x00" in text:  # decodes as UTF-8, but is UTF-16 without its BOM (SQL Server's `bcp -w` writes it)
        where = _line_of(text[: text.index("\x00")])
        raise ValueError(
            f"{path.name}: line {where} holds NUL bytes, as UTF-16 without a BOM does. "
            f"{RESAVE}, or pass encoding='utf-16-le'."
        )
    return text.removeprefix("\ufeff")


def _jsonl_rows(text: str):
    for line, raw in enumerate(io.StringIO(text, newline=""), start=1):
        if not raw.strip():
            continue  # a blank line (often the last) holds no example
        raw = raw.rstrip("\r\n")
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            # json's messages either end in "at" ("Unterminated string starting at") or need one
            at = "" if err.msg.endswith(" at") else " at"
            row = UserDataError(line, None, f"malformed JSON ({err.msg}{at} column {err.colno})")
        yield line, row, raw


def _csv_rows(text: str, suffix: str):
    f = io.StringIO(text, newline="")
    head = f.readline()
    counts = [re.sub(r'"[^"]*"', "", head).count(d) for d in DELIMITERS]  # not those inside quoted names
    delimiter = DELIMITERS[counts.index(max(counts))] if max(counts) else DEFAULT_DELIMITER[suffix]
    header = next(csv.reader([head], delimiter=delimiter), [])
    names = [name.strip().lower() for name in header]
    for name in ("completion", "prompt"):
        if names.count(name) != 1:
            problem = "missing column" if name not in names else "column appears twice"
            raise UserDataError(
                1,
                name,
                f"{problem}; expected the columns prompt and completion (any case, spaces around them "
                f"ignored) separated by ',', ';' or a tab; the header has {header}",
            )
    reader, start = csv.reader(f, delimiter=delimiter), 2
    for record in reader:  # line_num: the physical line where this record ended (quoted newlines span lines)
        line, start = start, reader.line_num + 2
        if not any(value.strip() for value in record):
            continue  # a blank line, or ";;" where a spreadsheet row was cleared
        record = [value.replace("\r\n", "\n") for value in record]  # a CRLF file's ending inside quotes
        row = {name: record[i] for name in ("prompt", "completion") if (i := names.index(name)) < len(record)}
        if any(value.strip() for value in record[len(header) :]):  # `a,f(x, y)` would be cut silently
            reason = f"{len(record)} fields but {len(header)} columns: quote a field holding {delimiter!r}"
            yield line, UserDataError(line, None, reason), json.dumps(record)
        else:
            yield line, row, json.dumps(dict(zip(header, record, strict=False)))


def read_rows(path: str | Path, encoding: str | None = None):
    """(line, parsed row or UserDataError, raw text) for each row of a .jsonl, .csv or .tsv file.

    CSV as spreadsheets write it: the delimiter is whichever of , ; and tab the header line holds most
    (Excel writes ';' where the decimal mark is a comma; "Unicode Text" is tab-separated); quoted fields
    may hold delimiters and newlines; column names match after strip() and lower() ("Prompt ",
    "COMPLETION"), as hand-typed headers vary. A file without a row is an export gone wrong: refused.
    """
    path = Path(path)
    if (suffix := path.suffix.lower()) not in (".jsonl", *DEFAULT_DELIMITER):  # Windows writes ROWS.CSV
        raise ValueError(f"expected a .jsonl or .csv file (or a tab-separated .tsv), got {path.name}")
    text = read_text(path, encoding)
    rows = _jsonl_rows(text) if suffix == ".jsonl" else _csv_rows(text, suffix)
    if not text.strip() or (first := next(rows, None)) is None:  # a CSV's header is checked after this
        found = "0 bytes" if not text else "only blank lines" if not text.strip() else "only the header"
        expected = (
            'one JSON object per line, such as {"prompt": "lights off", "completion": "lights(level=0)"}'
            if suffix == ".jsonl"
            else "a header line with the columns prompt and completion, then one row per example"
        )
        raise ValueError(f"{path.name} holds no examples ({found}): expected {expected}")
    yield first
    yield from rows


def example_length(tokenizer, messages: list[dict]) -> int:
    """Tokens of the whole chat-formatted example, as the trainer sees it (answer and end-of-turn included)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _truncate(tokenizer, messages: list[dict], max_length: int) -> list[dict] | None:
    """Shorten the last user turn from its end until the example fits; None if even an empty one would not.

    The answer and its end-of-turn stay whole: they are what the loss trains on.
    """
    index = max(i for i, m in enumerate(messages) if m["role"] == "user")
    ids = tokenizer(messages[index]["content"], add_special_tokens=False)["input_ids"]
    keep = len(ids) - (example_length(tokenizer, messages) - max_length)
    while keep > 0:
        shorter = [
            *messages[:index],
            {"role": "user", "content": tokenizer.decode(ids[:keep])},
            *messages[index + 1 :],
        ]
        if example_length(tokenizer, shorter) <= max_length:  # re-tokenizing can merge differently: check
            return shorter
        keep -= 1
    return None


def load_user_data(
    path: str | Path,
    *,
    system: str | None = None,
    tokenizer=None,
    max_length: int | None = None,
    too_long: str = "error",
    errors: str = "raise",
    encoding: str | None = None,
) -> UserData:
    """Read, validate and normalize a user's file; see the module docstring for the rules.

    errors: "raise" (the first bad row raises UserDataError) or "skip" (bad rows go to `skipped`).
    too_long: "error" (raise, with the count and lines), "drop" (to `skipped`) or "truncate"
    (shorten the last user turn; the answer is never cut). Needs `tokenizer` and `max_length`.
    encoding: None reads UTF-8 (with or without a BOM) or UTF-16 after its BOM; name any other the
    file was saved in, e.g. "cp1252" for older Excel's "CSV" in Western Europe and the Americas.
    """
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long must be one of {TOO_LONG}, got {too_long!r}")
    if (max_length is None) != (tokenizer is None):
        raise ValueError("pass both tokenizer and max_length to check lengths, or neither")
    data, first_copy = UserData(), {}
    for line, row, raw in read_rows(path, encoding):
        try:
            if isinstance(row, UserDataError):
                raise row
            messages = to_messages(row, line, system)
        except UserDataError as err:
            if errors == "raise":
                raise
            data.skipped.append(Skipped(line, err.field, err.reason, raw))
            continue
        if max_length is not None and (n := example_length(tokenizer, messages)) > max_length:
            data.too_long.append(line)
            reason = f"{n} tokens > max_length={max_length}"
            if too_long == "drop":
                data.skipped.append(Skipped(line, None, reason, raw))
                continue
            if too_long == "truncate":
                messages = _truncate(tokenizer, messages, max_length)
                if messages is None:
                    data.skipped.append(Skipped(line, None, reason + "; the answer alone does not fit", raw))
                    continue
                data.truncated.append(line)
        key = json.dumps(messages)
        if key in first_copy:
            data.duplicates.append((line, first_copy[key]))
        first_copy.setdefault(key, line)
        data.examples.append({"line": line, "messages": messages})
    if data.too_long and too_long == "error":
        raise ValueError(
            f"{len(data.too_long)} examples are longer than max_length={max_length} tokens (lines "
            f"{', '.join(map(str, data.too_long[:10]))}{' ...' if len(data.too_long) > 10 else ''}). "
            "Raise max_length, or pass too_long='drop' or too_long='truncate'."
        )
    return data


def prompt_key(example: dict) -> str:
    """What a model sees before answering, whitespace and case normalized: two examples with the
    same key are the same question, whatever their answers."""
    turns = [m for m in example["messages"][:-1] if m["role"] != "system"]
    return "\n".join(f"{m['role']}: {' '.join(m['content'].lower().split())}" for m in turns)


def leaks(train: list[dict], test: list[dict]) -> list[tuple[int, int]]:
    """(test line, train line) for each test example whose prompt also appears in train."""
    seen = {}
    for example in train:
        seen.setdefault(prompt_key(example), example["line"])
    return [(ex["line"], seen[prompt_key(ex)]) for ex in test if prompt_key(ex) in seen]


def split(examples: list[dict], test_share: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A seeded train/test split in which examples with the same prompt stay on one side (no leakage)."""
    if not 0.0 < test_share < 1.0:
        raise ValueError(f"test_share must be in (0, 1), got {test_share}")
    groups: dict[str, list[dict]] = {}
    for example in examples:
        groups.setdefault(prompt_key(example), []).append(example)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_test, test, train = round(test_share * len(examples)), [], []
    for key in keys:
        (test if len(test) < n_test else train).extend(groups[key])
    return train, test


def to_trl(example: dict) -> dict:
    """TRL's conversational prompt-completion row: the loss (completion_only_loss) covers the last turn."""
    return {"prompt": example["messages"][:-1], "completion": example["messages"][-1:]}


def write_skipped(skipped: list[Skipped], path: str | Path) -> Path:
    """Write the skipped rows and their reasons as JSONL, for fixing and re-adding."""
    path = Path(path)
    path.write_text("".join(json.dumps(s.__dict__) + "\n" for s in skipped), encoding="utf-8")
    return path
