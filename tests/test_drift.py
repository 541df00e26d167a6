"""benchmarks/drift.py decides and reports from version data alone: both branches with faked versions, no pip run."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "drift", Path(__file__).resolve().parent.parent / "benchmarks" / "drift.py"
)
drift = importlib.util.module_from_spec(spec)
spec.loader.exec_module(drift)

PINS = {
    "transformers": "5.24.0",
    "peft": "0.21.2",
    "bitsandbytes": "0.50.2",
    "accelerate": "1.15.0",
    "datasets": "5.2.0",
    "trl": "1.16.0",
    "torch": "2.13.0",
}
ONLY_PINS = {p: (v,) for p, v in PINS.items()}


@pytest.fixture
def no_subprocess(monkeypatch):
    """Any pip, pytest or notebook run from drift.py fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"drift.py ran {args}")

    monkeypatch.setattr(drift.subprocess, "run", refuse)
    monkeypatch.setattr(drift, "smoke", refuse)


def test_pins_are_the_projects_constraints():
    assert drift.pinned_versions() == PINS  # the fake data below starts from the real pins


def test_no_drift_runs_nothing_and_says_what_no_drift_means(no_subprocess):
    versions = drift.Versions(PINS, dict(PINS), ONLY_PINS)
    decision = drift.decide(versions)
    assert decision.drifted == () and decision.checks == () and decision.held_back == ()
    assert decision.registry_only_pins
    text = drift.report(versions, "2026-12-01")
    assert "No drift found" in text and "## Unit tests" not in text and "## First half" not in text
    assert "lists only the pinned version of each library" in text
    assert "nothing newer was found here, not that the libraries are stable" in text
    assert "| transformers | 5.24.0 | 5.24.0 | 5.24.0 (only version listed) |" in text


def test_a_newer_transformers_is_drift_and_runs_the_checks(no_subprocess):
    installed = {**PINS, "transformers": "5.25.0"}
    registry = {**ONLY_PINS, "transformers": ("5.25.0", "5.24.0")}
    versions = drift.Versions(PINS, installed, registry)
    decision = drift.decide(versions)
    assert decision.drifted == ("transformers",) and decision.checks == drift.CHECKS
    assert not decision.registry_only_pins and decision.held_back == ()
    unit = (False, "1 failed, 300 passed")
    notebooks = [("01_lora.ipynb", True, "20 cells"), ("07_qlora.ipynb", False, "KeyError: 'rope_theta'")]
    text = drift.report(versions, "2026-12-08", unit, notebooks, minutes=12.34)
    assert "No drift" not in text
    assert "Drift: transformers differ from the pins, so the checks ran." in text
    assert "| transformers | 5.24.0 | 5.25.0 (newer) | 5.25.0 (of 2) |" in text
    assert "## Unit tests: FAILED" in text and "1 failed, 300 passed" in text
    assert "| 07_qlora.ipynb | BROKE: KeyError: 'rope_theta' |" in text and "Took 12.3 min." in text


def test_a_release_pip_did_not_install_is_reported_as_held_back():
    registry = {**ONLY_PINS, "accelerate": ("1.16.0", "1.15.0"), "torch": ("2.15.0", "2.13.0")}
    versions = drift.Versions(PINS, dict(PINS), registry)
    decision = drift.decide(versions)
    assert decision.checks == () and decision.held_back == ("accelerate",)  # torch is kept pinned on purpose
    text = drift.report(versions, "2026-12-04")
    assert "newer releases than pip installed for accelerate" in text and "lists only the pinned" not in text


def test_without_a_registry_listing_the_report_claims_no_more_than_pip_installed():
    text = drift.report(drift.Versions(PINS, dict(PINS)), "2026-12-01")
    assert "not recorded" in text and "lists only the pinned" not in text
    assert "nothing newer here that day, not that newer releases do not exist" in text


def test_pip_index_output_is_parsed_newest_first():
    output = "transformers (5.25.0)\nAvailable versions: 5.25.0, 5.24.0, 5.23.0\n  INSTALLED: 5.24.0\n"
    assert drift.parse_pip_index(output) == ("5.25.0", "5.24.0", "5.23.0")
    assert drift.parse_pip_index("ERROR: No matching distribution found for x\n") is None
