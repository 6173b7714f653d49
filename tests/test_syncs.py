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
from vacap.decode import generate, generate_stream
from vacap.methods import steering_for
from vacap.model import load_model
from vacap.risk_signals import RiskSettings
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
        generate(
            model, inputs, steering_for(model, config), max_new, sampling=Sampling.of(config),
            risk=RiskSettings.of(config),
        )  # fmt: skip
    return counter.seen


def stream_syncs(model, images, settings: dict, max_new: int) -> list[str]:
    config = DecodeConfig(max_new_tokens=max_new, **settings)
    prepared = ((i, model.prepare([image], PROMPT)) for i, image in enumerate(images))
    with SyncCounter() as counter:
        for _ in generate_stream(
            model, prepared, lambda: steering_for(model, config), 2, max_new, Sampling.of(config),
            risk=RiskSettings.of(config),
        ):  # fmt: skip
            pass
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
# Risk signals: recorded on the device every step, read back once when the captions end. Both
# kinds of branch: run at the end (most settings) and shared with VASparse's (contrast_layers 4).
SETTINGS.update({f"{name}-risk": dict(settings, risk=True) for name, settings in list(SETTINGS.items())})
SETTINGS["vasparse-contrast-layers-4-risk"] = dict(method="vasparse", contrast_layers=4, risk=True)


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


@pytest.mark.parametrize("name", ["greedy", "contrast-layers-2", "kv-budget", "vcd", "fastv", "vasparse-sampled"])
def test_risk_signals_add_no_sync_per_step(model, name):
    """The same syncs per step with and without risk; what risk adds (drawing each row's hidden
    image slots in the prefill, where VASparse's own branch does not) does not grow with steps."""
    inputs = model.prepare(IMAGES[:2], PROMPT)
    risky = dict(SETTINGS[name], risk=True)
    plain = [syncs(model, inputs, SETTINGS[name], n) for n in (2, 6)]
    risk = [syncs(model, inputs, risky, n) for n in (2, 6)]
    assert len(risk[1]) - len(risk[0]) == len(plain[1]) - len(plain[0]) == 4
    assert len(risk[0]) - len(plain[0]) == len(risk[1]) - len(plain[1]) <= 2  # one per row at most
    # Continuous batching likewise (two images on two rows, so both end at the last step).
    plain = [stream_syncs(model, IMAGES[:2], SETTINGS[name], n) for n in (2, 6)]
    risk = [stream_syncs(model, IMAGES[:2], risky, n) for n in (2, 6)]
    assert len(risk[1]) - len(risk[0]) == len(plain[1]) - len(plain[0])
    assert len(risk[0]) - len(plain[0]) == len(risk[1]) - len(plain[1]) <= 2
