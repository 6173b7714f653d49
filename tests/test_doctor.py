"""`vacap doctor` on this machine, in real subprocesses, checked against what Python and vacap's
own decision functions say here."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from vacap.config import DEFAULT_MODEL
from vacap.model import DTYPE_NAMES, cpu_has_native_bf16, resolve_device, resolve_dtype


def doctor(*args, home: Path, cwd: Path, **env) -> subprocess.CompletedProcess:
    """doctor with a Hugging Face home of the test's own (HF_HUB_CACHE unset, so the cache is
    HF_HOME/hub, as for a user who sets neither)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    environment.update(HF_HOME=str(home), COLUMNS="250", **env)
    command = [sys.executable, "-m", "vacap.cli", "doctor", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, cwd=cwd)


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


def test_report_matches_this_machine_and_writes_nothing(tmp_path):
    home, cwd = tmp_path / "hf-home", tmp_path / "cwd"
    cwd.mkdir()
    out = doctor("--json", home=home, cwd=cwd)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["python"] == platform.python_version()
    for name in ("torch", "transformers", "bitsandbytes", "pillow", "pyarrow", "ray"):
        try:
            expected = metadata.version(name)
        except metadata.PackageNotFoundError:
            expected = None
        assert info["packages"][name] == expected, name
    assert info["packages"]["torch"] == torch.__version__
    assert info["torch_build"]["cuda"] == torch.version.cuda
    assert len(info["cuda_devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert info["cpu"]["native_bf16"] == cpu_has_native_bf16()
    device = resolve_device("auto")
    assert (info["auto"]["device"], info["auto"]["dtype"]) == (str(device), DTYPE_NAMES[resolve_dtype("auto", device)])
    cache = info["cache"]
    assert cache["dir"] == str(home / "hub") and cache["model"] == DEFAULT_MODEL and cache["state"] == "absent"
    # Nothing written: not the cache, not the Hugging Face home, not the current folder.
    assert not home.exists() and _files(cwd) == []

    text = doctor(home=home, cwd=cwd)
    assert text.returncode == 0, text.stderr
    assert f"python {platform.python_version()}" in text.stdout
    assert f"torch            {torch.__version__}" in text.stdout
    assert f"--dtype auto: {info['auto']['dtype']} ({info['auto']['why']})" in text.stdout
    assert f"{DEFAULT_MODEL}: not in the cache" in text.stdout
    assert not home.exists() and _files(cwd) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, auto picks the GPU's dtype whatever the CPU has")
def test_a_capped_onednn_makes_auto_fp32_and_says_why(tmp_path):
    out = doctor("--json", home=tmp_path / "home", cwd=tmp_path, ONEDNN_MAX_CPU_ISA="AVX512_CORE")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["cpu"]["native_bf16"] is False and info["auto"]["dtype"] == "fp32"
    if info["cpu"]["avx512_bf16"] or info["cpu"]["amx"]:
        assert "ONEDNN_MAX_CPU_ISA=AVX512_CORE holds oneDNN below them" in info["auto"]["why"]
    else:
        assert "neither AVX512-BF16 nor AMX" in info["auto"]["why"]


def _cache_entry(hub: Path, repo: str, files: dict[str, bytes]) -> Path:
    """A model in the cache laid out as huggingface_hub lays it: blobs, a snapshot of links, refs."""
    folder = hub / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = folder / "snapshots" / commit
    (folder / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    for number, (name, data) in enumerate(files.items()):
        blob = folder / "blobs" / f"{number:040x}"
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_default_model_in_the_cache_whole_or_in_part(tmp_path):
    home = tmp_path / "home"
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    snapshot = _cache_entry(
        home / "hub", DEFAULT_MODEL,
        {"config.json": b"{}", "model.safetensors.index.json": json.dumps(index).encode(),
         "model-00001-of-00002.safetensors": b"x" * 1000},
    )  # fmt: skip
    partial = json.loads(doctor("--json", home=home, cwd=tmp_path).stdout)["cache"]
    assert partial["state"] == "partial" and partial["missing"] == ["model-00002-of-00002.safetensors"]
    assert partial["path"] == str(snapshot)

    blob = snapshot.parent.parent / "blobs" / ("f" * 40)
    blob.write_bytes(b"y" * 1000)
    (snapshot / "model-00002-of-00002.safetensors").symlink_to(os.path.relpath(blob, snapshot))
    before = _files(home)
    out = doctor(home=home, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"{DEFAULT_MODEL}: in the cache" in out.stdout and str(snapshot) in out.stdout
    assert _files(home) == before
