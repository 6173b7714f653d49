"""`--dtype auto` on CPU: bf16 only where the CPU has native bf16, as the record's params say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CPUINFO = Path("/proc/cpuinfo")
IMAGE = Path(__file__).resolve().parent.parent / "sample_images" / "scene_2.png"
# The settings that imitate a CPU without native bf16 (what CI uses for its second pass).
WITHOUT_BF16 = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx2"}
CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def native_bf16_flags() -> bool:
    """The kernel's own account of the CPU, read apart from torch: AVX512-BF16 or AMX-BF16."""
    for line in CPUINFO.read_text().splitlines():
        if line.startswith("flags"):
            return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    return False  # no x86 flags line (another architecture): vacap keeps fp32 there


def auto_dtype_of_a_cli_run(tmp_path: Path, caps: dict[str, str]) -> str:
    # The machine's own caps are dropped, so each case sees only the ones it names.
    env = {key: value for key, value in os.environ.items() if key not in CAPS}
    output = tmp_path / "captions.jsonl"
    out = subprocess.run(
        [sys.executable, "-m", "vacap.cli", "caption", str(IMAGE), "--model", "demo", "--dtype", "auto",
         "--device", "cpu", "--max-new-tokens", "2", "-o", str(output)],
        capture_output=True, text=True, timeout=300, env={**env, **caps},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (record,) = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert record["status"] == "ok"
    return record["params"]["dtype"]


@pytest.mark.dtype
@pytest.mark.skipif(not CPUINFO.exists(), reason="reads the CPU flags from /proc/cpuinfo (Linux)")
@pytest.mark.parametrize(
    "caps, native",
    [
        ({}, None),
        (WITHOUT_BF16, False),
        ({"DNNL_MAX_CPU_ISA": "avx2"}, False),  # oneDNN's older name, any case
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, None),  # a cap that still allows bf16
    ],
    ids=["this-cpu", "emulated-without-bf16", "dnnl-cap-avx2", "cap-allowing-bf16"],
)
def test_auto_picks_bf16_only_on_native_bf16(tmp_path, caps, native):
    if native is None:
        native = native_bf16_flags()
    assert auto_dtype_of_a_cli_run(tmp_path, caps) == ("bf16" if native else "fp32")
