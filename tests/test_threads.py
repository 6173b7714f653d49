"""--threads: how many CPU threads torch gets, and auto's choice on a busy or idle machine."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vacap.model import auto_threads, busy_elsewhere

SAMPLE = Path(__file__).resolve().parent.parent / "sample_images" / "scene_2.png"


@pytest.mark.parametrize(
    "cores, busy, expected",
    [
        (2, 0.0, 2),  # an idle machine: every core
        (2, 0.4, 2),
        (2, 1.0, 1),  # another process holds a core
        (2, 7.5, 1),  # a crowded machine: never fewer than one
        (16, 3.2, 13),
        (4, -0.2, 4),  # never more than the cores
    ],
)
def test_auto_takes_the_cores_other_processes_leave_idle(cores, busy, expected):
    assert auto_threads(cores, busy) == expected


def caption(*args, env=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "vacap.cli", "caption", str(SAMPLE), "--model", "demo", "--max-new-tokens", "4"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, env=env)


def said_threads(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, out.stderr
    (line,) = [line for line in out.stderr.splitlines() if "torch threads:" in line]
    return line.split("torch threads: ", 1)[1]


def test_threads_given_auto_and_omp_num_threads():
    assert said_threads(caption("--threads", "1", "-v")) == "1 (as given)"
    # OMP_NUM_THREADS is a standing choice that auto keeps (the suite sets it to 1).
    assert said_threads(caption("-v", env={**os.environ, "OMP_NUM_THREADS": "1"})) == "1 (auto: OMP_NUM_THREADS)"
    unset = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    count, why = said_threads(caption("-v", env=unset)).split(" ", 1)
    cores = len(os.sched_getaffinity(0))
    assert 1 <= int(count) <= cores and why.startswith(f"(auto: {cores} cores, ") and "busy with other" in why


def test_auto_sees_processes_that_hold_the_cores_now():
    """Other processes spinning on every core: auto takes one thread, not one per core."""
    cores = len(os.sched_getaffinity(0))
    spin = [sys.executable, "-c", "while True: pass"]
    spinners = [subprocess.Popen(spin) for _ in range(cores)]
    try:
        time.sleep(0.5)
        assert busy_elsewhere() >= cores - 0.5
        unset = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        assert said_threads(caption("-v", env=unset)).startswith("1 (auto: ")
    finally:
        for process in spinners:
            process.kill()
            process.wait()


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_thread_count_that_is_not_one_or_more_is_a_usage_error(value):
    out = caption("--threads", value)
    assert out.returncode == 2
    said = " ".join(out.stderr.replace("│", " ").split())
    assert f"'{value}' is not a thread count; use auto or a whole number of at least 1" in said
