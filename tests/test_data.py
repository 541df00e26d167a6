import json
import re

import pytest
import torch

from course import data


@pytest.mark.parametrize("task", list(data.TASKS))
def test_generators_rebuild_shipped_files_byte_for_byte(task, tmp_path):
    for path in data.write_task(task, tmp_path):
        shipped = data.DATA_DIR / task / path.name
        assert path.read_bytes() == shipped.read_bytes(), f"{shipped} differs from its generator"


@pytest.mark.parametrize("task", list(data.TASKS))
def test_split_sizes_and_no_leakage(task):
    inputs = {}
    for split in data.TASKS[task].splits:
        dataset = data.load_task(task, split)
        minimum = {"train": 500, "validation": 50}.get(split, 100)
        assert len(dataset) >= minimum
        assert set(dataset.column_names) == {"input", "output", "task"}
        inputs[split] = set(dataset["input"])
    splits = list(inputs)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not inputs[a] & inputs[b], f"{a} and {b} share examples"


def test_event_targets_are_canonical_json():
    for split in ("train", "test", "test_12h"):
        for example in data.load_task("event_extraction", split):
            target = json.loads(example["output"])
            assert list(target) == ["person", "day", "time", "place"]
            assert target["day"] in data.DAYS
            hours, minutes = target["time"].split(":")
            assert len(hours) == 2 and 0 <= int(hours) < 24 and len(minutes) == 2


def test_main_test_split_writes_times_as_24h_and_lesson_split_as_12h():
    main = data.load_task("event_extraction", "test")
    lesson = data.load_task("event_extraction", "test_12h")
    twelve_hour = re.compile(r"\b\d{1,2}(:\d{2})?(am|pm)\b")
    assert all(json.loads(e["output"])["time"] in e["input"] for e in main)
    assert not any(twelve_hour.search(e["input"]) for e in main)
    assert all(twelve_hour.search(e["input"]) for e in lesson)


def test_unknown_task_and_split_list_known_names():
    with pytest.raises(ValueError, match="event_extraction.*ticket_routing"):
        data.load_task("events")
    with pytest.raises(ValueError, match="test_12h"):
        data.load_task("event_extraction", "dev")


def test_prompt_uses_task_instruction_not_default_system_prompt(tokenizer):
    example = data.load_task("ticket_routing", "test")[0]
    prompt = data.format_prompt(tokenizer, example)
    assert data.TASKS["ticket_routing"].instruction in prompt
    assert "SmolLM" not in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_labels_mask_the_prompt_and_keep_answer_plus_eos(tokenizer):
    example = data.load_task("event_extraction", "train")[0]
    tokenized = data.tokenize_for_training(tokenizer, example)
    ids, labels = tokenized["input_ids"], tokenized["labels"]
    n_prompt = len(tokenizer(data.format_prompt(tokenizer, example), add_special_tokens=False)["input_ids"])
    assert len(ids) == len(labels)
    assert labels[:n_prompt] == [data.IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]) == example["output"]


def test_collate_pads_right_and_never_labels_padding():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = data.collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["input_ids"].dtype == torch.long


def test_exact_match_and_its_errors():
    assert data.exact_match([" a\n", "b"], ["a", "c"]) == 0.5
    assert data.exact_match(["A"], ["a"]) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1"):
        data.exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        data.exact_match([], [])


def test_field_accuracy_names_the_missed_field():
    ref = json.dumps({"person": "Olu", "day": "Sunday", "time": "14:30", "place": "the gym"})
    wrong_time = json.dumps({"person": "Olu", "day": "Sunday", "time": "2:30", "place": "the gym"})
    scores = data.field_accuracy([wrong_time, "not json"], [ref, ref])
    assert scores == {"person": 0.5, "day": 0.5, "time": 0.0, "place": 0.5}
