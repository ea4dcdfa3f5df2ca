"""`accelerate launch` of several CPU processes (torchrun with gloo), as a user would launch on GPUs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(*command: str, processes: int = 2, timeout: int = 300, env: dict[str, str] | None = None,
                      config_file: str | None = None) -> subprocess.CompletedProcess:
    """Run `accelerate launch --multi_gpu --num_processes N COMMAND...` from the repository root (`env`: extra variables;
    `config_file`: an accelerate config launched in place of `--multi_gpu`, its processes and precision overridden).

    `--multi_gpu` on a CPU machine starts N processes that form a gloo group (`--cpu` alone
    would start one process unless MPI is installed).
    """
    mode = ["--config_file", config_file] if config_file else ["--multi_gpu"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), *command]
    return subprocess.run(launch, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})
