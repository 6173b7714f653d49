"""Shared fixtures: tiny offline checkpoints, built once per test session."""

import os

# Set before anything imports huggingface_hub or transformers (they read these at import time):
# a test that would reach a model hub fails at once instead of hanging on the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# The test models are tiny: one thread does their small ops at once, where two threads wait on
# each other at every op, which costs more than the op (30x per decode step on a 2-core machine
# shared with another job). Subprocesses inherit it; a value already set is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: ``tiny_model(arch, **kwargs)`` returns the folder of a built tiny checkpoint.

    ``kwargs`` go to :func:`vacap.tiny_models.build_tiny_model`; each distinct ``(arch, kwargs)``
    is built once per session and shared, so tests must not write into the folder.
    """
    built: dict[tuple, Path] = {}

    def build(arch: str, **kwargs) -> Path:
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in built:
            # Imported here, not at the top, so that tests needing no model never import torch.
            from vacap.tiny_models import build_tiny_model

            built[key] = build_tiny_model(arch, tmp_path_factory.mktemp(arch), **kwargs)
        return built[key]

    return build
