"""Writes commands.jsonl: a stand-in for a learner's own export (chat messages, one per line).

Smart-home requests -> one function call. Fixed seed: `python data/smart_home/make_commands.py`
rewrites the same bytes. Like a real export, a few rows are broken on purpose (see FLAWED):
notebook 13 shows `course.userdata` finding every one of them, with its line and field.
"""

import json
import random
from pathlib import Path

ROOMS = ["kitchen", "bedroom", "living room", "bathroom", "office", "hallway", "garage", "kids room"]
NUMBER_WORDS = {5: "five", 10: "ten", 15: "fifteen", 20: "twenty", 30: "thirty", 45: "forty-five"}
LIGHTS = [
    "turn the {room} lights {state}",
    "can you switch {state} the lights in the {room}?",
    "{room} lights {state} please",
    "lights {state} in the {room}",
]
DIM = [
    "dim the {room} lights to {level}%",
    "set the {room} lights to {level} percent",
    "make the {room} {level}% bright",
]
HEAT = [
    "set the {room} to {celsius} degrees",
    "heat the {room} to {celsius}C",
    "I'd like the {room} at {celsius} degrees please",
    "{room} thermostat {celsius}",
]
TIMER = [
    "set a timer for {minutes} minutes",
    "timer {minutes} min",
    "remind me in {minutes} minutes",
    "start a {words} minute timer",
]


def example(rng: random.Random) -> dict:
    room, kind = rng.choice(ROOMS), rng.choice(["lights", "lights", "dim", "heat", "timer"])
    if kind == "lights":
        on = rng.random() < 0.5
        request = rng.choice(LIGHTS).format(room=room, state="on" if on else "off")
        call = f'lights(room="{room}", level={100 if on else 0})'
    elif kind == "dim":
        level = rng.choice([10, 20, 25, 30, 40, 50, 60, 75, 80])
        request, call = (
            rng.choice(DIM).format(room=room, level=level),
            f'lights(room="{room}", level={level})',
        )
    elif kind == "heat":
        celsius = rng.randrange(16, 25)
        request, call = (
            rng.choice(HEAT).format(room=room, celsius=celsius),
            f'heat(room="{room}", celsius={celsius})',
        )
    else:
        minutes = rng.choice(list(NUMBER_WORDS))
        request = rng.choice(TIMER).format(minutes=minutes, words=NUMBER_WORDS[minutes])
        call = f"timer(minutes={minutes})"
    if rng.random() < 0.3:
        request = request[0].upper() + request[1:]
    return {"messages": [{"role": "user", "content": request}, {"role": "assistant", "content": call}]}


def rows(n: int = 300, seed: int = 13) -> list[str]:
    rng, seen, lines = random.Random(seed), set(), []
    while len(lines) < n:  # every request once (ignoring case): duplicates below are on purpose
        row = example(rng)
        if row["messages"][0]["content"].lower() not in seen:
            seen.add(row["messages"][0]["content"].lower())
            lines.append(json.dumps(row))
    ramble = "so about the lights, " * 40 + "turn the office lights off"
    flawed = {  # line number (1-based) -> what a real export gets wrong
        41: lines[40][:-9],  # cut off mid-object: malformed JSON
        87: json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "kitchen lights on"},
                    {"role": "assistant", "content": " "},
                ]
            }
        ),
        133: json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "garage lights off"},
                    {"role": "bot", "content": 'lights(room="garage", level=0)'},
                ]
            }
        ),
        177: lines[11],  # an exact duplicate of line 12
        220: json.dumps(
            {
                "messages": [
                    {"role": "user", "content": ramble},
                    {"role": "assistant", "content": 'lights(room="office", level=0)'},
                ]
            }
        ),
    }
    return [flawed.get(i + 1, line) for i, line in enumerate(lines)]


if __name__ == "__main__":
    out = Path(__file__).with_name("commands.jsonl")
    out.write_text("".join(line + "\n" for line in rows()), encoding="utf-8")
    print(out)
