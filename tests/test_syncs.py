"""The decode step waits for the device at most once: its stop check.

On a GPU every op that needs a device value on the host (``.item()``, ``int(t)``, ``bool(t)``,
``.nonzero()``, boolean indexing) stalls the host until the device catches up, so the next
kernels cannot be queued while the current ones run. These tests count such ops as the loop
dispatches them (on the CPU, where they are cheap but dispatched the same way).
"""

from __future__ import annotations

import pytest
import torch
from helpers import IMAGES, PROMPT
from torch.utils._python_dispatch import TorchDispatchMode

from vacap.config import DecodeConfig
from vacap.decode import generate
from vacap.methods import steering_for
from vacap.model import load_model
from vacap.sampling import Sampling

# Ops whose result size or value the host must read from the device before going on.
SYNCING = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_consecutive.default,
}


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING or func.overloadpacket is torch.ops.aten.repeat_interleave and len(args) < 2:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def syncs(model, inputs, settings: dict, max_new: int) -> list[str]:
    config = DecodeConfig(max_new_tokens=max_new, **settings)
    with SyncCounter() as counter:
        generate(model, inputs, steering_for(model, config), max_new, sampling=Sampling.of(config))
    return counter.seen


SAMPLED = dict(temperature=0.8, top_p=0.9, repetition_penalty=1.2, no_repeat_ngram=2)
SETTINGS = {
    "greedy": dict(method="greedy"),
    "vasparse": dict(method="vasparse"),
    "selection": dict(method="vasparse", alpha=0.0, sink_beta=0.0),
    "contrast-layers-2": dict(method="vasparse", contrast_layers=2),
    "kv-budget": dict(method="vasparse", kv_budget=0.5),
    "vcd": dict(method="vcd"),
    "fastv": dict(method="fastv"),
    # Every sampling control at once: the draw, its penalty and its bans read nothing back.
    "greedy-sampled": dict(method="greedy", **SAMPLED),
    "vasparse-sampled": dict(method="vasparse", **SAMPLED),
    "vcd-sampled": dict(method="vcd", **SAMPLED),
}


@pytest.fixture(scope="module")
def model(tiny_model):
    loaded = load_model(str(tiny_model("llava-llama")), dtype="fp32", device="cpu")
    loaded.eos_ids = ()  # every row runs to max_new, so each call makes the same number of steps
    return loaded


@pytest.mark.parametrize("name", SETTINGS)
def test_each_decode_step_syncs_once(model, name):
    inputs = model.prepare(IMAGES[:2], PROMPT)
    short, long = syncs(model, inputs, SETTINGS[name], 2), syncs(model, inputs, SETTINGS[name], 6)
    # The prefill may read sizes once (compaction); every further step adds exactly one read.
    assert len(long) - len(short) == 4, long[len(short) :]
