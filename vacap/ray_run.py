"""Captioning on Ray Data: the same job as a local run, spread over Ray tasks and a pool of actors.

The driver (the `vacap caption --ray` process) lists the images, skips those already done, and
writes every record itself through the same ``RecordWriter`` as a local run. The images still
to do become a Ray dataset of paths, worked on in two stages. Ray tasks read, hash and decode
each batch of images (``read_image``) and prepare them for the model with its processor
(``prepare_read``, with a ``Preparer`` loaded once per task process), as a local run does; an
image that cannot be read or prepared gets the reason its error record gives. A pool of actors,
each holding one ``Captioner`` (the model loaded once per actor), moves the prepared inputs to
its device and dtype and captions them (``Captioner.records_of``), and the records stream back
to the driver as each batch finishes. Records therefore arrive batch by batch in completion
order, not in the input order.

Ray Data's actor pools restart a dead actor and retry the batch it held (their ``max_restarts``
and ``max_task_retries`` default to -1, unlimited), so a worker that dies loses no image.
On a cluster the images must be on storage every node reaches at the same path. Caption files
are written by the driver, each after its record, as in a local run (``vacap.sidecars``).

Ray is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vacap.config import DEFAULT_MODEL, DEFAULT_PROMPT

# vacap is installed from its checkout (it is not on PyPI), so the extra is named from there.
INSTALL = 'pip install ".[ray]" in vacap\'s checkout, or pip install "ray[data]"'
# The paths in one actor task, in --batch-size units: enough that an actor's continuous batching
# has rows to refill from, few enough that records reach the driver (and the output file) often
# and a dead actor's retry redoes little.
BATCHES_PER_TASK = 4
# Reading tasks that may run at once, per actor: a batch read ahead of each actor's current one
# and one more, as the local run's background thread reads ahead of the model.
READERS_PER_WORKER = 2


class RayUnavailable(Exception):
    """Ray cannot be used here: not installed, the cluster cannot be reached, or its workers
    cannot load the model. One line."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray run is."""

    address: str | None = None  # an existing cluster; None starts a local instance
    workers: int | None = None  # actors; None: one per GPU the cluster has (``gpus_per_worker`` each), else 1
    gpus_per_worker: float | None = None  # None: 1 where the cluster has GPUs, else 0

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ValueError(f"--gpus-per-worker must be 0 or more, got {self.gpus_per_worker:g}")


@dataclass(frozen=True)
class Pool:
    """The actor pool a run gets on the connected cluster."""

    workers: int
    cpus: float  # per actor
    gpus: float  # per actor


def require_ray() -> None:
    """Raise ``RayUnavailable`` saying how to install Ray when it is not importable."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RayUnavailable(f"--ray needs Ray Data, an optional extra: {INSTALL} ({exc})") from None



def options_from_flags(ray: bool, address: str | None, workers: int | None, gpus_per_worker: float | None):
    """The ``RayOptions`` of a --ray run, None without --ray. ValueError for a Ray flag given
    without --ray, or --ray where Ray is not installed."""
    given = {"--ray-address": address, "--workers": workers, "--gpus-per-worker": gpus_per_worker}
    if not ray:
        stray = [flag for flag, value in given.items() if value is not None]
        if stray:
            raise ValueError(f"{', '.join(stray)} acts only with --ray")
        return None
    try:
        require_ray()
    except RayUnavailable as exc:
        raise ValueError(str(exc)) from None
    return RayOptions(address=address, workers=workers, gpus_per_worker=gpus_per_worker)


def connect(options: RayOptions) -> Pool:
    """Join the cluster at ``options.address``, or start a local Ray instance (which ends with
    this process), and size the actor pool on it."""
    require_ray()
    import ray
    from ray.data import DataContext

    try:
        # "local" always starts an instance of our own, even where another one runs on this machine.
        ray.init(address=options.address or "local", include_dashboard=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = options.address or "a local instance"
        raise RayUnavailable(f"cannot start or reach Ray at {where}: {exc}") from None
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = DataContext.get_current()
    # vacap's own progress bar reports the run; Ray Data's would draw over it.
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return pool_for(ray.cluster_resources(), options)


def pool_for(resources: dict, options: RayOptions) -> Pool:
    """The actor pool for a cluster's total ``resources`` (Ray's names: "CPU", "GPU").

    GPU actors take ``gpus_per_worker`` GPUs and one CPU each; CPU actors share the CPUs evenly,
    since torch in each sizes its thread pool to the CPUs Ray gives it."""
    gpus_seen = resources.get("GPU", 0)
    gpus = options.gpus_per_worker if options.gpus_per_worker is not None else (1 if gpus_seen else 0)
    if options.workers is not None:
        workers = options.workers
    elif gpus:
        workers = max(1, int(gpus_seen // gpus))
    else:
        workers = 1
    cpus = 1 if gpus else max(1, int(resources.get("CPU", 1) // workers))
    return Pool(workers=workers, cpus=cpus, gpus=gpus)


def worker_params(pool: Pool, config, output, **precision) -> dict:
    """The records' params as an actor of ``pool`` will make them: worked out in a Ray task
    with an actor's resources, since the dtype ``auto`` resolves to depends on the device and
    CPU that run the model, which the driver may not have (a CPU head node of a GPU cluster).
    ``precision``: ``record_params``'s dtype, device, quant and pixel limits."""
    import ray
    import ray.exceptions

    from vacap.captioner import record_params

    task = ray.remote(num_cpus=pool.cpus, num_gpus=pool.gpus)(record_params)
    try:
        return ray.get(task.remote(config, output=output, **precision))
    except ray.exceptions.RayTaskError as exc:  # --device cuda where the workers have none, say
        raise RayUnavailable(f"the Ray workers cannot run these settings: {_last_line(exc)}") from None


@functools.cache
def _preparer(model: str, pixels: tuple[int | None, int | None]):
    """The model's ``Preparer`` with the pixel limits (max, min), loaded once per process: Ray
    runs many tasks in one worker."""
    from vacap.model import Preparer

    return Preparer.load(model, *pixels)


def _load_preparer(model: str, pixels: tuple[int | None, int | None]) -> None:
    """A Ray task: load the model's ``Preparer`` in this worker, where the reading tasks after it
    find it, or raise the ``ModelLoadError`` saying why it cannot be loaded."""
    _preparer(model, pixels)


def _read(batch: dict, model: str, pixels: tuple[int | None, int | None], prompt: str, verbose: bool) -> dict:
    """A Ray task: {"path": file system bytes # (N,)} -> the same plus {"read": pickled
    ``prepare_read`` result # (N,)}, each image read, hashed, decoded and prepared for ``model``
    with the prompt template ``prompt`` (or why it cannot be)."""
    import numpy

    from vacap.captioner import PreparedImage, prepare_read
    from vacap.images import read_image

    preparer = _preparer(model, pixels)
    paths = [os.fsdecode(bytes(p)) for p in batch["path"]]
    prepared = [prepare_read(preparer, path, read_image(path), prompt) for path in paths]
    # Pickled by hand: a column of bytes is plain Arrow, where tensors and error texts side by
    # side would need Ray Data's fallback for arbitrary Python objects. An object array, since
    # numpy would pad every item of a bytes array to the longest.
    read = numpy.empty(len(paths), dtype=object)
    read[:] = [pickle.dumps(item) for item in prepared]
    batch["read"] = read
    if verbose:
        ready = sum(isinstance(item, PreparedImage) and item.error is None for item in prepared)
        print(f"vacap: reader pid {os.getpid()} read {len(paths)} images, prepared {ready}", file=sys.stderr)
    return batch


class _Worker:
    """One actor: a Captioner loaded once, captioning the batches of prepared images it is given."""

    def __init__(self, captioner: dict, verbose: bool) -> None:
        from vacap.captioner import Captioner

        # Ray forwards an actor's stdout to the driver's stdout, which may be carrying the
        # records (-o -): anything a library prints goes to stderr instead.
        sys.stdout = sys.stderr
        self.captioner = Captioner(**captioner)
        self.verbose = verbose
        device = self.captioner.model.device
        # On stderr, which Ray forwards to the driver: which process holds which model where.
        print(f"vacap: worker pid {os.getpid()} loaded {self.captioner.model_name} on {device}", file=sys.stderr)

    def __call__(self, batch: dict) -> dict:
        """``_read``'s output # (N,) -> {"record": JSON text # (M,)}, one record per image
        (M = N), in the order they finished."""
        from vacap.captioner import PreparedImage

        paths = [os.fsdecode(bytes(p)) for p in batch["path"]]
        reads = [pickle.loads(bytes(r)) for r in batch["read"]]
        if self.verbose:
            ready = sum(isinstance(read, PreparedImage) and read.inputs is not None for read in reads)
            print(f"vacap: worker pid {os.getpid()} got {len(reads)} images, {ready} prepared", file=sys.stderr)
        # Caption files are the driver's to write, each after its record (vacap.sidecars).
        records = self.captioner.records_of(zip(paths, reads))
        return {"record": [json.dumps(record, ensure_ascii=False) for record in records]}


def caption(
    pool: Pool,
    images: Sequence[Path],
    captioner: dict,
    verbose: bool = False,
) -> Iterator[dict]:
    """A record per image of ``images``, as the actors finish them. ``captioner``: the keyword
    arguments of each actor's ``Captioner``; ``verbose``: each reading task says on stderr which
    process read and prepared how many images, and each actor how many it got and how many of
    those came prepared."""
    if not images:
        return
    import ray.data
    import ray.exceptions

    model = captioner.get("model", DEFAULT_MODEL)
    pixels = (captioner.get("max_pixels"), captioner.get("min_pixels"))
    try:
        # Once before the dataset starts: a reading task that failed to load it would end the
        # run with Ray Data's traceback, not the loading error.
        ray.get(ray.remote(num_cpus=0)(_load_preparer).remote(model, pixels))
    except ray.exceptions.RayTaskError as exc:
        raise RayUnavailable(f"the Ray reading tasks cannot load the model's processor: {_last_line(exc)}") from None
    rows = [{"path": os.fsencode(image)} for image in images]
    size = BATCHES_PER_TASK * captioner.get("batch_size", 1)
    # A block per batch: each is one reading task and then one actor task, so batches spread
    # over the actors, their records come back as each finishes, and a retry redoes one batch.
    blocks = -(-len(rows) // size)
    dataset = (
        ray.data.from_items(rows, override_num_blocks=blocks)
        .map_batches(
            _read,
            batch_size=size,
            batch_format="numpy",
            fn_kwargs={
                "model": model,
                "pixels": pixels,
                "prompt": captioner.get("prompt", DEFAULT_PROMPT),
                "verbose": verbose,
            },
            # No CPU of their own: the actors may hold every CPU (a CPU cluster), and a task
            # that asked for one would never start. Ray Data would also fuse tasks that ask
            # for what the actors ask for into the actor stage: the actors would read again.
            num_cpus=0,
            compute=ray.data.TaskPoolStrategy(size=READERS_PER_WORKER * pool.workers),
            # Retried without limit, wherever there is room: a reading task on a lost node runs
            # again elsewhere, and so does one whose output blocks were lost with a node's
            # object store before an actor took them.
            max_retries=-1,
        )
        .map_batches(
            _Worker,
            batch_size=size,
            batch_format="numpy",
            # A dead actor (its process killed, or its node lost) is started again, on another
            # node once there is room, and the batches it held are retried on it: the run loses
            # no image. Ray Data's defaults in the Ray we test; set here because "every image
            # recorded once" rests on them.
            max_restarts=-1,
            max_task_retries=-1,
            compute=ray.data.ActorPoolStrategy(size=pool.workers),
            num_cpus=pool.cpus,
            num_gpus=pool.gpus,
            fn_constructor_kwargs={"captioner": captioner, "verbose": verbose},
        )
    )
    try:
        for row in dataset.iter_rows():
            yield json.loads(row["record"])
    except ray.exceptions.RayActorError as exc:
        if not exc.actor_init_failed:
            raise
        # Ray Data gives up after actors failed to start several times; the error raised in the
        # last one's __init__ ends the message.
        raise RayUnavailable(f"the Ray workers cannot start: {_last_line(exc)}") from None


def _last_line(exc: Exception) -> str:
    """The last line of a Ray error: the error the remote code raised, as "module.Type: message"."""
    return str(exc).strip().splitlines()[-1]
