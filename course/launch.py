"""Starting torchrun workers from a notebook or a test, and always ending them.

`torchrun` (the console script of `torch.distributed.run`) starts one worker process per
rank, sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each, and, when
one worker fails, stops the others and exits with an error that names the failed rank.
A notebook cell that starts it must never leave processes behind: a worker stuck in a
collective waits for its peer forever. So `launch` runs torchrun in its own process group,
streams every line the workers print, and in a `finally` kills whatever it started and is
still alive (torchrun starts each worker in a new session, so we follow the process tree
with psutil rather than trusting the group). A failure becomes a `WorkerFailed` whose
message says which rank died, how, and what it printed last.

Rendezvous is always on 127.0.0.1 (loopback) with a free port: a "multi-node" job here is
several torchrun groups on the same machine, each with its own `--node_rank`, exactly the
command one types on each node of a real cluster with the first node's address instead.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import psutil

LOOPBACK = "127.0.0.1"


class WorkerFailed(RuntimeError):
    """A torchrun job ended with a non-zero exit code (its output is attached)."""

    def __init__(self, message: str, result: "LaunchResult"):
        super().__init__(message)
        self.result = result


@dataclass
class LaunchResult:
    command: list[list[str]]  # one torchrun command per node
    returncodes: list[int | None]  # one per node (None: still running when the job was stopped)
    lines: list[str] = field(default_factory=list)  # all output, prefixed "[node k] " with several nodes
    seconds: float = 0.0
    left_running: int = 0  # processes still alive after the cleanup (0 unless the OS refused to kill)

    @property
    def ok(self) -> bool:
        return all(code == 0 for code in self.returncodes)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def torchrun_command(
    module: str,
    args: list[str] = (),
    *,
    nproc_per_node: int = 2,
    nnodes: int = 1,
    node_rank: int = 0,
    port: int,
) -> list[str]:
    """The torchrun command line for one node; `module` runs as `python -m module`.

    On a cluster the same line runs on every node, with MASTER_ADDR the first node's address
    and its own --node_rank; here the address is always loopback.
    """
    if nproc_per_node < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(
            f"need nproc_per_node >= 1, nnodes >= 1 and 0 <= node_rank < nnodes, "
            f"got {nproc_per_node}, {nnodes}, {node_rank}"
        )
    if not re.fullmatch(r"[A-Za-z_][\w.]*", module):
        raise ValueError(
            f"module must be a dotted module name such as 'course.workers.train', got {module!r}"
        )
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc_per_node}", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
        f"--master_addr={LOOPBACK}", f"--master_port={port}",
        "-m", module, *map(str, args),
    ]  # fmt: skip


def _descendants(procs: list[subprocess.Popen]) -> list[psutil.Process]:
    found = []
    for proc in procs:
        try:
            found += psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    return found


def _end(procs: list[subprocess.Popen], known: dict[int, psutil.Process], grace: float = 5.0) -> int:
    """SIGTERM, then SIGKILL, every process we started or saw; returns how many survive."""
    everyone = {p.pid: p for p in _descendants(procs)}
    everyone.update({pid: p for pid, p in known.items() if p.is_running()})
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for p in everyone.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(everyone.values()), timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)
    _, alive = psutil.wait_procs(alive, timeout=grace)
    return len(alive)


def _why(lines: list[str], returncodes: list[int | None], timed_out: bool, timeout: float) -> str:
    """One sentence on what went wrong, from torchrun's own report where it gave one."""
    if timed_out:
        return f"the job did not finish within {timeout:.0f} s and was killed"
    text = "\n".join(lines)
    root = text.rpartition("Root Cause")[2]  # torchrun's report names the first failure there
    rank = re.search(r"rank\s*:\s*(\d+)", root)
    code = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    detail = ""
    if rank:
        detail = f": rank {rank.group(1)} failed first"
        if code:
            value = int(code.group(1))
            how = f"killed by {signal.Signals(-value).name}" if value < 0 else f"exit code {value}"
            detail += f" ({how}); torchrun then stopped the other ranks"
    return f"torchrun exited with {returncodes}{detail}"


def _workers_tail(lines: list[str], n: int = 15) -> list[str]:
    """The workers' own last lines: what they printed before torchrun's report of their failure.

    torchrun's report (its elastic agent's log lines and traceback) ends the output and would
    otherwise fill the quoted tail with its own frames, hiding the worker's error message.
    """
    report = next((i for i, line in enumerate(lines) if "torch/distributed/elastic" in line), len(lines))
    return lines[max(0, report - n) : report]


def launch(
    module: str,
    args: list[str] = (),
    *,
    nproc_per_node: int = 2,
    nnodes: int = 1,
    timeout: float = 300.0,
    echo: bool = True,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> LaunchResult:
    """Run `python -m module args` on nnodes x nproc_per_node ranks and wait for them.

    Each node is one torchrun process on loopback. Output lines are printed as they arrive
    (echo) and collected. Every process started is ended before this returns, also on a
    timeout, a failure or a KeyboardInterrupt. With `check`, a failed job raises WorkerFailed
    (its message names the failed rank and quotes the workers' last lines); without, the result says.
    """
    port = free_port()
    commands = [
        torchrun_command(module, args, nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=k, port=port)
        for k in range(nnodes)
    ]
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    # one share of the cores per worker (torchrun would set 1 and print a banner about it)
    # (all nodes share this machine: loopback)
    child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (nproc_per_node * nnodes))))
    lines: list[str] = []
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    known: dict[int, psutil.Process] = {}
    start = time.perf_counter()

    def pump(stream, prefix):
        for line in stream:
            line = prefix + line.rstrip("\n")
            with lock:
                lines.append(line)
                if echo:
                    print(line, flush=True)

    threads = []
    returncodes: list[int | None] = [None] * nnodes
    timed_out = False
    try:
        for k, command in enumerate(commands):
            proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=child_env,
                start_new_session=True,  # a Ctrl-C in the notebook reaches us, not the workers directly
            )
            procs.append(proc)
            thread = threading.Thread(target=pump, args=(proc.stdout, f"[node {k}] " if nnodes > 1 else ""))
            thread.start()
            threads.append(thread)
        deadline = start + timeout
        while any(p.poll() is None for p in procs):
            if time.perf_counter() > deadline:
                timed_out = True
                break
            known.update(
                {p.pid: p for p in _descendants(procs)}
            )  # remember workers, should torchrun die first
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one node failed: its peers would wait for it until their own timeout
            time.sleep(0.2)
        returncodes = [p.poll() for p in procs]
    finally:
        left = _end(procs, known)
        for thread in threads:
            thread.join(timeout=5)
    result = LaunchResult(commands, returncodes, lines, time.perf_counter() - start, left)
    if check and (not result.ok or left):
        tail = "\n".join(_workers_tail(lines))
        message = _why(lines, returncodes, timed_out, timeout)
        if left:
            message += f"; {left} processes could not be ended"
        raise WorkerFailed(f"{message}. Last lines of output:\n{tail}", result)
    return result
