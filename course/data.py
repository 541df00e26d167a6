"""The course's two synthetic tasks, their prompts, labels and scorer.

Two tenants with different output styles, so that notebook 10 can serve two adapters:
- `event_extraction`: a free-text calendar note -> compact JSON (person, day, 24h time, place).
  `{"input": "Sun 14:30 - Lunch with Olu at the gym",
    "output": '{"person": "Olu", "day": "Sunday", "time": "14:30", "place": "the gym"}'}`
- `ticket_routing`: a customer message -> one routing line.
  `{"input": "Hi, I was charged twice for order 4417, asap!",
    "output": "team: billing | priority: high"}`

The notes of the main splits write the time in 24h form, so the metric measures what a
short fine-tune can learn (format, copying, day names). The split `test_12h` of
`event_extraction` writes times as "2:30pm": converting them is arithmetic, and a few
CPU minutes of LoRA learn it only partly (a probe reached 55% on such notes). It is
reported separately, as a lesson on what a short fine-tune does and does not teach.
The training split mixes in 12h notes (TRAIN_12H_SHARE) so the model has seen the rule.

Everything is generated from a fixed seed; `python -m course.data` rewrites `data/`
and a test checks that it reproduces the shipped files byte for byte.
"""

import json
import random
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SEED = 1234
SPLIT_SIZES = {"train": 600, "validation": 60, "test": 100}
TRAIN_12H_SHARE = 0.25  # share of training notes written with am/pm times
IGNORE_INDEX = -100  # label value that torch's cross-entropy skips


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str  # sent as the system message: short, and it replaces SmolLM2's ~20-token default
    splits: tuple[str, ...]


TASKS = {
    "event_extraction": Task(
        "event_extraction",
        "Extract the event as JSON with person, day, time (24h) and place.",
        ("train", "validation", "test", "test_12h"),
    ),
    "ticket_routing": Task(
        "ticket_routing",
        "Route the ticket: reply 'team: <team> | priority: <priority>'.",
        ("train", "validation", "test"),
    ),
}

# --- event_extraction -------------------------------------------------------------------

PEOPLE = [
    "Olu",
    "Mia",
    "Ravi",
    "Chen",
    "Sofia",
    "Liam",
    "Aisha",
    "Noah",
    "Yuki",
    "Elena",
    "Omar",
    "Grace",
    "Mateo",
    "Priya",
    "Lucas",
    "Zara",
    "Ivan",
    "Nadia",
    "Tom",
    "Leila",
    "Kofi",
    "Hana",
    "Diego",
    "Amara",
    "Felix",
    "Ines",
    "Sam",
    "Mei",
    "Jonas",
    "Rosa",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PLACES = [
    "the gym",
    "the library",
    "Cafe Luna",
    "the office",
    "room 204",
    "the park",
    "Blue Door Bar",
    "the station",
    "the lab",
    "Pizza Roma",
    "the pool",
    "the clinic",
    "Hall B",
    "the airport",
    "the market",
    "Studio 9",
    "the museum",
    "her flat",
    "the bakery",
    "the stadium",
]
ACTIVITIES = [
    "Meeting",
    "Lunch",
    "Coffee",
    "Dinner",
    "Call",
    "Study session",
    "Run",
    "Interview",
    "Review",
    "Drinks",
]
EVENT_TEMPLATES = [
    "{day} {time} - {activity} with {person} at {place}",
    "{activity} w/ {person} @ {place}, {day} {time}",
    "{person}: {activity} at {place} on {day} at {time}",
    "Remind me: {activity} with {person}, {day} {time}, {place}",
    "{day} at {time}: {activity} with {person} ({place})",
    "{activity} at {place} with {person} - {day}, {time}",
]


def _time_12h(hour: int, minute: int) -> str:
    suffix = "am" if hour < 12 else "pm"
    hour12 = hour % 12 or 12
    return f"{hour12}{suffix}" if minute == 0 else f"{hour12}:{minute:02d}{suffix}"


def _event_example(rng: random.Random, twelve_hour: bool) -> dict:
    person, day, place = rng.choice(PEOPLE), rng.choice(DAYS), rng.choice(PLACES)
    hour, minute = rng.randrange(7, 23), rng.choice([0, 0, 15, 30, 45, 10, 20, 40, 50])
    time_24h = f"{hour:02d}:{minute:02d}"
    written_day = day if rng.random() < 0.5 else day[:3]
    note = rng.choice(EVENT_TEMPLATES).format(
        day=written_day,
        time=_time_12h(hour, minute) if twelve_hour else time_24h,
        activity=rng.choice(ACTIVITIES),
        person=person,
        place=place,
    )
    target = {"person": person, "day": day, "time": time_24h, "place": place}
    return {"input": note, "output": json.dumps(target)}


# --- ticket_routing ---------------------------------------------------------------------

TEAMS = {
    "billing": [
        "I was charged twice for order {order}",
        "My invoice for {month} shows the wrong amount",
        "Please refund the payment for order {order}",
        "Why did my card get billed after I cancelled in {month}?",
    ],
    "technical": [
        "The app crashes when I open the {feature} page",
        "I get error {code} every time I sync",
        "The {feature} button does nothing on my phone",
        "Since the {month} update the app will not start",
    ],
    "shipping": [
        "Order {order} has not arrived yet",
        "The tracking for order {order} has not moved since {month}",
        "My package came damaged, order {order}",
        "Can I change the delivery address for order {order}?",
    ],
    "account": [
        "I cannot log in to my account anymore",
        "Please delete my account and my data",
        "How do I change the email on my account?",
        "Someone changed my password, I am locked out of my account",
    ],
}
URGENT = ["asap!", "this is urgent.", "please fix it today!", "I need this right now.", "urgent!!"]
CALM = ["thanks.", "no rush.", "whenever you can.", "thank you!", "cheers."]
FEATURES = ["settings", "profile", "search", "checkout", "export"]
MONTHS = ["January", "March", "May", "July", "September", "November"]


def _ticket_example(rng: random.Random) -> dict:
    team = rng.choice(sorted(TEAMS))
    high = rng.random() < 0.4
    body = rng.choice(TEAMS[team]).format(
        order=rng.randrange(1000, 9999),
        month=rng.choice(MONTHS),
        feature=rng.choice(FEATURES),
        code=rng.choice(["E401", "E500", "E503", "E042"]),
    )
    greeting = rng.choice(["", "Hi, ", "Hello, ", "Hey, "])
    if greeting and not body.startswith("I "):
        body = body[0].lower() + body[1:]
    closing = rng.choice(URGENT if high else CALM)
    message = (
        f"{greeting}{body} {closing.capitalize()}" if body.endswith("?") else f"{greeting}{body}, {closing}"
    )
    return {"input": message, "output": f"team: {team} | priority: {'high' if high else 'normal'}"}


# --- generation and loading ---------------------------------------------------------------


def _unique(make, count: int, seen: set[str]) -> list[dict]:
    """`count` examples whose inputs appear in no other split (no train/test leakage)."""
    examples = []
    while len(examples) < count:
        example = make()
        if example["input"] not in seen:
            seen.add(example["input"])
            examples.append(example)
    return examples


def generate(name: str, seed: int = SEED) -> dict[str, list[dict]]:
    """All splits of task `name`, generated from `seed` (same seed, same bytes)."""
    _check_task(name)
    rng, seen = random.Random(f"{name}-{seed}"), set()
    if name == "ticket_routing":
        return {split: _unique(lambda: _ticket_example(rng), n, seen) for split, n in SPLIT_SIZES.items()}
    splits = {
        "train": _unique(
            lambda: _event_example(rng, rng.random() < TRAIN_12H_SHARE), SPLIT_SIZES["train"], seen
        ),
        "validation": _unique(lambda: _event_example(rng, False), SPLIT_SIZES["validation"], seen),
        "test": _unique(lambda: _event_example(rng, False), SPLIT_SIZES["test"], seen),
    }
    splits["test_12h"] = _unique(lambda: _event_example(rng, True), 100, seen)
    return splits


def write_task(name: str, data_dir: Path = DATA_DIR) -> list[Path]:
    """Write `data_dir/<name>/<split>.jsonl`, one JSON object per line."""
    paths = []
    for split, examples in generate(name).items():
        path = Path(data_dir) / name / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
        paths.append(path)
    return paths


def _check_task(name: str, split: str | None = None) -> None:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}. Known tasks: {', '.join(TASKS)}")
    if split is not None and split not in TASKS[name].splits:
        raise ValueError(f"Task {name!r} has no split {split!r}. Splits: {', '.join(TASKS[name].splits)}")


def load_task(name: str, split: str = "train", data_dir: Path = DATA_DIR):
    """The shipped examples of one split as a `datasets.Dataset` with columns input, output."""
    from datasets import Dataset

    _check_task(name, split)
    path = Path(data_dir) / name / f"{split}.jsonl"
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist: the task files live in data/ of the course; "
            "rebuild them with `python -m course.data`, or pass the folder that holds them as data_dir"
        )
    dataset = Dataset.from_list(read_jsonl(path))
    return dataset.add_column("task", [name] * len(dataset))


def read_jsonl(path: Path) -> list[dict]:
    """One example per line: a JSON object with string fields "input" and "output"; ValueError names the bad line."""
    examples = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        try:
            example = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {number}: not valid JSON ({err.msg}); expected one object per line"
            ) from None
        if not (
            isinstance(example, Mapping) and all(isinstance(example.get(k), str) for k in ("input", "output"))
        ):
            raise ValueError(
                f'{path}, line {number}: expected an object with string fields "input" and "output"'
            )
        examples.append(example)
    if not examples:
        raise ValueError(f"{path} holds no examples: expected one JSON object per line")
    return examples


# --- prompts, labels, batches -------------------------------------------------------------


def messages(example: dict) -> list[dict]:
    """System message = the task's instruction (this also drops SmolLM2's default system prompt)."""
    if not isinstance(example, Mapping) or not isinstance(example.get("input"), str):
        raise ValueError(f'an example is a dict with a string "input" and a "task" name, got {example!r:.80}')
    if example.get("task") not in TASKS:
        raise ValueError(
            f"example['task'] must be one of {', '.join(TASKS)} (load_task adds it), got {example.get('task')!r}"
        )
    return [
        {"role": "system", "content": TASKS[example["task"]].instruction},
        {"role": "user", "content": example["input"]},
    ]


def format_prompt(tokenizer, example: dict) -> str:
    """The chat-formatted prompt, ending where the assistant's answer starts."""
    return tokenizer.apply_chat_template(messages(example), tokenize=False, add_generation_prompt=True)


def tokenize_for_training(tokenizer, example: dict) -> dict:
    """input_ids = prompt + answer + end-of-turn; labels = -100 on the prompt.

    Completion-only loss: the model is graded on the answer, not on re-typing the
    prompt. The end-of-turn token is part of the answer so the model learns to stop.
    Worked example (ids shortened): prompt [5, 6, 7], answer [8, 9], eos 2
    -> input_ids [5, 6, 7, 8, 9, 2], labels [-100, -100, -100, 8, 9, 2].
    """
    if not isinstance(example, Mapping) or not isinstance(example.get("output"), str):
        raise ValueError(f'a training example needs a string "output" (the answer), got {example!r:.80}')
    prompt_ids = tokenizer(format_prompt(tokenizer, example), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example["output"], add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples into (B, T) tensors; padding is never a label."""
    if not isinstance(pad_id, int) or isinstance(pad_id, bool):
        raise TypeError(f"pad_id must be an int token id (tokenizer.pad_token_id), got {pad_id!r}")
    if not batch:
        raise ValueError("collate needs a non-empty list of tokenized examples (tokenize_for_training)")
    if any(
        not isinstance(ex, Mapping) or len(ex.get("input_ids", ())) != len(ex.get("labels", ()))
        for ex in batch
    ):
        raise ValueError(
            "each example needs input_ids and labels of the same length, as tokenize_for_training makes"
        )
    length = max(len(ex["input_ids"]) for ex in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)  # (B, T)
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"])
        labels[row, :n] = torch.tensor(ex["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --- scoring ------------------------------------------------------------------------------


def _check_answers(predictions, references) -> None:
    for name, answers in (("predictions", predictions), ("references", references)):
        if isinstance(answers, (str, bytes)) or not hasattr(answers, "__len__"):
            raise TypeError(f"{name} must be a list of strings, got {type(answers).__name__}")
        if not all(isinstance(a, str) for a in answers):
            raise TypeError(
                f"{name} must be a list of strings; it holds {sorted({type(a).__name__ for a in answers})}"
            )
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("scoring needs at least one example (the lists are empty)")


def exact_match_hits(predictions: list[str], references: list[str]) -> list[int]:
    """Per example, 1 where the prediction equals its reference after stripping outer whitespace, else 0."""
    _check_answers(predictions, references)
    return [int(p.strip() == r.strip()) for p, r in zip(predictions, references, strict=True)]


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after stripping outer whitespace."""
    return sum(exact_match_hits(predictions, references)) / len(references)


def field_accuracy(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Per-field accuracy of JSON answers (an unparsable prediction gets every field wrong).

    Tells *which* field a model misses: in the 12h lesson it is `time`, not the others.
    """
    _check_answers(predictions, references)
    fields = list(json.loads(references[0]))
    hits = dict.fromkeys(fields, 0)
    for prediction, reference in zip(predictions, references, strict=True):
        try:
            predicted = json.loads(prediction)
        except ValueError:
            continue
        if not isinstance(predicted, dict):
            continue
        for field, value in json.loads(reference).items():
            hits[field] += predicted.get(field) == value
    return {field: count / len(references) for field, count in hits.items()}


if __name__ == "__main__":
    for task in sys.argv[1:] or TASKS:
        for path in write_task(task):
            print(path)
