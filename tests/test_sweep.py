"""benchmarks/sweep.py runs end to end (the tiny random model, 2 steps per run) and writes nothing."""

import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "sweep", Path(__file__).resolve().parent.parent / "benchmarks" / "sweep.py"
)


def test_quick_sweep_reports_every_part():
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    stored = (sweep.RESULTS / "sweep.json").read_text()
    report = sweep.main(["--quick"])
    assert {run["part"] for run in report["runs"]} == {"lr_rank", "alpha", "targets"}
    assert len(report["overfit"]["curve"]) >= 2 and report["overfit"]["examples"] == sweep.OVERFIT["examples"]
    assert set(report["forgetting"]) == {"before", "full", "lora", "qlora"}
    json.dumps(report)  # the report is plain data
    assert (sweep.RESULTS / "sweep.json").read_text() == stored  # --quick never overwrites the real report
