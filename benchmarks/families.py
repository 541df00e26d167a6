"""LoRA, prompt tuning, prefix tuning, P-tuning and IA3 on one task and one budget.

    .venv/bin/python benchmarks/families.py [--families lora,ia3,...] [--steps N] [--note TEXT]

Each family (course.families.FAMILIES) trains on ticket_routing at each learning rate of its
small search (LRS below); the run with the lowest final validation loss is kept and only it is
scored on the test split: exact match (teacher forced, equal to greedy for answers in the
reference's tokens) with a 95% Wilson interval. Every run records trainable parameters, peak
training memory, seconds per step, the size of what a deployment stores, and its validation-loss
curve. The results are rewritten after every family (benchmarks/results/families.{json,md}),
so the benchmark can run in pieces (`--families` merges into the existing file).
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

import course
from course.families import FAMILIES, Setup, lr_search, setup_dict
from course.stats import Rate, tie

RESULTS = Path(__file__).resolve().parent / "results"
JSON_PATH, MD_PATH = RESULTS / "families.json", RESULTS / "families.md"

# The search: two rates a factor 10 (3 for LoRA) apart around each family's usual range. Prompt
# tuning is trained at 0.3 by Lester et al. 2021 (with Adafactor); prefix tuning at 5e-5..8e-5 with
# the MLP by Li & Liang 2021 on much longer runs; IA3 at 3e-3 in T-Few. A short run needs the upper end.
LRS = {
    "lora": (1e-3, 3e-3),
    "prompt_tuning": (3e-2, 3e-1),
    "prefix_tuning": (1e-3, 1e-2),
    "p_tuning": (1e-3, 1e-2),
    "ia3": (3e-3, 3e-2),
}
# The benchmark's budget (a shared 2-core CPU; see the report's note). Setup() holds the larger default.
BENCH = Setup(steps=10, batch_size=4, evaluations=2, validation_examples=20, test_examples=60)


def _machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU x{torch.get_num_threads()} threads"


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'family':14s} {'lr':>7s} {'trainable':>10s} {'peak MiB':>8s} {'s/step':>6s} {'stored KB':>9s} "
        f"{'val loss':>8s} {'exact match [95%]':>22s}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        rate = str(Rate(row["hits"], row["n"]))
        lines.append(
            f"{row['family']:14s} {row['lr']:>7.0e} {row['trainable_params']:>10,} "
            f"{row['peak_memory_bytes'] / 2**20:>8,.0f} {row['seconds_per_step']:>6.1f} "
            f"{row['adapter_bytes'] / 1e3:>9,.1f} {row['val_loss']:>8.3f} {rate:>22s}"
        )
    return "\n".join(lines)


def write_report(report: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    JSON_PATH.write_text(json.dumps(report, indent=1) + "\n")
    rows = [report["families"][f]["row"] for f in FAMILIES if f in report["families"]]
    lines = [
        "# PEFT families on one budget (benchmarks/families.py)",
        "",
        f"Task {report['setup']['task']}, {report['setup']['steps']} steps of {report['setup']['batch_size']}, "
        f"{report['setup']['num_virtual_tokens']} virtual tokens, LoRA r={report['setup']['r']}; "
        f"measured on {report['machine']}, {report['date']}. {report['note']}",
        "",
        "```",
        format_table(rows),
        "```",
        "",
        "Learning-rate search (final validation loss; the lowest is kept and scored on test):",
        "",
    ]
    for family in FAMILIES:
        if family in report["families"]:
            searched = ", ".join(f"{lr:.0e}: {loss:.3f}" for lr, loss in report["families"][family]["search"])
            lines.append(f"- {family}: {searched}")
    if "lora" in report["families"]:
        lora = report["families"]["lora"]["row"]
        lines += ["", "Against LoRA (Newcombe 95% interval of the difference holds 0: a tie):", ""]
        for row in rows:
            if row["family"] != "lora":
                same = tie(Rate(row["hits"], row["n"]), Rate(lora["hits"], lora["n"]))
                lines.append(f"- {row['family']}: {'tie' if same else 'different'}")
    lines += ["", "Mixed batch of tenants in one forward pass:", ""]
    lines += [f"- {row['family']}: {row['mixed_batch']}" for row in rows]
    MD_PATH.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--steps", type=int, default=BENCH.steps)
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    families = args.families.split(",")
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {FAMILIES}")
    hf_logging.set_verbosity_error()
    setup = Setup(
        steps=args.steps,
        batch_size=BENCH.batch_size,
        evaluations=BENCH.evaluations,
        validation_examples=BENCH.validation_examples,
        test_examples=BENCH.test_examples,
    )
    report = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {"families": {}}
    if report.get("setup") not in (None, setup_dict(setup)):
        report = {"families": {}}  # another budget: start a new report rather than mix budgets
    report |= {
        "setup": setup_dict(setup),
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d"),
        "note": args.note,
        "versions": {"torch": torch.__version__, "course": course.__version__},
    }
    base, tokenizer = course.models.load_model(dtype=torch.float32)
    for family in families:
        start = time.perf_counter()
        kept, searched = lr_search(family, LRS[family], base, tokenizer, setup, progress=False)
        report["families"][family] = {
            "row": kept.row,
            "search": searched,
            "val_steps": kept.val_steps,
            "val_losses": kept.val_losses,
            "train_losses": kept.train_losses,
        }
        kept.model = None
        write_report(report)
        print(
            f"{family}: {time.perf_counter() - start:.0f} s, {Rate(kept.row['hits'], kept.row['n'])}",
            flush=True,
        )
    return report


if __name__ == "__main__":
    main()
