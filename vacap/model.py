"""Loading LLaVA-family checkpoints and exposing their parts to vacap's own decode loop.

The decode loop never calls the Hugging Face model's ``forward``: it calls the modules one by one
(norms, q/k/v/o projections, MLP, rotary embedding, final norm, LM head). Llama, Mistral and Qwen2
decoder layers name these parts the same way, so one adapter serves every supported pairing;
image features come from the checkpoint's own vision tower and projector through
``get_image_features`` (which also does LLaVA-NeXT / OneVision anyres packing).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from vacap.config import DEFAULT_MODEL
from vacap.demo import MODEL_DIR, PRIORS_MODEL_DIR

log = logging.getLogger("vacap")

LLAVA_ARCHITECTURES = (
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
)
# Qwen2-VL's family: its own text model (Qwen2's layers, multimodal rotary positions), its own
# vision tower and merger, dynamic resolution (each image's own patch grid).
QWEN_ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
SUPPORTED_ARCHITECTURES = LLAVA_ARCHITECTURES + QWEN_ARCHITECTURES
SUPPORTED_TEXT_MODELS = ("llama", "mistral", "qwen2")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {value: key for key, value in DTYPES.items()}
QUANT_SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "model.visual", "lm_head"]
FALLBACK_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
# Qwen2-VL's dynamic resolution gives an image one token per 28 x 28 pixels, up to the
# checkpoint's max_pixels: 16384 tokens for the hub's, which 8 photos at once would not fit
# beside a 7B model in 24 GB. Unless --max-pixels says otherwise, at most 1280 tokens an image
# (the top of the range Qwen's model cards suggest), or the checkpoint's own limit where lower.
DEFAULT_MAX_PIXELS = 1280 * 28 * 28


class ModelLoadError(RuntimeError):
    """The checkpoint cannot be used; the message says why and what would work."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} asked for CUDA, but this torch build sees no CUDA device")
    return torch.device(device)


def auto_threads(cores: int, busy: float) -> int:
    """The CPU threads for torch on ``cores`` cores of which other processes keep ``busy``: the
    idle cores, at least one. torch's threads wait for each other at every operation, so one
    thread on a core that another process holds stalls them all: on a busy 2-core machine the
    demo model captioned several times faster with one thread than with two (benchmarks/RESULTS.md)."""
    return max(1, min(cores, round(cores - busy)))


def busy_elsewhere(samples: int = 20, interval: float = 0.005) -> float:
    """How many tasks of other processes are running now: the runnable count in /proc/loadavg,
    less this process, averaged over ``samples`` reads ``interval`` s apart (0.1 s in all).
    Not the load average: that lags a minute behind, so a run started right after another one
    would count the finished run as load. The 1-minute load average where /proc is missing."""
    counts = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg", encoding="ascii") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, IndexError, ValueError):
            return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        time.sleep(interval)
    return max(0.0, sum(counts) / len(counts))


def resolve_threads(threads: str) -> tuple[int, str]:
    """``--threads`` as a count, and why: a number as given, or ``auto``: ``OMP_NUM_THREADS``
    where it is set (the user's standing choice, which torch itself follows), else
    :func:`auto_threads` from this process's cores and :func:`busy_elsewhere`."""
    if threads != "auto":
        return int(threads), "as given"
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) >= 1:
        return int(given), "auto: OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = busy_elsewhere()
    return auto_threads(cores, busy), f"auto: {cores} cores, {busy:.1f} busy with other processes"


# oneDNN instruction-set caps below AVX512_CORE_BF16: under them oneDNN emulates bf16 arithmetic.
_ONEDNN_ISAS_WITHOUT_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)


def cpu_has_native_bf16() -> bool:
    """Whether bf16 matmuls run on bf16 hardware here (x86 AVX512-BF16 or AMX), not emulated.

    Emulated bf16 matmuls are slower than fp32 ones (up to 4x, benchmarks/RESULTS.md). torch runs
    its CPU bf16 matmuls through oneDNN, so a cap on oneDNN's instruction set
    (``ONEDNN_MAX_CPU_ISA``, or its older name ``DNNL_MAX_CPU_ISA``, read as oneDNN reads them)
    is honoured as if the CPU lacked the instructions. Other architectures report neither flag:
    their bf16 speed on CPU varies too much with the chip and build to choose it blindly.
    """
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if cap in _ONEDNN_ISAS_WITHOUT_BF16 or not torch.backends.mkldnn.is_available():
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that has it (else fp16); on CPU bf16 only where it is native, else fp32."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def _quantization_config(quant: str, dtype: torch.dtype):
    if quant == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError(
            f"--quant {quant} needs bitsandbytes, which is not installed: pip install \".[quant]\" in vacap's checkout, "
            "or pip install bitsandbytes"
        ) from exc
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers import BitsAndBytesConfig

    if quant == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            # 4-bit weights are dequantized to this dtype for every product: the run's dtype,
            # so that --dtype fp32 (or fp16 on a GPU without bf16) is what really computes.
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=QUANT_SKIP_MODULES,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=QUANT_SKIP_MODULES)


def unsupported(architecture: str, text_type: str) -> str | None:
    """Why vacap cannot run a checkpoint of ``architecture`` (config.json's first) with a text
    model of ``text_type``, naming what it can run; None where it can."""
    llava = architecture in LLAVA_ARCHITECTURES and text_type in SUPPORTED_TEXT_MODELS
    if llava or architecture in QWEN_ARCHITECTURES:
        return None
    return (
        f"unsupported architecture {architecture} with text model {text_type!r}; vacap supports "
        f"{', '.join(LLAVA_ARCHITECTURES)} with a {', '.join(SUPPORTED_TEXT_MODELS)} text model, and "
        f"{', '.join(QWEN_ARCHITECTURES)} (images only, no video)"
    )


def _check_supported(config) -> None:
    architecture = (getattr(config, "architectures", None) or ["<none>"])[0]
    text_type = getattr(getattr(config, "text_config", None), "model_type", "<none>")
    reason = unsupported(architecture, text_type)
    if reason:
        raise ModelLoadError(reason)


@dataclass(frozen=True)
class Preparer:
    """What turns decoded images and prompts into a checkpoint's inputs, without its weights:
    the processor (resize, normalise, tokenise) and the prompt's chat template. ``load`` reads it
    alone from the model name, cheaply, as Ray's reading tasks do; a loaded model prepares
    through its own. Tensors stay on the CPU, floats in the processor's fp32."""

    processor: object

    def __post_init__(self) -> None:
        # Batches are left padded, so that every row's prompt ends where decoding starts.
        self.processor.tokenizer.padding_side = "left"

    @classmethod
    def load(cls, name: str, max_pixels: int | None = None, min_pixels: int | None = None) -> Preparer:
        """The preparer of ``--model name`` (found as ``load_model`` finds it), without the weights;
        ``max_pixels`` and ``min_pixels`` as ``load_model`` takes them."""
        source, hub, offline = _locate(name)
        try:
            processor = _load_processor(source, **hub)
        except OSError as exc:
            raise _load_error(name, exc, offline) from exc
        return cls(_limit_pixels(processor, name, max_pixels, min_pixels))

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def _pad_id(self) -> int:
        # A tokenizer without a pad token cannot pad a batch itself; its end token pads ours
        # (masked out, so any id would do).
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    @functools.cached_property
    def reserved(self) -> frozenset[str]:
        """The strings that text taken from file names must not contain: the tokenizer's special
        and added tokens, and the processor's image and video tokens, which it expands itself."""
        tokenizer = self.tokenizer
        strings = {*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()}
        strings |= {getattr(self.processor, name, None) for name in ("image_token", "video_token")}
        return frozenset(s for s in strings if isinstance(s, str) and s)

    def prompt_text(self, prompt: str) -> str:
        """The user's prompt wrapped in the checkpoint's chat template, with one image."""
        if getattr(self.processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return FALLBACK_TEMPLATE.format(prompt=prompt)

    def prepare(self, images: Sequence, prompt: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """The processor's outputs for a batch of B PIL images, left padded; one prompt for all
        or one each. input_ids, attention_mask # (B, T); pixel_values # (B, 3, h, w), or
        (B, tiles, 3, h, w) with image_sizes # (B, 2) for anyres checkpoints."""
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        texts = [self.prompt_text(p) for p in prompts]
        return dict(self.processor(images=list(images), text=texts, return_tensors="pt", padding=True))

    def collate(self, prepared: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One batch from images prepared one by one, as ``prepare`` makes it for them together:
        token rows left padded (input_ids with the tokenizer's pad token), anyres tile stacks
        (pixel_values # (1, tiles, 3, h, w)) padded with zeros, all stacked along the rows
        (Qwen2-VL's patch rows # (patches, d) and image_grid_thw # (1, 3) simply follow each other)."""
        if len(prepared) == 1:  # the usual admission once rows free one at a time: nothing to pad
            return prepared[0]
        out = {}
        for name in prepared[0]:
            parts = [p[name] for p in prepared]
            width = max(x.shape[1] if x.dim() > 1 else 0 for x in parts)
            if name in ("input_ids", "attention_mask", "mm_token_type_ids"):
                fill = self._pad_id if name == "input_ids" else 0
                parts = [torch.nn.functional.pad(x, (width - x.shape[1], 0), value=fill) for x in parts]
            elif parts[0].dim() > 2:
                parts = [torch.cat([x, x.new_zeros(1, width - x.shape[1], *x.shape[2:])], 1) for x in parts]
            out[name] = torch.cat(parts)
        return out


@dataclass
class VisionLanguageModel:
    """A loaded checkpoint, seen as the parts vacap's decode loop needs."""

    name: str
    hf: nn.Module
    preparer: Preparer
    device: torch.device
    dtype: torch.dtype

    def __post_init__(self) -> None:
        text = self.hf.config.text_config
        language_model = self.hf.model.language_model
        self.layers: Sequence[nn.Module] = language_model.layers
        self.embed_tokens: nn.Module = language_model.embed_tokens
        self.norm: nn.Module = language_model.norm
        self.rotary_emb: nn.Module = language_model.rotary_emb
        self.lm_head: nn.Module = self.hf.lm_head
        self.n_heads: int = text.num_attention_heads
        self.n_kv_heads: int = text.num_key_value_heads
        self.head_dim: int = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.scaling: float = self.layers[0].self_attn.scaling
        self.image_token_id: int = self.hf.config.image_token_id
        # Multimodal rotary positions (Qwen2-VL's M-RoPE): image tokens get (time, height, width)
        # positions from their grid, so positions are not the count of tokens before.
        self.mrope: bool = type(self.hf).__name__ in QWEN_ARCHITECTURES
        self.sliding_window: int | None = _sliding_window(text)
        # The longest sequence (prompt, image tokens and caption) the model was made for;
        # beyond it positions are ones it never saw, and the caption is garbage.
        self.context_length: int | None = getattr(text, "max_position_embeddings", None)
        eos = self.hf.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids: tuple[int, ...] = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        pad = self.hf.generation_config.pad_token_id
        self.pad_id: int = pad if pad is not None else self.eos_ids[0]
        accepted = inspect.signature(self.hf.model.get_image_features).parameters
        self._image_kwargs = {name for name in accepted if name not in ("self", "kwargs", "pixel_values")}
        # Kept by vacap.decode for the model's later batches: its torch.compile'd steps (a model
        # compiles once), and the notes already given about them (each is said once).
        self.compiled: dict[str, Callable] = {}
        self.notes_given: set[str] = set()

    @property
    def processor(self):
        return self.preparer.processor

    @property
    def tokenizer(self):
        return self.preparer.tokenizer

    def place(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Prepared inputs (CPU, fp32) moved to the model's device, floats cast to its dtype."""
        return {
            name: value.to(self.device, self.dtype if value.is_floating_point() else None)
            for name, value in inputs.items()
        }

    def prepare(self, images: Sequence, prompt: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """``Preparer.prepare``'s batch, placed for this model."""
        return self.place(self.preparer.prepare(images, prompt))

    @torch.no_grad()
    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings with image features in place of the image tokens.

        Returns (embeds (B, T, hidden), image_mask (B, T) bool).
        """
        input_ids = inputs["input_ids"]
        embeds = self.embed_tokens(input_ids)
        image_mask = input_ids == self.image_token_id
        if "pixel_values" in inputs:
            extra = {name: value for name, value in inputs.items() if name in self._image_kwargs}
            features = self.hf.model.get_image_features(pixel_values=inputs["pixel_values"], **extra)
            features = torch.cat(list(features.pooler_output), dim=0).to(embeds.dtype)
            if features.shape[0] != int(image_mask.sum()):
                raise ModelLoadError(
                    f"the processor made {int(image_mask.sum())} image tokens but the vision tower gave "
                    f"{features.shape[0]} features; the processor does not match this checkpoint"
                )
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), features)
        return embeds, image_mask

    def positions(
        self, inputs: dict[str, torch.Tensor], valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary positions of a prepared batch and each row's offset for the tokens after it.

        ``valid`` # (B', T) bool, B' a multiple of the batch's B, numbers the slots a method's
        rows hold (default: the batch's attention mask): its extra rows are copies of the batch's
        rows in order (VCD's noised images) or copies with their image slots invalid (PAI's
        image-free prompt), which count their own slots only, as the shorter prompt would.
        Returns positions # (B', T) long, each real token's count of real tokens before it, or
        under M-RoPE # (3, B', T): the (time, height, width) positions of the model's own
        ``get_rope_index``, where an image's tokens sit on its grid and the text after an image
        continues from its largest position; and deltas # (B', 1) long: a token after the prompt,
        with n real tokens before it, has position n + delta in every stream (0 without M-RoPE).
        """
        mask = inputs["attention_mask"].bool() if valid is None else valid
        if not self.mrope or "image_grid_thw" not in inputs:
            return (mask.long().cumsum(-1) - 1).clamp(min=0), mask.new_zeros(mask.shape[0], 1, dtype=torch.long)
        copies = mask.shape[0] // inputs["input_ids"].shape[0]
        # A row without its image tokens takes no grid, and copies follow all the batch's rows, so
        # the grids repeated in the rows' order meet the rows that show an image.
        return self.hf.model.get_rope_index(
            inputs["input_ids"].repeat(copies, 1), inputs["mm_token_type_ids"].repeat(copies, 1),
            image_grid_thw=inputs["image_grid_thw"].repeat(copies, 1), attention_mask=mask.long(),
        )  # fmt: skip

    def image_pixels(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """pixel_values cut into each image's own part, in the batch's layout, so that
        ``torch.cat`` joins them back: # (1, ...) per image, or Qwen2-VL's patch rows of each image."""
        pixels = inputs["pixel_values"]
        if "image_grid_thw" in inputs:
            return list(pixels.split(inputs["image_grid_thw"].prod(-1).tolist()))
        return list(pixels.split(1))

    def image_grids(self, inputs: dict[str, torch.Tensor]) -> list[tuple[int, int]] | None:
        """Each image's grid of image tokens (rows, columns), in the batch's order, where the
        tokens are one grid per image (Qwen2-VL's, after the 2 x 2 merge); None for LLaVA's
        families, whose tokens are one square grid (or anyres tiles) of the tower's size."""
        if "image_grid_thw" not in inputs:
            return None
        merge = self.hf.config.vision_config.spatial_merge_size
        return [(h // merge, w // merge) for _, h, w in inputs["image_grid_thw"].tolist()]

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()


def _sliding_window(text_config) -> int | None:
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


# The models shipped inside vacap, by --model name (see vacap.demo).
DEMO_MODELS = {"demo": MODEL_DIR, "demo-priors": PRIORS_MODEL_DIR}
MODEL_CHOICES = "a Hugging Face id (such as llava-hf/llava-1.5-7b-hf), a local model folder, demo or demo-priors"
OFFLINE_ADVICE = (
    "use --model demo (the small model shipped with vacap) or a local model folder; "
    "set HF_HUB_OFFLINE=1 to use a model already in the Hugging Face cache without asking the hub"
)
OFFLINE_SET = "HF_HUB_OFFLINE is set"


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be meant as a folder: a hub id is ``name`` or ``owner/name``."""
    return (
        name.startswith((".", "/", "~"))
        or name.endswith("/")
        or "\\" in name
        or ":" in name
        or name.count("/") > 1
    )


def _source(name: str) -> tuple[str, bool]:
    """(what transformers loads, whether it comes from the hub) for ``--model``.

    `demo` and `demo-priors` are the models shipped inside vacap; an existing or path-like name
    is a local folder, which must hold a checkpoint; anything else is a hub id.
    """
    if not name.strip():
        raise ModelLoadError(f"--model is empty; give {MODEL_CHOICES}")
    if name in DEMO_MODELS:
        folder = DEMO_MODELS[name]
        if not (folder / "config.json").exists():
            raise ModelLoadError(f"the {name} model is missing from this installation ({folder})")
        return str(folder), False
    path = Path(name).expanduser()
    if not path.exists() and not _looks_like_path(name):
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(name)
        except ValueError as exc:
            raise ModelLoadError(
                f"{name!r} is neither a folder nor a Hugging Face id ({exc}); give {MODEL_CHOICES}"
            ) from exc
        return name, True
    if not path.exists():
        raise ModelLoadError(f"no such model folder: {name}; give {MODEL_CHOICES}")
    if not path.is_dir():
        raise ModelLoadError(f"{name} is a file, not a model folder; give {MODEL_CHOICES}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{name} holds no config.json, so it is not a model folder; give {MODEL_CHOICES}")
    return str(path), False


def _hub_unreachable(repo_id: str) -> str | None:
    """Why the Hugging Face hub gives no answer about ``repo_id`` now, or None when it answers.

    One HEAD request without retries: transformers retries an unanswered download with backoff
    for about half a minute before it gives up, which is what a user offline would otherwise wait.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, is_offline_mode
    from huggingface_hub.errors import HfHubHTTPError

    if is_offline_mode():
        return OFFLINE_SET
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"))
    except HfHubHTTPError:
        return None  # it answered (a missing or gated repo, say): loading reports that itself
    except Exception as exc:  # refused, no DNS, a timeout, a proxy error: all mean no answer
        return f"{type(exc).__name__}: {exc}"
    return None


def _load_error(name: str, exc: Exception, offline: str | None) -> ModelLoadError:
    if offline is None:
        return ModelLoadError(f"cannot load model {name!r}: {exc}")
    if offline == OFFLINE_SET:
        return ModelLoadError(
            f"cannot load model {name!r}: HF_HUB_OFFLINE is set and the model is not in the Hugging Face "
            "cache; use --model demo (the small model shipped with vacap) or a local model folder, "
            "or unset HF_HUB_OFFLINE to download it"
        )
    return ModelLoadError(
        f"cannot load model {name!r}: the Hugging Face hub cannot be reached ({offline}) and the model "
        f"is not in the local cache; {OFFLINE_ADVICE}"
    )


def _locate(name: str) -> tuple[str, dict, str | None]:
    """(what transformers loads, the hub keywords to load it with, why the hub cannot be
    reached or None) for ``--model name``."""
    source, from_hub = _source(name)
    offline = _hub_unreachable(source) if from_hub else None
    # With no hub, read the cache only: a download attempt would be retried for half a minute.
    return source, ({"local_files_only": True} if offline else {}), offline


def _load_processor(source: str, **hub):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source, trust_remote_code=False, **hub)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise
    # LLaVA-OneVision's and Qwen2-VL's processors insist on a video processor, and every video
    # processor in transformers 5 needs torchvision (no CPU wheel matches our torch). vacap
    # captions only images, so it builds the same processor class without the video part.
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.processing_utils import ProcessorMixin

    settings, _ = ProcessorMixin.get_processor_dict(source, **hub)
    # The hub's Qwen2-VL checkpoints name their processor class in preprocessor_config.json only.
    name = settings.pop("processor_class", None) or ImageProcessingMixin.get_image_processor_dict(source, **hub)[0].get(
        "processor_class"
    )
    base = getattr(transformers, name)

    class ImageOnlyProcessor(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    kwargs = {key: value for key, value in settings.items() if not isinstance(value, dict)}
    return ImageOnlyProcessor(
        AutoImageProcessor.from_pretrained(source, **hub), AutoTokenizer.from_pretrained(source, **hub), **kwargs
    )


def _limit_pixels(processor, name: str, max_pixels: int | None, min_pixels: int | None):
    """The processor with Qwen2-VL's dynamic resolution bounded: each image resized to at most
    ``max_pixels`` (default: ``DEFAULT_MAX_PIXELS`` or the checkpoint's limit where lower) and at
    least ``min_pixels`` (default: the checkpoint's), aspect kept. Other processors resize to a
    fixed size; asking them for a pixel range is an error."""
    image = processor.image_processor
    size = image.size
    if getattr(size, "longest_edge", None) is None or not hasattr(image, "merge_size"):
        if max_pixels is not None or min_pixels is not None:
            raise ModelLoadError(
                f"--max-pixels and --min-pixels set the resolution of Qwen2-VL and Qwen2.5-VL checkpoints; "
                f"{name} resizes every image to its own fixed size"
            )
        return processor
    longest = max_pixels if max_pixels is not None else min(size.longest_edge, DEFAULT_MAX_PIXELS)
    shortest = min_pixels if min_pixels is not None else min(size.shortest_edge, longest)
    if shortest > longest:
        raise ModelLoadError(f"--min-pixels {shortest} is above --max-pixels {longest}; give a min at most the max")
    image.size = {"shortest_edge": shortest, "longest_edge": longest}
    return processor


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: str = "auto",
    device: str = "auto",
    quant: str = "none",
    max_pixels: int | None = None,
    min_pixels: int | None = None,
) -> VisionLanguageModel:
    """Load a checkpoint by Hugging Face id or local folder (safetensors only, no remote code).
    ``max_pixels`` and ``min_pixels`` bound the size images are resized to, for Qwen2-VL's
    dynamic resolution (see ``_limit_pixels``)."""
    import transformers
    from transformers import AutoConfig

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source, hub, offline = _locate(name)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False, **hub)
    except ValueError as exc:
        # transformers knows no such model type: the checkpoint's own code would be needed.
        raise ModelLoadError(
            f"cannot load model {name!r}: {exc}; vacap runs no model code from a checkpoint, only "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        ) from exc
    except OSError as exc:
        raise _load_error(name, exc, offline) from exc
    _check_supported(config)
    model_class = getattr(transformers, config.architectures[0])
    quantization = _quantization_config(quant, torch_dtype)
    kwargs = dict(dtype=torch_dtype, use_safetensors=True, trust_remote_code=False, **hub)
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": torch_device})
    try:
        processor = _limit_pixels(_load_processor(source, **hub), name, max_pixels, min_pixels)
        hf = model_class.from_pretrained(source, **kwargs)
        preparer = Preparer(processor)
    except OSError as exc:
        raise _load_error(name, exc, offline) from exc
    except (RuntimeError, ValueError) as exc:
        if quantization is None:
            raise
        raise ModelLoadError(f"bitsandbytes could not quantize {name!r} to {quant} on {torch_device}: {exc}") from exc
    if quantization is None:
        hf.to(torch_device)
    hf.eval()
    return VisionLanguageModel(name=name, hf=hf, preparer=preparer, device=torch_device, dtype=torch_dtype)
