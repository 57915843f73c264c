import os
import platform

import pytest
import torch


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
