"""Runs Python snippets on fake CPU devices or as several local processes, for tests.

The pytest process may already have initialised JAX with one CPU device, so tests that need
several devices run their code in a fresh interpreter with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``. A snippet reports back by printing one
JSON value as the last line of its stdout::

    from _multidevice import run_snippet  # tests/ is on sys.path under pytest
    out = run_snippet('''
    import json, jax
    print(json.dumps(len(jax.devices())))
    ''')
    assert out == 8

``run_processes`` starts ``num_processes`` such interpreters that find each other through
``JAXPO_COORDINATOR=127.0.0.1:<free port>``, ``JAXPO_NUM_PROCESSES`` and ``JAXPO_PROCESS_ID``
(what :func:`jaxpo.sharding.maybe_initialize` reads) and returns each one's JSON value.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snippet_env(devices: int = 8, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a snippet: CPU only, ``devices`` fake devices, the repo importable."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    for key in ("JAXPO_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "JAXPO_NUM_PROCESSES",
                "JAXPO_PROCESS_ID"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def _parse(code: str, proc: subprocess.CompletedProcess | Any, stdout: str, stderr: str) -> Any:
    if proc.returncode != 0:
        raise AssertionError(
            f"snippet exited with {proc.returncode}\n--- stderr (tail) ---\n{stderr[-4000:]}\n"
            f"--- stdout (tail) ---\n{stdout[-2000:]}"
        )
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise AssertionError(f"snippet printed nothing\n--- stderr ---\n{stderr[-4000:]}")
    return json.loads(lines[-1])


def run_snippet(
    code: str, *, devices: int = 8, timeout: float = 240, env: dict[str, str] | None = None
) -> Any:
    """Runs ``code`` in a fresh interpreter with ``devices`` fake CPU devices.

    Returns:
        The JSON value printed on the snippet's last stdout line.

    Raises:
        AssertionError: with the snippet's stderr when it fails; ``subprocess.TimeoutExpired``
        after ``timeout`` seconds.
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=snippet_env(devices, env),
        cwd=REPO_ROOT,
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
    )
    return _parse(code, proc, proc.stdout, proc.stderr)


def run_processes(
    code: str, *, num_processes: int = 2, devices_per_process: int = 1, timeout: float = 240,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Runs ``code`` as ``num_processes`` local processes joined by a coordinator on 127.0.0.1
    (``env``: extra environment variables for every process).

    Returns:
        The JSON value printed by each process, in process-id order.
    """
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for pid in range(num_processes):
        proc_env = snippet_env(devices_per_process, {
            **(env or {}),
            "JAXPO_COORDINATOR": address,
            "JAXPO_NUM_PROCESSES": str(num_processes),
            "JAXPO_PROCESS_ID": str(pid),
        })
        procs.append(subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)], env=proc_env, cwd=REPO_ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    outputs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            outputs.append(_parse(code, proc, stdout, stderr))
    finally:
        for proc in procs:  # only the processes started here
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs
