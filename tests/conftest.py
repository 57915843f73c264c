import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from tests import cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def compose_config(*overrides: str, hydra: bool = False, name: str = "config"):
    """The app's config (configs/NAME.yaml) composed with `overrides`, as the command line composes it;
    `hydra`: with the `hydra` node (run dir, choices)."""
    with initialize_config_module("lightning_idlg.configs", version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=hydra)


def run_app(*args, cwd=None, module: str = "lightning_idlg", timeout: float = 300, wait: bool = True, **env):
    """`python -m MODULE ARGS` as a user's shell runs it (tests/cli.py forks it from a preloaded process):
    W&B offline and never with a key, warnings off, the repository on PYTHONPATH (tests.toys); `env`
    adds or overrides variables. `wait=False`: the process itself (Popen), for kill and concurrency tests."""
    environ = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    environ.update(WANDB_MODE="offline", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    environ.update(env)
    command = [sys.executable, "-m", module, *map(str, args)]
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return cli.run(command, cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def pytest_sessionstart(session):
    """What the suite's time and its float results depend on: the CPU, its kernels, the load at the start
    (printed under -q too; once, by the main process under pytest-xdist)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or hasattr(session.config, "workerinput"):
        return
    reporter.write_line(f"CPU: {_cpu()}; {os.cpu_count()} cores; torch {torch.__version__}, CPU capability "
                        f"{torch.backends.cpu.get_cpu_capability()}; CUDA: {torch.cuda.is_available()}")
    reporter.write_line(f"load average at start: {_load()}")


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"load average at end: {_load()}")


@pytest.fixture
def one_thread():
    """Tiny tensors, many small ops: one intra-op thread is as fast and far less sensitive to a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
