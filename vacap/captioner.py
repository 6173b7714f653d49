"""The library entry point: load a model once, caption images into records.

    from vacap import Captioner
    captioner = Captioner("llava-hf/llava-1.5-7b-hf", sparsity=0.5)
    for record in captioner.caption(["a.jpg", "b.png"]):
        print(record["caption"])
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from PIL import Image

from vacap.config import DEFAULT_MODEL, DecodeConfig, OutputConfig
from vacap.images import LoadedImage, discover, load_image, read_image
from vacap.model import DTYPE_NAMES, Preparer, load_model, resolve_device, resolve_dtype
from vacap.records import make_record, settings_key
from vacap.text import bare_prompt, fill_prompt, finish_caption


def record_params(
    config: DecodeConfig,
    *,
    dtype: str,
    device: str,
    quant: str,
    output: OutputConfig | None = None,
    max_pixels: int | None = None,
    min_pixels: int | None = None,
) -> dict:
    """The ``params`` of every record, and with the model name the resume key: the decode
    settings, the caption shaping in use (``output``), plus the dtype ``load_model`` resolves
    ``dtype`` to on ``device`` and the quantization (both change the tokens), and the pixel
    limits where given (they change a Qwen2-VL image's tokens). Needs no loaded model, so a
    resume can tell what is done before loading one; the Captioner uses it too, so the two
    cannot disagree."""
    resolved = resolve_dtype(dtype, resolve_device(device))
    shaping = output.as_params() if output is not None else {}
    pixels = {name: value for name, value in (("max_pixels", max_pixels), ("min_pixels", min_pixels)) if value}
    return {**config.as_params(), **shaping, "dtype": DTYPE_NAMES[resolved], "quant": quant, **pixels}


@dataclass(frozen=True)
class PreparedImage:
    """An image read and made ready for the model, perhaps in another process (a Ray task):
    the file as read, without its pixels (``image.image`` is None: the inputs hold what the
    model sees), and the model's inputs for it alone (``Preparer.prepare``'s, on the CPU, floats
    in fp32), or ``error``, the reason its record gives when it could not be prepared."""

    image: LoadedImage
    inputs: dict | None = None
    error: str | None = None


def prepare_read(preparer: Preparer, path: str, read: LoadedImage | str, prompt: str) -> PreparedImage | str:
    """What ``read_image(path)`` gave, prepared with the prompt template ``prompt`` (its
    placeholders filled from ``path``, as plain text) as a local run prepares it; a read error
    stays as it is."""
    if isinstance(read, str):
        return read
    bare = dataclasses.replace(read, image=None)
    try:
        return PreparedImage(bare, preparer.prepare([read.image], fill_prompt(prompt, path, preparer.reserved)))
    except (RuntimeError, ValueError) as exc:
        return PreparedImage(bare, error=_failure(exc))


def _risk_fields(out) -> dict:
    """A record's ``_signals`` (see ``Captioner``) from a ``Generated`` with signals; {} without."""
    if out.signals is None:
        return {}
    return {"_signals": {"token_ids": list(out.tokens), **out.signals}}


def _failure(exc: Exception) -> str:
    """An error record's reason for an image the model could not take."""
    return f"captioning failed: {exc}"


@dataclass
class _Job:
    index: int  # place in the input order
    path: str
    image: LoadedImage | None = None
    inputs: dict | None = None  # the model's inputs for this image alone: prepared, then placed
    error: str | None = None

    @classmethod
    def read(cls, index: int, path: str, read: LoadedImage | PreparedImage | str) -> _Job:
        """The job of an image ``read_image`` gave, of one ``prepare_read`` gave, or of an error."""
        if isinstance(read, str):
            return cls(index, path, error=read)
        if isinstance(read, PreparedImage):
            return cls(index, path, read.image, read.inputs, read.error)
        return cls(index, path, read)


class _Prefetch:
    """Runs an iterator on a background thread, at most ``ahead`` items in front of its reader.

    ``waited`` adds up the seconds the reader spent waiting for an item. An exception in the
    thread reaches the reader at the point where it happened, with ``failed`` set.
    """

    def __init__(self, source: Iterator, ahead: int) -> None:
        self.waited = 0.0
        self.failed = False
        self._queue: queue.Queue = queue.Queue(ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True, name="vacap-images")
        self._thread.start()

    def _run(self, source: Iterator) -> None:
        try:
            for item in source:
                if not self._put((True, item)):
                    return
        except BaseException as exc:  # handed to the reader, who raises it
            self._put((False, exc))
            return
        self._put((False, None))

    def _put(self, item) -> bool:
        # A bounded put that gives up once the reader has gone (close), so the thread ends.
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self) -> Iterator:
        while True:
            started = time.perf_counter()
            ok, item = self._queue.get()
            self.waited += time.perf_counter() - started
            if ok:
                yield item
            elif item is None:
                return
            else:
                self.failed = True
                raise item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Captioner:
    """A loaded model plus frozen decode settings (any ``DecodeConfig`` field as a keyword) and
    how captions are shaped (``output``: prefix, suffix, clean-up; none by default).

    With ``risk=True`` every ``ok`` record also holds ``risk``: each object word of its caption
    with its hallucination risk score (``vacap.risk.caption_risk``, docs/risk.md), found with
    ``risk_vocab`` (a vocabulary file) or the model's own vocabulary (``vocabulary_for``).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        dtype: str = "auto",
        device: str = "auto",
        quant: str = "none",
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        batch_size: int = 1,
        output: OutputConfig | None = None,
        risk_vocab: str | Path | None = None,
        **settings,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.config = DecodeConfig(**settings)
        self.risk_vocab = risk_vocab
        if risk_vocab is not None and not self.config.risk:
            raise ValueError("risk_vocab names the objects risk scores are given to: it needs risk=True")
        self.output = output or OutputConfig()
        self.batch_size = batch_size
        self._precision = dict(dtype=dtype, device=device, quant=quant, max_pixels=max_pixels, min_pixels=min_pixels)
        self.model = load_model(model, **self._precision)
        self.model_name = model
        # (seconds the decoding waited for images, wall seconds) of the last run of records()
        self.image_wait = (0.0, 0.0)
        self._settle()

    def _settle(self) -> None:
        self.config.check_layers(len(self.model.layers))
        self.params = record_params(self.config, output=self.output, **self._precision)
        self.settings = settings_key(self.model_name, self.params)
        # A template too long for the model fails every image: refused before any runs, with the
        # prompt measured as the shortest it can be (empty placeholders, a small square image).
        small = Image.new("RGB", (64, 64), "white")
        too_long = self._too_long(self.model.preparer.prepare([small], bare_prompt(self.config.prompt)), "at least ")
        if too_long:
            raise ValueError(f"{too_long}; shorten the prompt or lower --max-new-tokens")

    def _too_long(self, inputs: dict, least: str = "") -> str | None:
        """Why a prompt prepared for one image does not fit the model's context with
        ``max_new_tokens`` after it, or None when it fits."""
        context = self.model.context_length
        ids = inputs["input_ids"][0]
        total = len(ids) + self.config.max_new_tokens
        if context is None or total <= context:
            return None
        image = int((ids == self.model.image_token_id).sum())
        return (
            f"prompt too long for the model: {least}{len(ids) - image} prompt tokens + {image} image tokens + "
            f"{self.config.max_new_tokens} new tokens (--max-new-tokens) = {total}, more than the model's "
            f"context of {context} tokens"
        )

    def with_settings(self, **changes) -> Captioner:
        """The same loaded model under other decode settings (no reload)."""
        other = copy.copy(self)
        other.config = dataclasses.replace(self.config, **changes)
        other._settle()
        return other

    def caption(self, images: Iterable[str | Path]) -> list[dict]:
        """Caption image files; one record per image, in input order, errors included."""
        done = sorted(self._records((str(p) for p in images), None, True), key=lambda pair: pair[0])
        return [record for _, record in done]

    def records(
        self,
        paths: Iterable[str | Path],
        *,
        skip: Callable[[str, str, str], bool] | None = None,
        recursive: bool = True,
        folders: bool = True,
    ) -> Iterator[dict]:
        """Yield a record per image as soon as its caption is done, so in completion order.

        A folder stands for the images in it, found as ``vacap caption`` finds them (a folder
        that cannot be searched yields an ``error`` record); with ``folders`` False every path
        is one image, as in a list already found, and a folder among them (a file replaced by
        one since) yields an ``error`` record. ``skip(path, sha256, settings)``
        returning True drops an image (resume); it yields nothing for it, and is called from the
        background thread that reads the images. Unreadable images yield an ``error`` record
        without stopping the run.

        With ``batch_size`` > 1 a row that finishes takes the next image (continuous batching),
        so a short caption may overtake a long one started before it. With diagnostics or
        ``compile``, batches are static (each batch's records together, in input order).
        """
        for _, record in self._records(paths, skip, recursive, folders):
            yield record

    def records_of(self, images: Iterable[tuple[str, LoadedImage | PreparedImage | str]]) -> Iterator[dict]:
        """Like ``records``, for images read elsewhere: ``(path, read_image(path))`` pairs, an
        image or the reason it could not be read (which becomes its ``error`` record), or pairs
        of images also prepared elsewhere (``prepare_read``, with this captioner's prompt), as a
        Ray actor gets them. Only what is left (preparing, placing, decoding) happens here."""
        jobs = (_Job.read(index, path, read) for index, (path, read) in enumerate(images))
        for _, record in self._decoded(jobs):
            yield record

    def _records(self, paths, skip, recursive, folders=True) -> Iterator[tuple[int, dict]]:
        """(place in the input order, record), in completion order."""
        return self._decoded(self._read(paths, skip, recursive, folders))

    def _decoded(self, jobs: Iterator[_Job]) -> Iterator[tuple[int, dict]]:
        """``jobs`` (read, maybe prepared) -> (place in the input order, record), in completion
        order. The jobs are read, prepared and placed on a background thread, ahead of the model."""
        prefetch = _Prefetch(self._prepare(jobs), ahead=2 * self.batch_size + 1)
        started = time.perf_counter()
        try:
            # Diagnostics keeps per-row lists by batch row and step, and the compiled step runs in
            # generate(): both decode static batches.
            if self.config.diagnostics != "none" or self.config.compile:
                yield from self._static(prefetch)
            else:
                yield from self._continuous(prefetch)
        finally:
            prefetch.close()
            self.image_wait = (prefetch.waited, time.perf_counter() - started)

    def _read(self, paths, skip, recursive, folders) -> Iterator[_Job]:
        """Every image read, hashed and decoded (or its error), in order; folders expanded
        when ``folders``."""
        index = itertools.count()
        for given in paths:
            files: Iterable = [given]
            if folders and os.path.isdir(given):
                listing = discover([given], recursive=recursive)
                for folder, reason in listing.problems:
                    yield _Job(next(index), str(folder), error=reason)
                files = listing.files
            for path in map(str, files):
                job = _Job.read(next(index), path, read_image(path))
                if job.image is not None and skip is not None and skip(path, job.image.sha256, self.settings):
                    continue
                yield job

    def _prepare(self, jobs: Iterable[_Job]) -> Iterator[_Job]:
        """Each read image prepared for the model unless that was done elsewhere, and placed on
        its device (its ``inputs``), or given the error why not."""
        for job in jobs:
            if job.error is None and job.inputs is None:
                prepared = prepare_read(self.model.preparer, job.path, job.image, self.config.prompt)
                job = _Job.read(job.index, job.path, prepared)
            if job.error is None:
                job.error = self._too_long(job.inputs)
            if job.error is None:
                try:
                    job.inputs = self.model.place(job.inputs)
                except (RuntimeError, ValueError) as exc:
                    job.error = _failure(exc)
            yield job

    def _failed(self, job: _Job, error: str) -> tuple[int, dict]:
        return job.index, self._record(job.path, "error", error=error, image=job.image)

    def _continuous(self, prefetch: _Prefetch) -> Iterator[tuple[int, dict]]:
        from vacap.decode import generate_stream
        from vacap.methods import steering_for
        from vacap.risk_signals import RiskSettings
        from vacap.sampling import Sampling

        c = self.config
        eos = set(self.model.eos_ids)
        errors: list[_Job] = []
        while True:
            in_flight: dict[int, _Job] = {}

            def images():
                for job in prefetch:
                    if job.error is not None:
                        errors.append(job)
                        continue
                    in_flight[job.index] = job
                    yield job.index, job.inputs

            stream = generate_stream(
                self.model, images(), lambda: steering_for(self.model, c), self.batch_size, c.max_new_tokens,
                Sampling.of(c), identity=lambda index: in_flight[index].image.sha256, risk=RiskSettings.of(c),
            )  # fmt: skip
            try:
                for index, out in stream:
                    yield from (self._failed(job, job.error) for job in errors)
                    errors.clear()
                    job = in_flight.pop(index)
                    tokens = [t for t in out.tokens if t not in eos]
                    caption = self._finish(self.model.decode(tokens), out.stopped_by)
                    yield job.index, self._record(
                        job.path, "ok", image=job.image, caption=caption, tokens=len(tokens), seconds=out.seconds,
                        stop=out.stopped_by, image_tokens=self._image_tokens(job.inputs), **_risk_fields(out),
                    )  # fmt: skip
                break
            except (RuntimeError, ValueError) as exc:
                if prefetch.failed:
                    raise
                # The rows decoding together share the failure; the run goes on with the rest.
                yield from (self._failed(job, _failure(exc)) for job in in_flight.values())
        yield from (self._failed(job, job.error) for job in errors)

    def _static(self, prefetch: _Prefetch) -> Iterator[tuple[int, dict]]:
        """Batches that end together (diagnostics, compiled steps)."""
        batch: list[_Job] = []
        for job in prefetch:
            if job.error is not None:
                yield self._failed(job, job.error)
                continue
            batch.append(job)
            if len(batch) == self.batch_size:
                yield from self._caption_batch(batch)
                batch = []
        if batch:
            yield from self._caption_batch(batch)

    def error_record(self, path: str, reason: str) -> dict:
        """The record of an image that could not be captioned, under these settings."""
        return self._record(path, "error", error=reason)

    def answer(self, image: str | Path, questions: Sequence[str]) -> list[str]:
        """Answers to several questions about one image, decoded with the captioner's settings.

        Raises ``ImageError`` for an unreadable image.
        """
        loaded = load_image(Path(image))
        answers: list[str] = []
        for start in range(0, len(questions), self.batch_size):
            chunk = list(questions[start : start + self.batch_size])
            inputs = self.model.prepare([loaded.image] * len(chunk), chunk)
            answers += [text for text, *_ in self._generate(inputs, [loaded.sha256] * len(chunk))]
        return answers

    def _generate(self, inputs: dict, identities: Sequence[str]) -> list[tuple[str, int, str, dict]]:
        """A prepared batch -> (text, token count, what stopped it, diagnostics fields) per
        image, stop tokens left out. ``identities``: each row's image sha256, which keys its
        sampling draws."""
        from vacap.decode import generate
        from vacap.diagnostics import Diagnostics
        from vacap.methods import steering_for
        from vacap.risk_signals import RiskSettings
        from vacap.sampling import Sampling

        c = self.config
        steering = steering_for(self.model, c)
        if c.diagnostics != "none":
            steering = Diagnostics(steering, self.model, c.start_layer)
        steps = "compiled" if c.compile else "dynamic"
        outputs = generate(
            self.model, inputs, steering, c.max_new_tokens, steps=steps, sampling=Sampling.of(c),
            identities=identities, risk=RiskSettings.of(c),
        )  # fmt: skip
        eos = set(self.model.eos_ids)
        results = []
        for b, out in enumerate(outputs):
            tokens = [t for t in out.tokens if t not in eos]
            extra = steering.row(b, tokens, c.diagnostics) if c.diagnostics != "none" else {}
            extra.update(_risk_fields(out))
            results.append((self.model.decode(tokens), len(tokens), out.stopped_by, extra))
        return results

    def _caption_batch(self, batch: Sequence[_Job]) -> Iterator[tuple[int, dict]]:
        start = time.perf_counter()
        try:
            inputs = self.model.preparer.collate([job.inputs for job in batch])
            texts = self._generate(inputs, [job.image.sha256 for job in batch])
        except (RuntimeError, ValueError) as exc:
            yield from (self._failed(job, _failure(exc)) for job in batch)
            return
        seconds = (time.perf_counter() - start) / len(batch)
        for job, (caption, tokens, stop, extra) in zip(batch, texts):
            yield job.index, self._record(
                job.path, "ok", image=job.image, caption=self._finish(caption, stop), tokens=tokens,
                seconds=round(seconds, 4), stop=stop, image_tokens=self._image_tokens(job.inputs), **extra,
            )  # fmt: skip

    def _image_tokens(self, inputs: dict) -> int:
        """How many tokens of the prompt the image became: a fixed count for LLaVA-1.5, one that
        follows the image's size for anyres and Qwen2-VL's dynamic resolution (``--max-pixels``)."""
        return int((inputs["input_ids"] == self.model.image_token_id).sum())

    def _finish(self, caption: str, stopped_by: str) -> str:
        o = self.output
        return finish_caption(
            caption, stopped_by=stopped_by, prefix=o.prefix, suffix=o.suffix, clean=o.clean, trim=o.trim_incomplete
        )

    @functools.cached_property
    def _vocabulary(self):
        from vacap.risk import vocabulary_for

        return vocabulary_for(self.model_name, self.risk_vocab)

    def _risk(self, caption: str, signals: dict) -> dict:
        """The record's ``risk`` object from the decode loop's per-token signals (``_risk_fields``)."""
        from vacap.risk import caption_risk

        token_ids = signals.pop("token_ids")
        o = self.output
        return caption_risk(
            caption, token_ids, signals, self.model.tokenizer, self._vocabulary, prefix=o.prefix, suffix=o.suffix
        )

    def _record(self, path: str, status: str, *, image: LoadedImage | None = None, **fields) -> dict:
        if image is not None:
            fields.update(width=image.width, height=image.height, sha256=image.sha256)
        if "_signals" in fields:
            fields["risk"] = self._risk(fields["caption"], fields.pop("_signals"))
        return make_record(
            path=path,
            status=status,
            model=self.model_name,
            method=self.config.method,
            params=self.params,
            **fields,
        )
