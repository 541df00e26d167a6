"""course.launch: torchrun workers started, streamed, and always ended, also when one fails."""

import psutil
import pytest

from course.launch import LOOPBACK, WorkerFailed, free_port, launch, torchrun_command


def _workers_with(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_command_rendezvous_on_loopback_only():
    command = torchrun_command(
        "course.workers.train", ["--out", "x"], nproc_per_node=2, nnodes=2, node_rank=1, port=1234
    )
    assert f"--master_addr={LOOPBACK}" in command and "--node_rank=1" in command and "--nnodes=2" in command
    assert command[-3:] == ["course.workers.train", "--out", "x"]
    with pytest.raises(ValueError, match="node_rank"):
        torchrun_command("course.workers.train", nnodes=2, node_rank=2, port=1)
    with pytest.raises(ValueError, match="module"):
        torchrun_command("rm -rf /", port=1)
    assert 0 < free_port() < 65536


def test_a_killed_worker_is_reported_and_nothing_is_left(tmp_path):
    out = tmp_path / "killed"
    with pytest.raises(WorkerFailed) as failure:
        launch(
            "course.workers.train",
            ["--out", out, "--modes", "by_hand", "--fail-rank", "1"],
            timeout=120,
            echo=False,
        )
    message = str(failure.value)
    assert "rank 1" in message and "SIGKILL" in message, message
    assert failure.value.result.left_running == 0
    assert not failure.value.result.ok
    assert _workers_with(str(out)) == []  # neither torchrun nor the surviving rank 0 is still running


def test_a_timeout_ends_every_process(tmp_path):
    out = tmp_path / "slow"
    with pytest.raises(WorkerFailed, match="did not finish within 2 s"):
        launch("course.workers.train", ["--out", out, "--modes", "by_hand"], timeout=2, echo=False)
    assert _workers_with(str(out)) == []


def test_check_false_returns_the_failure(tmp_path):
    out = tmp_path / "unchecked"
    result = launch(
        "course.workers.train", ["--out", out, "--modes", "nonsense"], timeout=60, echo=False, check=False
    )
    assert not result.ok and "unknown modes" in result.output
    assert _workers_with(str(out)) == []


def test_the_failure_quotes_the_workers_message_not_torchruns_traceback(tmp_path):
    out = tmp_path / "quoted"
    with pytest.raises(WorkerFailed) as failure:
        launch("course.workers.train", ["--out", out, "--modes", "nonsense"], timeout=60, echo=False)
    quoted = str(failure.value).partition("Last lines of output:")[2]
    assert "unknown modes" in quoted and "elastic" not in quoted, quoted


def test_shipped_fsdp_qlora_config_parses():
    from pathlib import Path

    from accelerate.commands.config.config_args import ClusterConfig

    path = Path(__file__).resolve().parent.parent / "configs" / "fsdp_qlora.yaml"
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type == "FSDP" and config.num_processes == 2
    assert config.fsdp_config["fsdp_use_orig_params"] is False
    assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"] is True
    assert config.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
