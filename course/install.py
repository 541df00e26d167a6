"""Which torch build `make setup` installs, and the pip command that installs it.

`pip install torch==2.13.0` from the default index (PyPI) gives a different build on each platform:
on Linux x86_64 the CUDA build, which pulls in gigabytes of CUDA libraries; on macOS the CPU/MPS
build; on Windows the CPU build. The CPU build for Linux lives on PyTorch's own wheel index
(https://download.pytorch.org/whl/cpu, version `2.13.0+cpu`), as PyTorch's install page gives it:
`pip install torch --index-url https://download.pytorch.org/whl/cpu`. So on a machine without an
NVIDIA GPU we go there, unless pip already finds the pinned torch without any index (a wheel in the
`--find-links` folders of your pip configuration, as on the course's machines).

The decision is `torch_install_command`, a pure function of the machine; `main` only looks at
the machine, runs the command and, if PyTorch's CPU index cannot be reached, falls back to the
default index with a message. Standard library only: the Makefile runs it with the new venv's
Python before anything is installed into it.

    python course/install.py                  # auto: what `make setup` does
    python course/install.py --index URL      # that index (e.g. .../whl/cu128 for CUDA 12.8)
    python course/install.py --index ''       # the default index (your pip configuration)
    python course/install.py --dry-run        # print the decision and the command, run nothing

Worked example, Linux x86_64 without a GPU and no local wheel:
    python -m pip install --no-deps --index-url https://download.pytorch.org/whl/cpu
        --timeout 15 --retries 1 torch==2.13.0

`--no-deps`: this step fetches torch alone; the next step of `make setup` (`pip install -c
constraints.txt -e .[test,lab]`) installs torch's dependencies at the pinned versions from the
default index, so PyTorch's index only has to serve torch itself.
"""

import argparse
import importlib.metadata
import platform
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
AUTO = "auto"  # --index auto: decide from the machine
DEFAULT_INDEX = ""  # --index '': the default index, i.e. whatever the user's pip configuration says
# An unreachable index must not cost minutes. pip retries a connection 5 times by default, each
# waiting up to --timeout (15 s by default, and PIP_DEFAULT_TIMEOUT may raise it: 180 s on the course
# machines). Measured here, with a host whose name does not resolve: default settings 8.5 s (5 retries
# with backoff), `--retries 1` 1.2 s; a host that drops packets costs up to (1 + retries) x timeout.
# Options on the command line override PIP_* variables and pip.conf (pip 26.3's parser, checked:
# PIP_DEFAULT_TIMEOUT=180 PIP_RETRIES=7 with `--timeout 15 --retries 1` gives 15 s and 1).
FAST_FAIL = ("--timeout", "15", "--retries", "1")


@dataclass(frozen=True)
class Machine:
    system: str  # platform.system(): "Linux", "Darwin", "Windows"
    arch: str  # platform.machine(): "x86_64", "arm64", "aarch64", "AMD64"
    nvidia_gpu: bool  # nvidia-smi is on PATH and lists a GPU

    @property
    def label(self) -> str:
        gpu = "an NVIDIA GPU" if self.nvidia_gpu else "no NVIDIA GPU"
        return f"{self.system} {self.arch}, {gpu}"


@dataclass(frozen=True)
class TorchInstall:
    argv: list[str]  # the pip command
    why: str  # one line for the learner
    fallback: list[str] | None = None  # run this if argv fails (PyTorch's index unreachable), else None


def torch_install_command(
    pin: str,
    machine: Machine,
    *,
    index: str = AUTO,
    local_wheel: bool = False,
    python: str = "python",
) -> TorchInstall:
    """The pip command that installs torch==pin on `machine`.

    index: AUTO (decide), DEFAULT_INDEX ('': the default index) or an index URL (that one).
    local_wheel: pip finds torch==pin without any index (`--no-index`, i.e. in --find-links).

    >>> linux = Machine("Linux", "x86_64", nvidia_gpu=False)
    >>> torch_install_command("2.13.0", linux).argv[4:7]
    ['--no-deps', '--index-url', 'https://download.pytorch.org/whl/cpu']
    """
    if not pin or "==" in pin:
        raise ValueError(f"pin must be a version such as '2.13.0', got {pin!r}")
    if index not in (AUTO, DEFAULT_INDEX) and not index.startswith(("https://", "http://", "file:")):
        raise ValueError(
            f"index must be 'auto', '' (the default index) or an index URL such as "
            f"https://download.pytorch.org/whl/cu128, got {index!r}"
        )
    pip = [python, "-m", "pip", "install", "--no-deps"]
    requirement = f"torch=={pin}"
    default = [*pip, requirement]
    if index == DEFAULT_INDEX:
        return TorchInstall(default, "the default index (TORCH_INDEX is empty)")
    if index != AUTO:
        return TorchInstall([*pip, "--index-url", index, *FAST_FAIL, requirement], f"{index} (TORCH_INDEX)")
    on = f"{machine.label} -> "
    if machine.nvidia_gpu:
        if machine.system == "Windows":
            return TorchInstall(
                default,
                on + "the default index, whose Windows wheel is CPU-only: for CUDA, set "
                "TORCH_INDEX=https://download.pytorch.org/whl/cu128 (or your CUDA version's index)",
            )
        return TorchInstall(default, on + "the default index (on Linux x86_64 its wheel is the CUDA build)")
    if local_wheel:
        return TorchInstall(
            [*pip, "--no-index", requirement],
            on + "a wheel pip finds without any index (the --find-links of your pip configuration)",
        )
    if machine.system == "Linux":
        return TorchInstall(
            [*pip, "--index-url", CPU_INDEX, *FAST_FAIL, requirement],
            on + "PyTorch's CPU index (the default index would install the CUDA build, several GB)",
            fallback=default,
        )
    return TorchInstall(default, on + f"the default index (its {machine.system} wheel has no CUDA)")


def read_pin(constraints: Path = ROOT / "constraints.txt") -> str:
    """torch's version in constraints.txt: '2.13.0'."""
    for line in constraints.read_text().splitlines():
        if line.startswith("torch=="):
            return line.removeprefix("torch==").strip()
    raise ValueError(f"{constraints} pins no torch (expected a line torch==X.Y.Z)")


def installed_torch() -> str | None:
    """The version of torch installed for this Python ('2.13.0+cpu'), or None."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def nvidia_gpu_present() -> bool:
    """nvidia-smi is on PATH and lists at least one GPU (a driver without a GPU lists none)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def local_wheel_available(pin: str, python: str = sys.executable) -> bool:
    """pip resolves torch==pin with no index at all (under a second; installs nothing)."""
    probe = [
        python,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--quiet",
        "--no-deps",
        "--no-index",
        f"torch=={pin}",
    ]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def this_machine() -> Machine:
    return Machine(platform.system(), platform.machine(), nvidia_gpu_present())


def _run(argv: list[str]) -> int:
    print("+ " + shlex.join(argv), flush=True)
    return subprocess.run(argv, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--index", default=AUTO, help="'auto' (default), an index URL, or '' for the default index"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the decision and the command only")
    args = parser.parse_args(argv)
    pin = read_pin()
    have = installed_torch()
    if have is not None and have.split("+")[0] == pin:
        print(f"torch {have} is already installed: kept (`make clean` first to install another build)")
        return 0
    machine = this_machine()
    local = args.index == AUTO and not machine.nvidia_gpu and local_wheel_available(pin)
    try:
        plan = torch_install_command(pin, machine, index=args.index, local_wheel=local, python=sys.executable)
    except ValueError as error:
        parser.error(str(error))
    print(f"torch=={pin}: {plan.why}")
    if args.dry_run:
        print("+ " + shlex.join(plan.argv))
        return 0
    if (code := _run(plan.argv)) == 0:
        print(f"installed torch {installed_torch()}")  # e.g. 2.13.0+cpu: which build pip chose
        return 0
    if plan.fallback is None:
        print(f"torch=={pin} could not be installed ({plan.why})", file=sys.stderr)
        return code
    print(
        f"PyTorch's CPU index ({CPU_INDEX}) could not be reached or has no torch=={pin} for this machine; "
        "falling back to the default index. On Linux x86_64 that is the CUDA build (several GB): to avoid it, "
        "stop now (Ctrl-C) and run `make setup` again when the CPU index is reachable.",
        file=sys.stderr,
        flush=True,
    )
    if (code := _run(plan.fallback)) == 0:
        print(f"installed torch {installed_torch()}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
