"""`vacap caption --ray` on a local Ray instance with 2 CPUs, as a user runs it: the CLI in real
subprocesses with the demo model, the JSONL read back and compared with a local run's."""

from __future__ import annotations

import os
import re
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers import summary_counts

from vacap.demo import MODEL_DIR
from vacap.demo.worlds import scenes
from vacap.records import scan

VACAP = [sys.executable, "-m", "vacap.cli"]
# fp32: records are compared with a local run's, caption for caption. Clean-up and trimming set
# alike with and without caption files, so that runs with them and without have the same settings.
DEMO = ["--model", "demo", "--dtype", "fp32", "--method", "greedy", "--max-new-tokens", "16", "--no-clean"]
DEMO += ["--no-trim-incomplete"]
IMAGES = 24  # about 5 s of captioning with one worker here: long enough to kill a run midway
# Every Ray process the tests start keeps its files in this folder (RAY_TMPDIR), which the module
# checks for at the end: no process may hold one. Short, for the socket paths Ray makes in it.
RAY_TMP = os.path.join(tempfile.gettempdir(), f"vacap-ray-{os.getpid()}")
WORKER = re.compile(r"vacap: worker pid (\d+) loaded")
READER = re.compile(r"vacap: reader pid (\d+) read (\d+) images, prepared (\d+)")
GOT = re.compile(r"vacap: worker pid (\d+) got (\d+) images, (\d+) prepared")


# Joining the test's cluster failed here with Ray's token authentication on (the default of
# Ray 2.60), even from a bare ray.init on the same machine; the tests run without it.
# Ray folds log lines of several processes that differ only in their numbers into one
# "[repeated Nx across cluster]": the tests count such lines, each with its pid.
RAY_ENV = {"RAY_TMPDIR": RAY_TMP, "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0"}


def environment() -> dict:
    return {**os.environ, "COLUMNS": "250", **RAY_ENV}


def vacap(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*VACAP, *map(str, args)], capture_output=True, text=True, timeout=300, env=environment()
    )


def started(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [*VACAP, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment()
    )


def read_records(path: Path) -> list[dict]:
    """The records in an output file, without a last line that a kill may have cut short."""
    return scan(path.read_bytes())[0]


def comparable(records: list[dict]) -> dict[str, tuple]:
    """path -> what must match a local run, from the last record of each path (a resumed run
    retries error records, so those may repeat); each image captioned ok once."""
    ok = [r["path"] for r in records if r["status"] == "ok"]
    assert len(ok) == len(set(ok)), "an image was captioned twice"
    return {r["path"]: (r["status"], r["caption"], r["error"], r["params"], r["sha256"]) for r in records}


def caption_files(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text("utf-8") for p in folder.iterdir()}


def ray_processes() -> list[int]:
    """Pids of live processes (not zombies) with a file open in RAY_TMP or it on their command
    line: every Ray process of these tests, by the logs and sockets each keeps there (a Ray
    worker renames itself, overwriting its command line and environment)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            names = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
            names.append((entry / "cmdline").read_bytes().decode(errors="replace"))
        except OSError:  # gone meanwhile
            continue
        if any(RAY_TMP in name for name in names):
            found.append(int(entry.name))
    return found


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """IMAGES shapes scenes and one file that is not an image; no Ray process left at the end."""
    folder = tmp_path_factory.mktemp("ray") / "data"
    folder.mkdir()
    for i, scene in enumerate(scenes(IMAGES, seed=5, split="test")):
        scene.image.save(folder / f"scene_{i:02d}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    yield folder
    # A local Ray instance ends with the driver that started it, killed or not: its raylet at
    # once, its workers and agents when they notice (the agents of a killed driver's instance
    # take up to a minute or so, trying to report to the gone cluster first).
    deadline = time.monotonic() + 180
    while (left := ray_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes left running: {left}"
    shutil.rmtree(RAY_TMP, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(dataset):
    """The address of a running Ray cluster for --ray-address: a head node on this machine
    with 2 CPUs, stopped (its processes with it) at the end of the module."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray = Path(sys.executable).parent / "ray"
    command = [ray, "start", "--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard=false", "--block"]
    # Nothing runs on it at the end: stop at once instead of draining the node for 30 s.
    env = {**environment(), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    head = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in head.stdout:
            if "Ray runtime started" in line:
                break
        else:
            pytest.fail(f"ray start --head ended with {head.wait()}")
        threading.Thread(target=head.stdout.read, daemon=True).start()  # keep its pipe flowing
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()
        head.wait(timeout=60)


@pytest.fixture(scope="module")
def local(dataset):
    """The reference: the same folder captioned without Ray (records, and caption files)."""
    output = dataset.parent / "local.jsonl"
    files = dataset.parent / "local_txt"
    out = vacap("caption", dataset, *DEMO, "-o", output, "--sidecar", "txt", "--sidecar-dir", files)
    assert out.returncode == 1, out.stderr  # the broken file's error record
    assert len(caption_files(files)) == IMAGES
    return comparable(read_records(output)), caption_files(files)


@pytest.fixture(scope="module")
def on_cluster(dataset, cluster, tmp_path_factory):
    """A --ray run with two actors on a cluster joined with --ray-address, verbose: (its output,
    the JSONL's records, its caption files)."""
    folder = tmp_path_factory.mktemp("on_cluster")
    output, txt = folder / "ray.jsonl", folder / "txt"
    ray = ["--ray", "--ray-address", cluster, "--workers", "2", "--sidecar", "txt", "--sidecar-dir", txt, "-v"]
    out = vacap("caption", dataset, *DEMO, "-o", output, *ray)
    assert out.returncode == 1, out.stderr
    return out, read_records(output), caption_files(txt)


def test_ray_records_and_caption_files_equal_a_local_runs(on_cluster, dataset, local):
    records, files = local
    out, written, txt = on_cluster
    assert out.stdout == ""
    assert len(written) == len(records) and comparable(written) == records
    assert len(records) == IMAGES + 1 and records[str(dataset / "broken.png")][0] == "error"
    assert txt == files, "the driver wrote the same caption files from the actors' records"
    # both actors loaded the model, and the driver's progress counted every record
    assert len(set(WORKER.findall(out.stderr))) == 2
    assert f"{IMAGES} ok, 1 error, 0 skipped" == summary_counts(out.stderr)


def test_images_are_read_and_prepared_in_ray_tasks_not_in_the_actors(on_cluster):
    """With -v each reading task says which process read and prepared how many images, and each
    actor how many it got and how many of those came prepared: every image, the broken one too,
    was read by processes that are not the actors', and every readable one reached the actors
    as the model's inputs (an actor prepares only what comes unprepared)."""
    out, _, _ = on_cluster
    reads = [tuple(map(int, found)) for found in READER.findall(out.stderr)]
    actors = {int(pid) for pid in WORKER.findall(out.stderr)}
    assert sum(read for _, read, _ in reads) == IMAGES + 1
    assert sum(ready for _, _, ready in reads) == IMAGES, "the broken file cannot be prepared"
    readers = {pid for pid, _, _ in reads}
    assert len(actors) == 2 and readers and not readers & actors, (readers, actors)
    got = [tuple(map(int, found)) for found in GOT.findall(out.stderr)]
    assert {pid for pid, _, _ in got} <= actors
    assert sum(count for _, count, _ in got) == IMAGES + 1
    assert sum(ready for _, _, ready in got) == IMAGES


def test_a_processor_that_cannot_be_loaded_ends_the_run_with_exit_2(dataset, cluster, tmp_path):
    """The reading tasks load the model's processor: where it cannot be loaded the run says
    why, as for a model the actors cannot load, rather than ending in a Ray traceback."""
    broken = tmp_path / "model"
    broken.mkdir()
    shutil.copy(MODEL_DIR / "config.json", broken)  # a checkpoint folder without its processor
    output = tmp_path / "out.jsonl"
    out = vacap("caption", dataset, "--model", broken, "-o", output, "--ray", "--ray-address", cluster)
    said = " ".join(out.stderr.split())
    assert out.returncode == 2, out.stderr
    assert "the Ray reading tasks cannot load the model's processor" in said and "Traceback" not in said
    assert f"cannot load model '{broken}'" in said
    assert not output.exists() or not read_records(output)


def test_a_killed_driver_is_resumed_with_nothing_lost_or_repeated(dataset, local, tmp_path):
    output = tmp_path / "ray.jsonl"
    args = ["caption", dataset, *DEMO, "-o", output, "--ray", "--workers", "1"]
    run = started(*args)
    try:
        wait_until(lambda: output.exists() and len(read_records(output)) >= 2, 240, "the first records")
        os.kill(run.pid, signal.SIGKILL)
    finally:
        run.kill()
        run.communicate()
    before = read_records(output)
    assert len(before) < IMAGES + 1, "the run ended before it was killed"

    out = vacap(*args)
    assert out.returncode == 1, out.stderr
    records = read_records(output)
    assert records[: len(before)] == before, "the second run appended, keeping what was there"
    assert comparable(records) == local[0]
    done_before = sum(r["status"] == "ok" for r in before)
    assert f"{done_before} skipped" in summary_counts(out.stderr)


def test_a_killed_worker_is_replaced_and_its_images_retried(dataset, local, tmp_path):
    output = tmp_path / "ray.jsonl"
    # One worker: the run can only finish if a new actor takes over the killed one's batches.
    run = started("caption", dataset, *DEMO, "-o", output, "--ray", "--workers", "1")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(run.stderr), daemon=True)
    reader.start()
    try:
        wait_until(lambda: output.exists() and len(read_records(output)) >= 1, 240, "the first records")
        victim = int(WORKER.findall("".join(lines))[0])
        os.kill(victim, signal.SIGKILL)
        at_kill = len(read_records(output))
        run.wait(timeout=240)
    finally:
        run.kill()
        run.wait()
        reader.join()
    assert at_kill < IMAGES + 1, "the run ended before a worker was killed"
    assert run.returncode == 1, "".join(lines)
    assert comparable(read_records(output)) == local[0]
    loaded = [int(pid) for pid in WORKER.findall("".join(lines))]
    assert len(set(loaded) - {victim}) == 1, "no actor replaced the killed one"


def process_state(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name: [state, parent pid, ...]."""
    return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    try:
        return process_state(pid)[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_lost_node_is_replaced_and_its_images_retried(dataset, local, tmp_path):
    """A cluster of a head node and two worker nodes of one CPU each, which the two actors fill,
    one on each: removing the node of one mid-run takes its actor, the batches queued to it and
    the blocks in its object store. The run still records every image once, as a local run
    captions it: Ray Data restarts the actor (on the other node once its actor is done), retries
    its batches there and rebuilds the lost blocks from their reading tasks. The driver writes
    the caption files, after their records, so the lost node leaves none half written."""
    from ray.cluster_utils import Cluster

    output, txt = tmp_path / "ray.jsonl", tmp_path / "txt"
    node = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in RAY_ENV.items():  # the node processes take them from this one
            patch.setenv(name, value)
        # The head has no CPU: the driver joins it (Ray prefers the head on a shared host), and
        # the actors can only be on the worker nodes, so removing one cannot end the driver.
        cluster = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": 0, "include_dashboard": False})
        run = None
        try:
            workers = [cluster.add_node(**node) for _ in range(2)]
            cluster.wait_for_nodes()
            raylets = {n.all_processes["raylet"][0].process.pid: n for n in workers}
            args = ["caption", dataset, *DEMO, "-o", output, "--ray", "--ray-address", cluster.address,
                    "--sidecar", "txt", "--sidecar-dir", txt]  # fmt: skip
            run = started(*args, "--workers", "2", "-v")
            lines: list[str] = []
            reader = threading.Thread(target=lambda: lines.extend(run.stderr), daemon=True)
            reader.start()
            wait_until(lambda: output.exists() and len(read_records(output)) >= 1, 240, "the first records")
            wait_until(lambda: WORKER.search("".join(lines)), 60, "an actor's pid")
            victim = int(WORKER.findall("".join(lines))[0])
            host = victim
            while host not in raylets:  # an actor is a child of its node's raylet
                host = int(process_state(host)[1])
            at_removal = len(read_records(output))
            cluster.remove_node(raylets[host])
            run.wait(timeout=300)
        finally:
            if run is not None:
                run.kill()
                run.wait()
            cluster.shutdown()
    reader.join()
    assert at_removal < IMAGES + 1, "the run ended before a node was removed"
    assert not alive(victim), "the actor lived on after its node was removed"
    assert run.returncode == 1, "".join(lines)
    records = read_records(output)
    assert len(records) == IMAGES + 1 and comparable(records) == local[0]
    assert caption_files(txt) == local[1]  # every caption file, and no temporary one left
    assert f"{IMAGES} ok, 1 error, 0 skipped" == summary_counts("".join(lines))


def test_ray_flags_need_ray_and_ray_installed(dataset, tmp_path):
    output = tmp_path / "out.jsonl"
    out = vacap("caption", dataset, *DEMO, "-o", output, "--workers", "2")
    assert out.returncode == 2
    assert "--workers acts only with --ray" in " ".join(out.stderr.split())
    # Without Ray installed (an import of it fails), --ray says how to install it; nothing is written.
    missing = "import sys; sys.modules['ray'] = None; from vacap.cli import app; app()"
    command = [sys.executable, "-c", missing, "caption", str(dataset), *DEMO, "-o", str(output), "--ray"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment())
    assert out.returncode == 2
    assert 'pip install ".[ray]" in vacap\'s checkout, or pip install "ray[data]"' in " ".join(out.stderr.split())
    assert not output.exists()


def test_help_does_not_import_ray():
    code = "import sys; from vacap.cli import app\ntry: app(['caption', '--help'])\nexcept SystemExit: pass\n"
    code += "assert 'ray' not in sys.modules, 'ray imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "resources, options, expected",
    [
        ({"CPU": 2}, {}, (1, 2, 0)),  # one actor with all the CPUs
        ({"CPU": 2}, {"workers": 2}, (2, 1, 0)),
        ({"CPU": 3}, {"workers": 4}, (4, 1, 0)),  # never less than one CPU each
        ({"CPU": 64, "GPU": 8}, {}, (8, 1, 1)),  # one actor per GPU
        ({"CPU": 64, "GPU": 8}, {"gpus_per_worker": 2}, (4, 1, 2)),
        ({"CPU": 64, "GPU": 8}, {"workers": 3}, (3, 1, 1)),
        ({"CPU": 64, "GPU": 8}, {"gpus_per_worker": 0, "workers": 2}, (2, 32, 0)),  # CPU actors on a GPU cluster
    ],
)
def test_the_actor_pool_takes_one_gpu_per_actor_or_shares_the_cpus(resources, options, expected):
    from vacap.ray_run import RayOptions, pool_for

    pool = pool_for(resources, RayOptions(**options))
    assert (pool.workers, pool.cpus, pool.gpus) == expected
