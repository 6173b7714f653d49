"""The library entry point: load a model once, caption images into records.

    from vacap import Captioner
    captioner = Captioner("llava-hf/llava-1.5-7b-hf", sparsity=0.5)
    for record in captioner.caption(["a.jpg", "b.png"]):
        print(record["caption"])
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from vacap.config import DEFAULT_MODEL, DecodeConfig
from vacap.images import ImageError, LoadedImage, discover, load_image
from vacap.model import DTYPE_NAMES, load_model, resolve_device, resolve_dtype
from vacap.records import make_record, settings_key


def record_params(config: DecodeConfig, *, dtype: str, device: str, quant: str) -> dict:
    """The ``params`` of every record, and with the model name the resume key: the decode
    settings, plus the dtype ``load_model`` resolves ``dtype`` to on ``device`` and the
    quantization (both change the tokens). Needs no loaded model, so a resume can tell what
    is done before loading one; the Captioner uses it too, so the two cannot disagree."""
    resolved = resolve_dtype(dtype, resolve_device(device))
    return {**config.as_params(), "dtype": DTYPE_NAMES[resolved], "quant": quant}


@dataclass
class _Job:
    path: str
    image: LoadedImage


class Captioner:
    """A loaded model plus frozen decode settings (any ``DecodeConfig`` field as a keyword)."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        dtype: str = "auto",
        device: str = "auto",
        quant: str = "none",
        batch_size: int = 1,
        **settings,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.config = DecodeConfig(**settings)
        self.batch_size = batch_size
        self.model = load_model(model, dtype=dtype, device=device, quant=quant)
        self.model_name = model
        self._precision = dict(dtype=dtype, device=device, quant=quant)
        self._settle()

    def _settle(self) -> None:
        self.config.check_layers(len(self.model.layers))
        self.params = record_params(self.config, **self._precision)
        self.settings = settings_key(self.model_name, self.params)

    def with_settings(self, **changes) -> Captioner:
        """The same loaded model under other decode settings (no reload)."""
        other = copy.copy(self)
        other.config = dataclasses.replace(self.config, **changes)
        other._settle()
        return other

    def caption(self, images: Iterable[str | Path]) -> list[dict]:
        """Caption image files; one record per image, in order, errors included."""
        return list(self.records(str(p) for p in images))

    def records(
        self,
        paths: Iterable[str | Path],
        *,
        skip: Callable[[str, str, str], bool] | None = None,
        recursive: bool = True,
    ) -> Iterator[dict]:
        """Yield a record per image as soon as its batch is done.

        A folder stands for the images in it, found as ``vacap caption`` finds them (a folder
        that cannot be searched yields an ``error`` record). ``skip(path, sha256, settings)``
        returning True drops an image (resume); it yields nothing for it. Unreadable images yield
        an ``error`` record without stopping the run.
        """
        batch: list[_Job] = []
        for given in paths:
            files: Iterable = [given]
            if os.path.isdir(given):
                listing = discover([given], recursive=recursive)
                yield from (self.error_record(str(folder), reason) for folder, reason in listing.problems)
                files = listing.files
            for path in map(str, files):
                try:
                    loaded = load_image(Path(path))
                except ImageError as exc:
                    yield self.error_record(path, str(exc))
                    continue
                if skip is not None and skip(path, loaded.sha256, self.settings):
                    continue
                batch.append(_Job(path, loaded))
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
        loaded = load_image(Path(image)).image
        answers: list[str] = []
        for start in range(0, len(questions), self.batch_size):
            chunk = list(questions[start : start + self.batch_size])
            answers += [text for text, _, _ in self._generate([loaded] * len(chunk), chunk)]
        return answers

    def _generate(self, images: Sequence, prompts: str | Sequence[str]) -> list[tuple[str, int, dict]]:
        """-> (text, token count, diagnostics fields) per image, stop tokens left out."""
        from vacap.decode import generate
        from vacap.diagnostics import Diagnostics
        from vacap.methods import steering_for

        c = self.config
        steering = steering_for(self.model, c)
        if c.diagnostics != "none":
            steering = Diagnostics(steering, self.model, c.start_layer)
        steps = "compiled" if c.compile else "dynamic"
        outputs = generate(self.model, self.model.prepare(images, prompts), steering, c.max_new_tokens, steps=steps)
        eos = set(self.model.eos_ids)
        results = []
        for b, out in enumerate(outputs):
            tokens = [t for t in out.tokens if t not in eos]
            extra = steering.row(b, tokens, c.diagnostics) if c.diagnostics != "none" else {}
            results.append((self.model.decode(tokens), len(tokens), extra))
        return results

    def _caption_batch(self, batch: Sequence[_Job]) -> Iterator[dict]:
        start = time.perf_counter()
        try:
            texts = self._generate([job.image.image for job in batch], self.config.prompt)
        except (RuntimeError, ValueError) as exc:
            for job in batch:
                yield self._record(job.path, "error", error=f"captioning failed: {exc}", image=job.image)
            return
        seconds = (time.perf_counter() - start) / len(batch)
        for job, (caption, tokens, extra) in zip(batch, texts):
            yield self._record(
                job.path, "ok", image=job.image, caption=caption, tokens=tokens, seconds=round(seconds, 4), **extra
            )

    def _record(self, path: str, status: str, *, image: LoadedImage | None = None, **fields) -> dict:
        if image is not None:
            fields.update(width=image.width, height=image.height, sha256=image.sha256)
        return make_record(
            path=path,
            status=status,
            model=self.model_name,
            method=self.config.method,
            params=self.params,
            **fields,
        )
