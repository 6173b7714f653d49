"""`vacap doctor`: what this machine gives vacap, for bug reports and for checking a setup.

Reads versions, devices and the Hugging Face cache; writes nothing, loads no model and never
touches the network. What ``--dtype auto`` would pick comes from the loader's own decision
functions, so the report cannot disagree with what a run does.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import vacap
from vacap.config import DEFAULT_MODEL

# Distributions reported, by their names on the package index.
PACKAGES = (
    "torch",
    "transformers",
    "bitsandbytes",
    "accelerate",
    "safetensors",
    "tokenizers",
    "huggingface-hub",
    "pillow",
    "pyarrow",
    "datasets",
    "ray",
)
GiB = 1024**3


def collect(model: str = DEFAULT_MODEL) -> dict:
    """Everything the report says, as plain data (what ``--json`` prints)."""
    import torch

    from vacap import model as loader
    from vacap.model import DTYPE_NAMES, cpu_has_native_bf16, resolve_device, resolve_dtype

    device = resolve_device("auto")
    cpu = {
        "model": _cpu_name(),
        "cores": os.cpu_count(),
        "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "amx": bool(torch.cpu._is_amx_tile_supported()),
        "onednn": bool(torch.backends.mkldnn.is_available()),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
        "native_bf16": cpu_has_native_bf16(),
    }
    gpus = [_gpu(torch, index) for index in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    dtype = DTYPE_NAMES[resolve_dtype("auto", device)]
    return {
        "vacap": vacap.__version__,
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "torch_build": _torch_build(torch),
        "cpu": cpu,
        "cuda_devices": gpus,
        "auto": {"device": str(device), "dtype": dtype, "why": _why(dtype, device.type, cpu, gpus)},
        "models": {
            "llava": list(loader.LLAVA_ARCHITECTURES),
            "llava_text_models": list(loader.SUPPORTED_TEXT_MODELS),
            "qwen": list(loader.QWEN_ARCHITECTURES),
            "qwen_max_pixels": loader.DEFAULT_MAX_PIXELS,
        },
        "cache": cache_status(model),
    }


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("model name", "Model", "Hardware")) and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _torch_build(torch) -> dict:
    if torch.version.cuda:
        kind = f"CUDA {torch.version.cuda}"
    elif getattr(torch.version, "hip", None):
        kind = f"ROCm {torch.version.hip}"
    else:
        kind = "CPU"
    return {"kind": kind, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}


def _gpu(torch, index: int) -> dict:
    properties = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    return {
        "index": index,
        "name": properties.name,
        "memory_gib": round(total / GiB, 1),
        "free_gib": round(free / GiB, 1),
        "capability": f"{properties.major}.{properties.minor}",
    }


def _why(dtype: str, device: str, cpu: dict, gpus: list[dict]) -> str:
    """Why auto picks ``dtype``, in the words of vacap.model.resolve_dtype's rule."""
    if device == "cuda":
        name = gpus[0]["name"] if gpus else "the GPU"
        if dtype == "bf16":
            return f"{name} computes in bf16"
        return f"{name} has no bf16, so fp16"
    if cpu["native_bf16"]:
        has = " and ".join(n for n, flag in (("AVX512-BF16", cpu["avx512_bf16"]), ("AMX", cpu["amx"])) if flag)
        return f"no CUDA device; this CPU has native bf16 ({has}), where bf16 matmuls run about 4x faster than fp32"
    emulated = "bf16 would be emulated, slower than fp32"
    if cpu["avx512_bf16"] or cpu["amx"]:
        if cpu["onednn_max_cpu_isa"]:
            return (
                f"no CUDA device; the CPU has bf16 instructions, but ONEDNN_MAX_CPU_ISA="
                f"{cpu['onednn_max_cpu_isa']} holds oneDNN below them, so {emulated}"
            )
        return f"no CUDA device; this torch build has no oneDNN, so {emulated}"
    return f"no CUDA device; this CPU has neither AVX512-BF16 nor AMX, so {emulated}"


def cache_status(model: str = DEFAULT_MODEL) -> dict:
    """Whether ``model`` lies in the Hugging Face cache whole (its config and every weight file
    its index names), read from the cache folder alone."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    status = {"dir": str(constants.HF_HUB_CACHE), "model": model, "state": "absent", "size_gib": None}
    try:
        repos = scan_cache_dir(constants.HF_HUB_CACHE).repos
    except CacheNotFound:
        status["dir_exists"] = False
        return status
    status["dir_exists"] = True
    repo = next((r for r in repos if r.repo_id == model and r.repo_type == "model"), None)
    if repo is None:
        return status
    status["size_gib"] = round(repo.size_on_disk / GiB, 2)
    best = None
    for revision in repo.revisions:
        missing = _missing_files(Path(revision.snapshot_path))
        if best is None or len(missing) < len(best[1]):
            best = (revision, missing)
    if best is None:
        status["state"] = "partial"
        status["missing"] = ["config.json"]
        return status
    revision, missing = best
    status.update(
        state="partial" if missing else "complete", revision=revision.commit_hash, path=str(revision.snapshot_path)
    )
    if missing:
        status["missing"] = missing
    status["unsupported"] = _unsupported(Path(revision.snapshot_path) / "config.json")
    return status


def _unsupported(config: Path) -> str | None:
    """Why vacap cannot run the checkpoint of this config.json (``vacap.model.unsupported``), or
    None where it can, or where the file cannot be read (its loading will say why)."""
    from vacap.model import unsupported

    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
        architecture = (settings.get("architectures") or ["<none>"])[0]
        text_type = (settings.get("text_config") or {}).get("model_type", "<none>")
    except (OSError, ValueError, AttributeError):
        return None
    return unsupported(architecture, text_type)


def _missing_files(snapshot: Path) -> list[str]:
    """The files a safetensors checkpoint needs that ``snapshot`` lacks."""
    missing = [] if (snapshot / "config.json").is_file() else ["config.json"]
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            return [*missing, "a readable model.safetensors.index.json"]
        missing += [shard for shard in shards if not (snapshot / shard).is_file()]
    elif not (snapshot / "model.safetensors").is_file():
        missing.append("model.safetensors")
    return missing


def render(info: dict) -> str:
    """The human-readable report."""
    packages = info["packages"]
    build = info["torch_build"]
    cpu = info["cpu"]
    width = max(map(len, packages))
    lines = [
        f"vacap {info['vacap']}",
        f"python {info['python']} ({info['executable']})",
        f"platform {info['platform']}",
        "",
        "packages:",
        *(f"  {name:<{width}}  {version or 'not installed'}" for name, version in packages.items()),
        f"  torch build: {build['kind']}",
        "",
        "devices:",
        f"  cpu: {cpu['model']}, {cpu['cores']} cores; native bf16: {'yes' if cpu['native_bf16'] else 'no'} "
        f"(AVX512-BF16 {_yes(cpu['avx512_bf16'])}, AMX {_yes(cpu['amx'])}"
        + (f", ONEDNN_MAX_CPU_ISA={cpu['onednn_max_cpu_isa']}" if cpu["onednn_max_cpu_isa"] else "")
        + ")",
    ]
    for gpu in info["cuda_devices"]:
        lines.append(
            f"  cuda:{gpu['index']}: {gpu['name']}, {gpu['memory_gib']} GiB ({gpu['free_gib']} GiB free), "
            f"compute capability {gpu['capability']}"
        )
    if not info["cuda_devices"]:
        lines.append(f"  cuda: none ({'this torch build has no CUDA' if not build['cuda'] else 'no device visible'})")
    auto = info["auto"]
    cache = info["cache"]
    models = info["models"]
    lines += [
        "",
        f"--device auto: {auto['device']}; --dtype auto: {auto['dtype']} ({auto['why']})",
        "",
        "models vacap runs:",
        f"  LLaVA: {', '.join(models['llava'])}, with a {', '.join(models['llava_text_models'])} text model",
        f"  Qwen2-VL: {', '.join(models['qwen'])}, images only; --max-pixels {models['qwen_max_pixels']} by default",
        "",
        f"Hugging Face cache: {cache['dir']}" + ("" if cache["dir_exists"] else " (does not exist yet)"),
        f"  {cache['model']}: {_cache_line(cache)}",
    ]
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _cache_line(cache: dict) -> str:
    if cache["state"] == "absent":
        return "not in the cache (the first run downloads it where there is a network)"
    where = f"{cache['size_gib']} GiB" + (f", {cache['path']}" if cache.get("path") else "")
    if cache["state"] == "complete":
        return f"in the cache ({where})" + (f"; but {cache['unsupported']}" if cache.get("unsupported") else "")
    return f"partly in the cache ({where}); missing: {', '.join(cache['missing'])}"
