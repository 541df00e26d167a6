import pytest
import torch

import course


def test_device_and_dtype_on_cpu():
    device = course.env.pick_device()
    if not torch.cuda.is_available():
        assert device.type in {"cpu", "mps"}
    assert course.env.compute_dtype("cpu") == torch.float32


def test_seed_everything_makes_torch_repeatable():
    course.env.seed_everything(7)
    a = torch.randn(5)
    course.env.seed_everything(7)
    assert torch.equal(a, torch.randn(5))


def test_report_names_versions_and_device(capsys):
    course.env.report()
    out = capsys.readouterr().out
    for package in ("torch", "transformers", "peft", "bitsandbytes"):
        assert package in out
    assert "device" in out and "threads" in out


def test_not_in_colab_here():
    assert course.env.in_colab() is False


def test_course_names_unknown_attribute():
    with pytest.raises(AttributeError, match="no_such_module"):
        course.no_such_module  # noqa: B018
