"""course.userdata: every bad row is named by line and field, nothing is dropped silently, no leakage."""

import codecs
import json
import re

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
        (
            '{"prompt": "a", "completion": "b"',
            (2, None, "malformed JSON (Expecting ',' delimiter at column 34)"),
        ),
        (
            '{"prompt": "a", "completion": "b}',
            (2, None, "malformed JSON (Unterminated string starting at column 31)"),
        ),
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


# Files as spreadsheets and databases export them: the bytes are written as the tool writes them.


def _rows(data):
    return [(e["line"], e["messages"][-2]["content"], e["messages"][-1]["content"]) for e in data.examples]


def _write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_a_utf8_byte_order_mark_is_dropped_in_jsonl_and_csv(tmp_path):
    jsonl = _write(tmp_path, "bom.jsonl", codecs.BOM_UTF8 + b'{"prompt": "a", "completion": "b"}\n')
    assert _rows(userdata.load_user_data(jsonl)) == [(1, "a", "b")]
    csv = _write(tmp_path, "bom.csv", codecs.BOM_UTF8 + b"prompt,completion\r\na,b\r\n")  # Excel "CSV UTF-8"
    assert _rows(userdata.load_user_data(csv)) == [(2, "a", "b")]
    assert _rows(userdata.load_user_data(csv, encoding="utf-8")) == [(2, "a", "b")]


@pytest.mark.parametrize(
    "bom, codec", [(codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")]
)
def test_utf16_with_its_byte_order_mark_is_read_as_excel_unicode_text_writes_it(tmp_path, bom, codec):
    text = "Prompt\tCompletion\r\ncafé au lait\tcoffee(milk=True)\r\n"  # tab-separated, CRLF
    path = _write(tmp_path, "unicode.tsv", bom + text.encode(codec))
    assert _rows(userdata.load_user_data(path)) == [(2, "café au lait", "coffee(milk=True)")]


def test_another_encoding_is_refused_with_line_byte_offset_and_bytes_unless_named(tmp_path):
    text = 'prompt,completion\r\n"two\r\nlines",a\r\nx,café\r\n'  # é on physical line 4
    data = text.encode("cp1252")
    path = _write(tmp_path, "old_excel.csv", data)
    offset = data.index(b"\xe9")
    message = (
        f"old_excel.csv is not utf-8: line 4, byte offset {offset}: b'\\xe9' (invalid continuation byte) "
        "in b'x,caf\\xe9'. Save it as UTF-8 (Excel: Save As > 'CSV UTF-8 (Comma delimited)'"
    )
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        userdata.load_user_data(path)
    assert str(err.value).endswith(
        "or pass the encoding it was saved in, e.g. encoding='cp1252' "
        "(Windows-1252, what older Excel writes: there b'\\xe9' is 'é')."
    )
    data = userdata.load_user_data(path, encoding="cp1252")
    assert _rows(data) == [(2, "two\nlines", "a"), (4, "x", "café")]
    undefined = _write(tmp_path, "undefined.csv", b"prompt,completion\nx,\x81\n")  # 0x81: no cp1252 char
    with pytest.raises(ValueError, match=r"^undefined.csv is not cp1252: line 2, byte offset 20: b'\\x81'"):
        userdata.load_user_data(undefined, encoding="cp1252")
    with pytest.raises(ValueError, match="unknown encoding 'latin-9'"):
        userdata.load_user_data(path, encoding="latin-9")


def test_utf16_without_its_byte_order_mark_is_refused_not_read_as_nul_bytes(tmp_path):
    path = _write(tmp_path, "bcp.csv", "prompt,completion\na,b\n".encode("utf-16-le"))
    with pytest.raises(ValueError, match="^bcp.csv: line 1 holds NUL bytes, as UTF-16 without a BOM does"):
        userdata.load_user_data(path)
    assert _rows(userdata.load_user_data(path, encoding="utf-16-le")) == [(2, "a", "b")]


@pytest.mark.parametrize(
    "name, data, last_line",
    [
        ("comma.csv", b'prompt,completion\n"on, please","f(x, y)"\nz,w\n', 3),
        ("semicolon.csv", b'prompt;completion\r\n"on, please";f(x, y)\r\n;\r\nz;w\r\n', 4),  # ; cleared
        ("tabs.tsv", b'prompt\tcompletion\n"on, please"\tf(x, y)\n\nz\tw\n', 4),
        ("CASE.CSV", b'"Prompt ", COMPLETION\n"on, please","f(x, y)"\nz,w\n', 3),
        ("quoted_names.csv", b'"notes, free, text";prompt;completion\n;"on, please";f(x, y)\n;z;w\n', 3),
        ("extra_column.tsv", b"notes\tprompt\tcompletion\n\ton, please\tf(x, y)\n\tz\tw\n", 3),
    ],
)
def test_csv_dialects_the_delimiter_is_taken_from_the_header_and_names_match_any_case(
    tmp_path, name, data, last_line
):
    path = _write(tmp_path, name, data)
    assert _rows(userdata.load_user_data(path)) == [(2, "on, please", "f(x, y)"), (last_line, "z", "w")]


def test_quoted_newlines_in_a_crlf_file_keep_line_numbers_and_become_plain_newlines(tmp_path):
    path = _write(tmp_path, "excel.csv", b'prompt;completion\r\n"three\r\nline\r\nprompt";"a;b"\r\nx;\r\n')
    with pytest.raises(UserDataError, match="^line 5, field 'completion': empty"):
        userdata.load_user_data(path)
    assert _rows(userdata.load_user_data(path, errors="skip")) == [(2, "three\nline\nprompt", "a;b")]


def test_an_unquoted_delimiter_is_refused_not_cut(tmp_path):
    path = _write(
        tmp_path, "calls.csv", b'prompt,completion\na,b\nlights off,lights(room="office", level=0)\n'
    )
    with pytest.raises(
        UserDataError, match=re.escape("line 3: 3 fields but 2 columns: quote a field holding ','")
    ):
        userdata.load_user_data(path)
    (skipped,) = userdata.load_user_data(path, errors="skip").skipped
    assert skipped.raw == json.dumps(["lights off", 'lights(room="office"', " level=0)"])  # nothing lost


def test_a_header_without_the_columns_names_the_expected_and_the_found_ones(tmp_path):
    path = _write(tmp_path, "q.csv", b"question;answer\na;b\n")
    with pytest.raises(UserDataError) as err:
        userdata.load_user_data(path)
    assert str(err.value) == (
        "line 1, field 'completion': missing column; expected the columns prompt and completion (any case, "
        "spaces around them ignored) separated by ',', ';' or a tab; the header has ['question', 'answer']"
    )
    twice = _write(tmp_path, "twice.csv", b"prompt,Prompt,completion\na,b,c\n")
    with pytest.raises(UserDataError, match="^line 1, field 'prompt': column appears twice"):
        userdata.load_user_data(twice)


JSONL_EXPECTED = 'one JSON object per line, such as {"prompt": "lights off", "completion": "lights(level=0)"}'
CSV_EXPECTED = "a header line with the columns prompt and completion, then one row per example"


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("empty.jsonl", b"", f"empty.jsonl holds no examples (0 bytes): expected {JSONL_EXPECTED}"),
        (
            "blank.jsonl",
            b"\n \r\n\n",
            f"blank.jsonl holds no examples (only blank lines): expected {JSONL_EXPECTED}",
        ),
        ("empty.csv", b"", f"empty.csv holds no examples (0 bytes): expected {CSV_EXPECTED}"),
        (
            "header.csv",
            b"prompt,completion\r\n",
            f"header.csv holds no examples (only the header): expected {CSV_EXPECTED}",
        ),
        (
            "cleared.tsv",
            b"prompt\tcompletion\n\t\n",
            f"cleared.tsv holds no examples (only the header): expected {CSV_EXPECTED}",
        ),
    ],
)
def test_a_file_without_examples_is_refused_naming_the_file_and_what_was_expected(
    tmp_path, name, data, message
):
    with pytest.raises(ValueError) as err:
        userdata.load_user_data(_write(tmp_path, name, data), errors="skip")
    assert str(err.value) == message
