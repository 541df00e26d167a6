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
Worked example: a file with lines `{"prompt": "a", "completion": "b"}` and `{"prompt": "", "completion": "b"}`
-> with errors="skip": 1 example, skipped [Skipped(line=2, field='prompt', reason='empty')].
"""

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "user", "assistant")
TOO_LONG = ("error", "drop", "truncate")


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


def read_rows(path: str | Path):
    """(line, parsed row or UserDataError, raw text) for each row of a .jsonl or .csv file."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".csv"):
        raise ValueError(f"expected a .jsonl or .csv file, got {path.name}")
    with open(path, encoding="utf-8", newline="") as f:
        if path.suffix == ".jsonl":
            for line, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue  # a blank line (often the last) holds no example
                raw = raw.rstrip("\r\n")
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError as err:
                    row = UserDataError(line, None, f"malformed JSON ({err.msg} at column {err.colno})")
                yield line, row, raw
            return
        reader = csv.DictReader(f)
        missing = {"prompt", "completion"} - set(reader.fieldnames or [])
        if missing:
            raise UserDataError(1, sorted(missing)[0], f"missing column; the header has {reader.fieldnames}")
        start = reader.line_num + 1
        for row in reader:  # line_num: the physical line where this record ended (quoted newlines span lines)
            yield start, {"prompt": row["prompt"], "completion": row["completion"]}, json.dumps(row)
            start = reader.line_num + 1


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
) -> UserData:
    """Read, validate and normalize a user's file; see the module docstring for the rules.

    errors: "raise" (the first bad row raises UserDataError) or "skip" (bad rows go to `skipped`).
    too_long: "error" (raise, with the count and lines), "drop" (to `skipped`) or "truncate"
    (shorten the last user turn; the answer is never cut). Needs `tokenizer` and `max_length`.
    """
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long must be one of {TOO_LONG}, got {too_long!r}")
    if (max_length is None) != (tokenizer is None):
        raise ValueError("pass both tokenizer and max_length to check lengths, or neither")
    data, first_copy = UserData(), {}
    for line, row, raw in read_rows(path):
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
