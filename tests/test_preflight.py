"""course.preflight: each check says fail where a laptop cannot run the course."""

import json

import pytest

from course import preflight


def _timings(*peaks_mib, seconds=60.0):
    return {f"{i:02d}_nb.ipynb": {"peak_rss_mib": p, "seconds": seconds} for i, p in enumerate(peaks_mib)}


def test_memory_fails_when_a_notebook_peaked_above_what_is_available():
    timings = _timings(1500, 7000)
    assert preflight.check_memory(timings, 16 * 2**30).status == "ok"
    low = preflight.check_memory(timings, 4 * 2**30)
    assert low.status == "fail" and "01" in low.detail and "00" not in low.detail


def test_disk_fails_below_the_minimum(tmp_path):
    assert preflight.check_disk([tmp_path], free_bytes=lambda p: 10 * 2**30).status == "ok"
    assert preflight.check_disk([tmp_path / "not" / "yet"], free_bytes=lambda p: 2**30).status == "fail"


def test_model_cache_fails_on_an_empty_folder(tmp_path):
    finding = preflight.check_model_cache(tmp_path)
    assert finding.status == "fail" and "make setup" in finding.detail


def test_offline_names_missing_data(tmp_path):
    finding = preflight.check_offline(tmp_path)
    assert finding.status == "fail" and "data/event_extraction/train.jsonl" in finding.detail
    assert preflight.check_offline().status == "ok"


def test_estimate_scales_measured_time_by_relative_speed():
    timings = _timings(100, 100, seconds=120.0)  # 4 minutes measured
    assert preflight.estimate_minutes(timings, local_gflops=50, reference_gflops=100) == pytest.approx(8.0)
    assert preflight.estimate_minutes(timings, local_gflops=200, reference_gflops=100) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        preflight.estimate_minutes(timings, local_gflops=0, reference_gflops=100)


def test_slow_machine_is_warned():
    timings = _timings(100)
    assert preflight.check_time(timings, 10, {"gflops": 100}).status == "warn"
    assert preflight.check_time(timings, 90, {"gflops": 100}).status == "ok"


def test_calibration_measures_a_positive_rate():
    assert preflight.calibrate(0.05) > 0
    with pytest.raises(ValueError):
        preflight.calibrate(0)


def test_main_exits_nonzero_without_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    monkeypatch.setattr(preflight, "calibrate", lambda seconds=2.0: 100.0)
    assert preflight.main([]) == 1
    assert "not ready: fix model cache" in capsys.readouterr().out


def test_reference_is_committed_beside_the_table():
    reference = json.loads((preflight.RESULTS / "calibration.json").read_text())
    assert reference["gflops"] > 0
