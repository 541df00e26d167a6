"""Graders reject plausible wrong answers, not only the stub."""

import inspect

import pytest

import course
from course import checks, data


def test_exact_match_grader_accepts_the_reference():
    checks.check_exact_match(data.exact_match)


@pytest.mark.parametrize(
    "wrong",
    [
        lambda p, r: sum(a == b for a, b in zip(p, r, strict=True)) / len(r),  # forgets to strip
        lambda p, r: sum(a.strip().lower() == b.strip().lower() for a, b in zip(p, r, strict=True)) / len(r),
        lambda p, r: sum(a.strip() == b.strip() for a, b in zip(p, r, strict=True)),  # a count, not a share
    ],
)
def test_exact_match_grader_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError, match="exact_match"):
        checks.check_exact_match(wrong)


def test_field_accuracy_grader_accepts_the_reference():
    checks.check_field_accuracy(data.field_accuracy)


def _field_accuracy_without_guard(predictions, references):  # crashes on an answer that is not JSON
    import json

    fields = list(json.loads(references[0]))
    hits = dict.fromkeys(fields, 0)
    for p, r in zip(predictions, references, strict=True):
        for field, value in json.loads(r).items():
            hits[field] += json.loads(p).get(field) == value
    return {f: h / len(references) for f, h in hits.items()}


def _field_accuracy_over_parsed(predictions, references):  # divides by the parsable answers only
    import json

    hits, parsed = {}, 0
    for p, r in zip(predictions, references, strict=True):
        try:
            predicted = json.loads(p)
        except ValueError:
            continue
        if not isinstance(predicted, dict):
            continue
        parsed += 1
        for field, value in json.loads(r).items():
            hits[field] = hits.get(field, 0) + (predicted.get(field) == value)
    fields = list(json.loads(references[0]))
    return {f: hits.get(f, 0) / max(parsed, 1) for f in fields}


def _field_accuracy_missing_is_right(predictions, references):  # a field the answer lacks counts as right
    import json

    fields = list(json.loads(references[0]))
    hits = dict.fromkeys(fields, 0)
    for p, r in zip(predictions, references, strict=True):
        try:
            predicted = json.loads(p)
        except ValueError:
            continue
        if isinstance(predicted, dict):
            for field, value in json.loads(r).items():
                hits[field] += predicted.get(field, value) == value
    return {f: h / len(references) for f, h in hits.items()}


def _field_accuracy_by_text(predictions, references):  # looks for '"field": "value"' in the raw text
    import json

    fields = list(json.loads(references[0]))
    hits = dict.fromkeys(fields, 0)
    for p, r in zip(predictions, references, strict=True):
        for field, value in json.loads(r).items():
            hits[field] += f'"{field}": "{value}"' in p
    return {f: h / len(references) for f, h in hits.items()}


@pytest.mark.parametrize(
    "wrong",
    [
        _field_accuracy_without_guard,
        _field_accuracy_over_parsed,
        _field_accuracy_missing_is_right,
        _field_accuracy_by_text,
    ],
)
def test_field_accuracy_grader_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError, match="field_accuracy"):
        checks.check_field_accuracy(wrong)


@pytest.mark.parametrize("name", course.checks.__all__)
def test_every_grader_refuses_a_non_callable_with_a_type_error(name):
    # Passing the result (or a typo'd name) instead of the function is a usage error, not a wrong answer.
    grader = getattr(course.checks, name)
    required = [
        p
        for p in inspect.signature(grader).parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    with pytest.raises(TypeError, match="expected your function"):
        grader(42, *([None] * (len(required) - 1)))
