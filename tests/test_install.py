"""course.install: the torch build `make setup` installs, case by case, without any network."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from course import install
from course.install import CPU_INDEX, DEFAULT_INDEX, Machine, torch_install_command

ROOT = Path(__file__).resolve().parent.parent
PIN = "2.13.0"
LINUX = Machine("Linux", "x86_64", nvidia_gpu=False)
LINUX_GPU = Machine("Linux", "x86_64", nvidia_gpu=True)
LINUX_ARM = Machine("Linux", "aarch64", nvidia_gpu=False)
MAC = Machine("Darwin", "arm64", nvidia_gpu=False)
WINDOWS = Machine("Windows", "AMD64", nvidia_gpu=False)
WINDOWS_GPU = Machine("Windows", "AMD64", nvidia_gpu=True)
DEFAULT = ["python", "-m", "pip", "install", "--no-deps", f"torch=={PIN}"]


def _index(argv: list[str]) -> str | None:
    return argv[argv.index("--index-url") + 1] if "--index-url" in argv else None


def test_linux_without_gpu_takes_the_cpu_index_fast_and_falls_back_to_the_default():
    plan = torch_install_command(PIN, LINUX)
    assert _index(plan.argv) == CPU_INDEX == "https://download.pytorch.org/whl/cpu"
    assert plan.argv[-1] == f"torch=={PIN}" and "--no-deps" in plan.argv
    timeout = int(plan.argv[plan.argv.index("--timeout") + 1])
    retries = int(plan.argv[plan.argv.index("--retries") + 1])
    assert timeout <= 15 and retries <= 1  # at most (1 + 1) x 15 s on an index that drops packets
    assert plan.fallback == DEFAULT
    assert torch_install_command(PIN, LINUX_ARM).argv == plan.argv  # the CPU index has aarch64 wheels too


def test_a_local_wheel_is_taken_without_any_index():
    plan = torch_install_command(PIN, LINUX, local_wheel=True)
    assert plan.argv == ["python", "-m", "pip", "install", "--no-deps", "--no-index", f"torch=={PIN}"]
    assert plan.fallback is None and "find-links" in plan.why
    assert torch_install_command(PIN, MAC, local_wheel=True).argv == plan.argv


def test_an_nvidia_gpu_gets_the_default_index_even_beside_a_local_wheel():
    plan = torch_install_command(PIN, LINUX_GPU, local_wheel=True)
    assert plan.argv == DEFAULT and plan.fallback is None and "CUDA" in plan.why


@pytest.mark.parametrize("machine", [MAC, WINDOWS])
def test_macos_and_windows_take_the_default_index_whose_wheel_has_no_cuda(machine):
    plan = torch_install_command(PIN, machine)
    assert plan.argv == DEFAULT and plan.fallback is None


def test_windows_with_a_gpu_is_told_how_to_get_cuda():
    plan = torch_install_command(PIN, WINDOWS_GPU)
    assert plan.argv == DEFAULT and "TORCH_INDEX=https://download.pytorch.org/whl/cu128" in plan.why


@pytest.mark.parametrize("machine", [LINUX, LINUX_GPU, MAC])
def test_an_override_wins_on_every_machine(machine):
    cuda = "https://download.pytorch.org/whl/cu128"
    plan = torch_install_command(PIN, machine, index=cuda, local_wheel=True)
    assert _index(plan.argv) == cuda and "--no-index" not in plan.argv
    assert (
        "--retries" in plan.argv and plan.fallback is None
    )  # the build asked for, or an error: never another
    assert torch_install_command(PIN, machine, index=DEFAULT_INDEX, local_wheel=True).argv == DEFAULT


def test_wrong_arguments_are_refused_at_the_door():
    with pytest.raises(ValueError, match="cu128"):
        torch_install_command(PIN, LINUX, index="cu128")  # a name, not an index URL
    with pytest.raises(ValueError, match="2.13.0"):
        torch_install_command("torch==2.13.0", LINUX)


def test_the_pin_is_the_one_in_constraints():
    assert install.read_pin() == PIN
    assert f"torch=={install.read_pin()}" in (ROOT / "constraints.txt").read_text().splitlines()


def _main(monkeypatch, *, machine=LINUX, installed=None, local=False, codes=(0,)):
    """Run install.main with the machine and pip faked; returns the commands it ran."""
    ran, codes = [], list(codes)
    monkeypatch.setattr(install, "installed_torch", lambda: installed)
    monkeypatch.setattr(install, "this_machine", lambda: machine)
    monkeypatch.setattr(install, "local_wheel_available", lambda pin: local)
    monkeypatch.setattr(install, "_run", lambda argv: ran.append(argv) or codes.pop(0))
    return ran


def test_main_keeps_an_installed_torch(monkeypatch, capsys):
    ran = _main(monkeypatch, installed="2.13.0+cpu")
    assert install.main([]) == 0 and ran == []
    assert "already installed" in capsys.readouterr().out


def test_main_falls_back_to_the_default_index_with_a_message(monkeypatch, capsys):
    ran = _main(monkeypatch, codes=(1, 0))
    assert install.main([]) == 0
    assert _index(ran[0]) == CPU_INDEX and ran[1][-2:] == ["--no-deps", f"torch=={PIN}"]
    assert "falling back to the default index" in capsys.readouterr().err


def test_main_does_not_fall_back_from_an_index_asked_for(monkeypatch, capsys):
    ran = _main(monkeypatch, codes=(1,))
    assert install.main(["--index", "https://download.pytorch.org/whl/cu128"]) == 1 and len(ran) == 1
    assert "could not be installed" in capsys.readouterr().err


def test_main_takes_the_local_wheel_here(monkeypatch):
    ran = _main(monkeypatch, local=True)
    assert install.main([]) == 0 and len(ran) == 1 and "--no-index" in ran[0]


def test_install_imports_only_the_standard_library():
    """The Makefile runs it with the new venv's bare Python, before anything is installed."""
    tree = ast.parse((ROOT / "course" / "install.py").read_text())
    names = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    names |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert names <= sys.stdlib_module_names, names - sys.stdlib_module_names


def test_dry_run_prints_the_command_without_site_packages():
    """`python -S`: no site-packages, as in a fresh venv; --dry-run decides and prints, installs nothing."""
    done = subprocess.run(
        [sys.executable, "-S", str(ROOT / "course" / "install.py"), "--dry-run", "--index", CPU_INDEX],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"--index-url {CPU_INDEX}" in done.stdout and f"torch=={PIN}" in done.stdout


def test_makefile_installs_torch_through_install_before_the_rest():
    lines = (ROOT / "Makefile").read_text().splitlines()
    torch_step = next(
        i for i, line in enumerate(lines) if "course/install.py --index '$(TORCH_INDEX)'" in line
    )
    rest_step = next(i for i, line in enumerate(lines) if '-e ".[test,lab]"' in line)
    assert torch_step < rest_step
    assert "TORCH_INDEX ?= auto" in lines
