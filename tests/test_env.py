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


@pytest.mark.parametrize(
    ("bf16_supported", "dtype", "flags"),
    [
        (True, torch.bfloat16, {"bf16": True, "fp16": False}),
        (False, torch.float16, {"bf16": False, "fp16": True}),
    ],
    ids=["ampere", "t4"],
)
def test_compute_dtype_on_a_faked_gpu(monkeypatch, bf16_supported, dtype, flags):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    assert course.env.compute_dtype("cuda") == dtype
    assert course.env.trainer_precision("cuda") == flags
    assert course.env.compute_dtype("cpu") == torch.float32  # a GPU elsewhere changes nothing on CPU
    assert course.env.trainer_precision("cpu") == {"bf16": False, "fp16": False}


def test_sft_config_takes_its_precision_from_the_course(monkeypatch, tmp_path):
    asked = []

    def faked(device=None):
        asked.append(device)
        return {"bf16": False, "fp16": False}

    monkeypatch.setattr(course.env, "trainer_precision", faked)
    config = course.sft.sft_config(tmp_path, max_length=64, learning_rate=1e-3)
    assert asked and not config.bf16 and not config.fp16


def test_course_device_overrides_the_choice_and_refuses_a_typo(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert course.env.pick_device() == torch.device("cpu")
    monkeypatch.setenv("COURSE_DEVICE", "meta")
    assert course.env.pick_device() == torch.device("meta")  # the override wins over what is available
    monkeypatch.setenv("COURSE_DEVICE", "gpu0")
    with pytest.raises(ValueError, match="COURSE_DEVICE"):
        course.env.pick_device()
