"""vacap's own small, really trained LLaVA model and the synthetic world it was trained on.

No real LLaVA checkpoint can be downloaded everywhere vacap runs, so vacap ships one of its own:

* :mod:`vacap.demo.shapes` draws seeded synthetic scenes (1-4 coloured shapes on a plain,
  gradient or lightly noisy background) with their ground-truth object lists and reference
  captions. Its ``train`` split has strong co-occurrence and colour priors (a star nearly always
  comes with a circle, hearts are nearly always red, ...); its ``test`` split has none, so a
  captioner that leans on the priors names objects that are not there: a hallucination
  benchmark with known ground truth (see :mod:`vacap.evaluate.shapes`).
* :mod:`vacap.demo.train` trains a real ``LlavaForConditionalGeneration`` (small CLIP vision
  tower, small Llama text model, word-level tokenizer) from scratch on CPU on the ``train``
  split, and saves it with its processor.
* ``vacap/demo/model/`` holds the trained checkpoint (``MODEL_DIR``), loadable with
  :func:`vacap.model.load_model` like any downloaded LLaVA checkpoint; ``TRAINING.md`` there
  says how it was made and how well it does.
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
# `--model demo-priors`: trained on the priors world (vacap.demo.priors).
PRIORS_MODEL_DIR = Path(__file__).resolve().parent / "model-priors"

__all__ = ["MODEL_DIR", "PRIORS_MODEL_DIR"]
