"""course.userdata: every bad row is named by line and field, nothing is dropped silently, no leakage."""

import json

import pytest

from course import userdata
from course.userdata import UserDataError

SHIPPED = userdata.Path(__file__).resolve().parent.parent / "data" / "smart_home" / "commands.jsonl"


def _jsonl(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


GOOD = {"prompt": "lights off", "completion": 'lights(room="office", level=0)'}


@pytest.mark.parametrize(
    "row, line_field_reason",
    [
        ('{"prompt": "a", "completion": "b"', (2, None, "malformed JSON")),
        ({"prompt": "a"}, (2, "completion", "missing")),
        ({"prompt": "  ", "completion": "b"}, (2, "prompt", "empty")),
        ({"prompt": "a", "completion": 7}, (2, "completion", "expected a string, got int")),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
            (2, "messages[1].role", "expected one of"),
        ),
        (
            {"messages": [{"role": "user", "content": "a"}]},
            (2, "messages", "last turn must be the assistant"),
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
            (2, "messages[1].content", "empty"),
        ),
        ({"messages": "hi"}, (2, "messages", "non-empty list")),
        ([1, 2], (2, None, "expected a JSON object")),
    ],
)
def test_each_bad_row_raises_with_line_and_field_or_is_skipped_with_its_reason(
    tmp_path, row, line_field_reason
):
    path = _jsonl(tmp_path, [GOOD, row, GOOD])
    line, field, reason = line_field_reason
    with pytest.raises(UserDataError, match=f"^line {line}") as err:
        userdata.load_user_data(path)
    assert (err.value.line, err.value.field) == (line, field) and reason in err.value.reason
    data = userdata.load_user_data(path, errors="skip")
    assert [e["line"] for e in data.examples] == [1, 3]
    (skipped,) = data.skipped
    assert (skipped.line, skipped.field) == (line, field) and reason in skipped.reason
    assert skipped.raw == (
        row if isinstance(row, str) else json.dumps(row)
    )  # nothing lost: the row as written


def test_pairs_become_messages_with_the_system_message_and_blank_lines_are_not_rows(tmp_path):
    path = _jsonl(tmp_path, [GOOD, "", GOOD])
    data = userdata.load_user_data(path, system="Reply with one call.")
    assert [e["line"] for e in data.examples] == [1, 3]
    assert [m["role"] for m in data.examples[0]["messages"]] == ["system", "user", "assistant"]
    assert userdata.to_trl(data.examples[0])["completion"] == [
        {"role": "assistant", "content": GOOD["completion"]}
    ]


def test_csv_rows_are_numbered_by_their_line_in_the_file_even_with_quoted_newlines(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('prompt,completion\n"two\nlines",a\nx,\n', encoding="utf-8")
    with pytest.raises(UserDataError, match="line 4, field 'completion': empty"):
        userdata.load_user_data(path)
    (tmp_path / "bad.csv").write_text("question,answer\na,b\n", encoding="utf-8")
    with pytest.raises(UserDataError, match="line 1, field 'completion': missing column"):
        userdata.load_user_data(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match=".jsonl or .csv"):
        userdata.load_user_data(tmp_path / "rows.txt")


def test_too_long_examples_are_counted_and_only_dropped_or_truncated_when_asked(tmp_path, tokenizer):
    long_prompt = "please " * 80 + "turn the office lights off"
    path = _jsonl(tmp_path, [GOOD, {"prompt": long_prompt, "completion": GOOD["completion"]}])
    with pytest.raises(ValueError, match=r"1 examples are longer than max_length=48 tokens \(lines 2\)"):
        userdata.load_user_data(path, tokenizer=tokenizer, max_length=48)
    dropped = userdata.load_user_data(path, tokenizer=tokenizer, max_length=48, too_long="drop")
    assert (
        len(dropped.examples) == 1
        and dropped.too_long == [2]
        and "tokens > max_length=48" in dropped.skipped[0].reason
    )
    cut = userdata.load_user_data(path, tokenizer=tokenizer, max_length=48, too_long="truncate")
    assert cut.truncated == [2] and not cut.skipped
    messages = cut.examples[1]["messages"]
    assert userdata.example_length(tokenizer, messages) <= 48
    assert messages[-1]["content"] == GOOD["completion"]  # the answer (and its end-of-turn) is never cut
    assert long_prompt.startswith(messages[-2]["content"].rstrip())
    hopeless = _jsonl(tmp_path, [{"prompt": "a", "completion": "lights " * 60}], "hopeless.jsonl")
    out = userdata.load_user_data(hopeless, tokenizer=tokenizer, max_length=48, too_long="truncate")
    assert not out.examples and "answer alone does not fit" in out.skipped[0].reason
    with pytest.raises(ValueError, match="both tokenizer and max_length"):
        userdata.load_user_data(path, max_length=48)


def test_split_keeps_duplicates_together_where_a_naive_split_leaks(tmp_path):
    rows = [{"prompt": f"timer {i} min", "completion": f"timer(minutes={i})"} for i in range(30)]
    rows += [
        {"prompt": f"Timer  {i} MIN", "completion": f"timer(minutes={i})"} for i in range(10)
    ]  # near-copies
    data = userdata.load_user_data(_jsonl(tmp_path, rows))
    naive_train, naive_test = data.examples[:32], data.examples[32:]  # counter-example: cut by position
    assert userdata.leaks(naive_train, naive_test)
    train, test = userdata.split(data.examples, test_share=0.25, seed=0)
    assert len(train) + len(test) == 40 and abs(len(test) - 10) <= 1
    assert userdata.leaks(train, test) == []


def test_shipped_example_file_reports_every_planted_problem(tokenizer):
    data = userdata.load_user_data(
        SHIPPED, errors="skip", tokenizer=tokenizer, max_length=96, too_long="drop"
    )
    assert [(s.line, s.field) for s in data.skipped] == [
        (41, None),
        (87, "messages[1].content"),
        (133, "messages[1].role"),
        (220, None),
    ]
    assert "malformed JSON" in data.skipped[0].reason and data.too_long == [220]
    assert data.duplicates == [(177, 12)] and len(data.examples) == 296


def test_write_skipped_keeps_line_reason_and_raw_row(tmp_path):
    data = userdata.load_user_data(_jsonl(tmp_path, [GOOD, {"prompt": "", "completion": "x"}]), errors="skip")
    path = userdata.write_skipped(data.skipped, tmp_path / "skipped.jsonl")
    (row,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert row == {
        "line": 2,
        "field": "prompt",
        "reason": "empty",
        "raw": '{"prompt": "", "completion": "x"}',
    }
