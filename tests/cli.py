"""The package's command lines for the tests, each in a process of its own, without paying Python's start
(torch, Lightning, torchmetrics: 4-5 of the 5.5 s of a refused run on the 2-core machine) for every one.

`run` takes subprocess.run's arguments. A command `[sys.executable, "-m", <a module of this package>, ...]`
is forked from a server process that has imported the package's heavy modules once and has run nothing;
the fork then runs the module as `python -m` would (its own cwd, environment, sys.argv, sys.path[0], warning
options, stdin closed), so a test sees what a user's shell would: its exit code and its stdout and stderr.
Any other command goes to subprocess.run. One server per test process (one per pytest-xdist worker).

Tests that must see a whole interpreter start (the installed console script, kill -9, concurrent runs,
DDP ranks) keep calling subprocess themselves."""

from __future__ import annotations

import atexit
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ("lightning_idlg.app", "lightning_idlg.run.experiment", "lightning_idlg.report")
_server: subprocess.Popen | None = None


def run(args, *, cwd=None, env=None, capture_output=False, text=False, timeout=None, **rest):
    """subprocess.run for a command of this package's modules, forked from the preloaded server."""
    args = [str(a) for a in args]
    module = args[2] if len(args) > 2 and args[:2] == [sys.executable, "-m"] else None
    if module is None or not module.startswith("lightning_idlg") or rest:
        return subprocess.run(args, cwd=cwd, env=env, capture_output=capture_output, text=text, timeout=timeout,
                              **rest)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        request = dict(module=module, argv=args[3:], cwd=str(cwd or os.getcwd()),
                       env=dict(os.environ if env is None else env), stdout=str(out), stderr=str(err))
        code = _ask(request, timeout, args)
        stdout, stderr = out.read_bytes(), err.read_bytes()
    if not capture_output:  # as subprocess.run: the child's output goes where ours goes
        sys.stdout.buffer.write(stdout), sys.stderr.buffer.write(stderr)
        stdout = stderr = None
    elif text:
        stdout, stderr = stdout.decode(errors="replace"), stderr.decode(errors="replace")
    return subprocess.CompletedProcess(args, code, stdout, stderr)


def _ask(request: dict, timeout: float | None, args: list[str]) -> int:
    server = _start()
    _send(server.stdin, request)
    pid = _receive(server.stdout, None)
    try:
        return _receive(server.stdout, timeout)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        _receive(server.stdout, None)
        raise subprocess.TimeoutExpired(args, timeout) from None


def _start() -> subprocess.Popen:
    global _server
    if _server is None or _server.poll() is not None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        _server = subprocess.Popen([sys.executable, "-c", "from tests.cli import serve; serve()"], cwd=ROOT,
                                   env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        atexit.register(_server.kill)
    return _server


def _send(pipe, value) -> None:
    data = pickle.dumps(value)
    pipe.write(struct.pack("<Q", len(data)) + data)
    pipe.flush()


def _receive(pipe, timeout: float | None):
    if timeout is not None and not select.select([pipe], [], [], timeout)[0]:
        raise TimeoutError
    head = pipe.read(8)
    if len(head) < 8:
        raise RuntimeError("the test CLI server ended")
    return pickle.loads(pipe.read(struct.unpack("<Q", head)[0]))


def serve() -> None:
    """The server: import the heavy modules, then fork one child per request and report its exit code."""
    import importlib

    # the protocol on descriptors of its own: what an import or a child prints cannot mix into it
    requests, replies = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    for name in PRELOAD:
        importlib.import_module(name)
    while True:
        try:
            request = _receive(requests, None)
        except RuntimeError:
            return
        pid = os.fork()
        if pid == 0:
            _child(request)
        _send(replies, pid)
        _, status = os.waitpid(pid, 0)
        _send(replies, os.waitstatus_to_exitcode(status))


def _child(request: dict) -> None:
    """Run `python -m module argv...` in this forked process, then leave it (never return)."""
    import atexit
    import runpy
    import traceback
    import warnings

    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        # as `python -m`: the working directory first on sys.path, then PYTHONPATH's entries
        extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.getcwd(), *extra, *[p for p in sys.path[1:] if p not in extra]]
        warnings.resetwarnings()
        options = [o for o in os.environ.get("PYTHONWARNINGS", "").split(",") if o]
        if options:
            warnings._processoptions(options)  # what the interpreter does with PYTHONWARNINGS
        sys.argv = [request["module"], *request["argv"]]
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if done.code is not None and not isinstance(done.code, int):
            print(done.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as the interpreter: the traceback on stderr, exit code 1
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()  # as an interpreter's exit: logging's flush, W&B's finish
            sys.stdout.flush(), sys.stderr.flush()
        finally:
            os._exit(code)
