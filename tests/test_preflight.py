"""course.preflight: each check says fail where a laptop cannot run the course."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from course import preflight

ROOT = Path(__file__).resolve().parent.parent


def _timings(*peaks_mib, seconds=60.0):
    return {f"{i:02d}_nb.ipynb": {"peak_rss_mib": p, "seconds": seconds} for i, p in enumerate(peaks_mib)}


def test_memory_fails_when_a_notebook_peaked_above_what_is_available():
    timings = _timings(1500, 7000)
    assert preflight.check_memory(timings, 16 * 2**30).status == "ok"
    low = preflight.check_memory(timings, 4 * 2**30)
    assert low.status == "fail" and "01" in low.detail and "00" not in low.detail
    assert preflight.check_memory(timings, None).status == "warn"


def test_memory_counts_the_workers_a_notebook_starts():
    """Notebook 12's kernel peaked at 3.2 GiB; with its torchrun workers it needs about 7 GiB."""
    kernel = {"12_scaling_out.ipynb": {"peak_rss_mib": 3299, "seconds": 151}}
    workers = preflight.WORKERS["12_scaling_out.ipynb"]
    assert workers.mib == 2 * 1_770 + 2 * 220
    assert preflight.notebook_peak_mib("12_scaling_out.ipynb", kernel["12_scaling_out.ipynb"]) == (
        3299 + workers.mib,
        workers.mib,
    )
    six_gib = 6 * 2**30  # above the kernel's peak, below the tree's
    finding = preflight.check_memory(kernel, six_gib)
    assert finding.status == "fail" and "12 (7.1 GiB, of which 3.9 GiB estimated" in finding.detail
    assert (
        preflight.check_memory({"00_x.ipynb": {"peak_rss_mib": 3299, "seconds": 1}}, six_gib).status == "ok"
    )
    measured = {"12_scaling_out.ipynb": {"peak_rss_mib": 3299, "tree_peak_rss_mib": 5000, "seconds": 151}}
    assert preflight.check_memory(measured, six_gib).status == "ok"  # a measured tree replaces the estimate


def test_worker_estimate_follows_its_sources():
    """1,770 MiB a worker = notebook 00's measured kernel (same imports, same fp32 model) + LoRA training of
    one rank's 2 x 96 tokens by course.memory; if either source moves by more than 5%, revisit the estimate."""
    from course.memory import estimate_training_memory

    base = preflight.load_timings()["00_setup.ipynb"]["peak_rss_mib"]
    parts = estimate_training_memory("smollm2-135m", "lora", r=16, batch_size=2, seq_len=96, weight_bytes=4)
    training = (parts["gradients"] + parts["optimizer"] + parts["activations"]) / 2**20
    assert preflight.WORKERS["12_scaling_out.ipynb"].worker_mib == pytest.approx(base + training, rel=0.05)


def test_every_notebook_that_starts_workers_has_an_estimate():
    starts = set()
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(path.read_text())["cells"][1:]  # the bootstrap cell runs pip in Colab only
        if any(c["cell_type"] == "code" and "launch(" in "".join(c["source"]) for c in cells):
            starts.add(path.name)
    assert starts == set(preflight.WORKERS)


def test_disk_fails_below_the_minimum(tmp_path):
    assert preflight.check_disk([tmp_path], free_bytes=lambda p: 10 * 2**30).status == "ok"
    assert preflight.check_disk([tmp_path / "not" / "yet"], free_bytes=lambda p: 2**30).status == "fail"


def test_model_cache_fails_on_an_empty_folder(tmp_path):
    finding = preflight.check_model_cache(tmp_path)
    assert finding.status == "fail" and "make setup" in finding.detail


def test_cache_path_follows_course_models_without_importing_it(tmp_path, monkeypatch):
    from course.models import cache_dir

    for value in (str(tmp_path), None):
        if value is None:
            monkeypatch.delenv("COURSE_CACHE", raising=False)
        else:
            monkeypatch.setenv("COURSE_CACHE", value)
        with monkeypatch.context() as blocked:
            blocked.setitem(sys.modules, "course.models", None)  # importing it now raises ImportError
            assert preflight.cache_path() == cache_dir()


def test_offline_names_missing_data(tmp_path):
    finding = preflight.check_offline(tmp_path)
    assert finding.status == "fail" and "data/event_extraction/train.jsonl" in finding.detail
    assert preflight.check_offline().status == "ok"


def test_python_version():
    assert preflight.check_python((3, 11, 7), "python3.11").status == "ok"
    assert preflight.check_python((3, 12, 1), "python3.12").status == "warn"
    assert preflight.check_python((3, 10, 4), "python3.10").status == "fail"


def test_estimate_is_a_range_between_scaled_and_measured():
    timings = _timings(100, 100, seconds=120.0)  # 4 minutes measured
    assert preflight.estimate_minutes(timings, local_gflops=200, reference_gflops=100) == pytest.approx(
        (2.0, 4.0)
    )
    assert preflight.estimate_minutes(timings, local_gflops=50, reference_gflops=100) == pytest.approx(
        (4.0, 8.0)
    )
    with pytest.raises(ValueError):
        preflight.estimate_minutes(timings, local_gflops=0, reference_gflops=100)


def test_estimate_holds_for_the_recorded_run():
    """Scaling alone said 11 min at 127 GFLOP/s; the notebooks took 25.7: the range must hold both."""
    run = preflight.RECORDED_RUN
    timings = {"all.ipynb": {"peak_rss_mib": 1, "seconds": run.table_minutes * 60}}
    low, high = preflight.estimate_minutes(timings, run.gflops, run.reference_gflops)
    assert round(low) == 11 and low <= run.minutes <= high
    assert json.loads((preflight.RESULTS / "calibration.json").read_text())["gflops"] == run.reference_gflops
    finding = preflight.check_time(timings, run.gflops, {"gflops": run.reference_gflops})
    assert "in 11-28 min" in finding.detail


def test_slow_machine_is_warned():
    timings = _timings(100)
    assert preflight.check_time(timings, 10, {"gflops": 100}).status == "warn"
    assert preflight.check_time(timings, 90, {"gflops": 100}).status == "ok"
    uncalibrated = preflight.check_time(timings, None, {"gflops": 100})
    assert uncalibrated.status == "warn" and "make setup" in uncalibrated.detail


def test_calibration_measures_a_positive_rate():
    assert preflight.calibrate(0.05) > 0
    with pytest.raises(ValueError):
        preflight.calibrate(0)


def test_main_exits_nonzero_without_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    monkeypatch.setattr(preflight, "calibrate", lambda seconds=2.0: 100.0)
    assert preflight.main([]) == 1
    assert "not ready: fix model cache" in capsys.readouterr().out


def test_runs_before_the_install_in_seconds(tmp_path):
    """`python -S` sees no site-packages (no torch, no psutil): as `make check` before `make setup`."""
    assert "import torch" not in (ROOT / "course" / "preflight.py").read_text().split("\ndef ")[0]
    done = subprocess.run(
        [sys.executable, "-S", "-m", "course.preflight"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "COURSE_CACHE": str(tmp_path)},
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    out = done.stdout
    assert "OK    python" in out and "missing: torch" in out and "not calibrated" in out
    assert "GiB available" in out  # read from /proc/meminfo without psutil


def test_make_check_does_not_install():
    makefile = (ROOT / "Makefile").read_text()
    rule = makefile[makefile.index("\ncheck:") :].split("\n\n")[0]
    assert "$(STAMP)" not in rule.splitlines()[1] and "pip" not in rule


def test_reference_is_committed_beside_the_table():
    reference = json.loads((preflight.RESULTS / "calibration.json").read_text())
    assert reference["gflops"] > 0
