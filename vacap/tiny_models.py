"""Small random-weight LLaVA-family checkpoints, built offline.

Tests and benchmarks need real checkpoints that go through the same loading path as a
downloaded model (``<Model>.from_pretrained`` + ``AutoProcessor.from_pretrained``), but they
must not touch the network. :func:`build_tiny_model` builds such a checkpoint from scratch:
a byte-level BPE tokenizer trained on an inline caption corpus, a processor configured from
parameters, random float32 weights saved as safetensors and a generation config.

Weights are random, so the "captions" are gibberish; what matters is that they are
deterministic for a given ``seed`` and that greedy decoding produces varied tokens (and
sometimes EOS) instead of repeating one or two tokens. That needs a much larger
initialisation scale than the usual 0.02, hence ``init_std``.

Every architecture shares one tokenizer (512 tokens; ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2,
``<unk>`` 3, ``<image>`` 4, ``<video>`` 5), one LLaVA-1.5 chat template
(``"USER: <image>\\nPROMPT ASSISTANT:"``) and one 32x32 vision input with 8x8 patches:

* ``llava-llama`` / ``llava-mistral`` / ``llava-qwen2`` (CLIP tower): 16 image tokens per image.
* ``llava-next`` (CLIP) / ``llava-onevision`` (SigLIP), anyres with grid pinpoints 32x32,
  32x64, 64x32 and 64x64: 16 base tokens, plus the unpadded high-resolution grid, plus one
  newline per grid row, so the count depends on the image's size and aspect ratio
  (e.g. 36 for 32x32, 44 for 40x30, 46 for 30x40, 34 for 100x20, 88 for 64x64; width x height).

LLaVA-OneVision's processor cannot be loaded without torchvision (see
:func:`_save_onevision_processor`); its model loads either way.

``qwen2-vl`` and ``qwen2.5-vl`` are Qwen's own families instead: a tokenizer with Qwen2's special
tokens (no BOS; ``<|im_end|>`` ends a caption), the hub checkpoints' chat template, M-RoPE
text models with q/k/v biases and grouped-query attention, Qwen's vision towers (Qwen2.5-VL's
with window attention) and dynamic resolution: 8-px patches merged 2 x 2, one image token per
16 x 16 pixels and 4 to 16 tokens per image, so images of different sizes and aspect ratios
give different, often non-square grids. :func:`shrink_hub_checkpoint` puts shrunk random
weights around a hub checkpoint's own files instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
# The PIL image processors work with or without torchvision (transformers only warns when the
# plain names fall back to them); a checkpoint saved with them loads with either backend.
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    SiglipVisionConfig,
)

QWEN_ARCHITECTURES = ("qwen2-vl", "qwen2.5-vl")
ARCHITECTURES = ("llava-llama", "llava-mistral", "llava-qwen2", "llava-next", "llava-onevision", *QWEN_ARCHITECTURES)
SIZES = ("tiny", "mid", "long", "short", "wide")

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
# Order fixes the ids: <pad>=0, <s>=1, </s>=2, <unk>=3, <image>=4, <video>=5.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN, VIDEO_TOKEN)
VOCAB_SIZE = 512
# Random weights give EOS about a 1-in-vocab chance per step, so a caption would almost never
# end; scaling the EOS row of the output embedding by this factor makes roughly half of the
# tiny models' greedy captions end within 64 tokens (others run on), while the first 20
# tokens stay varied. Decode loops need both cases tested, often within one batch.
EOS_LOGIT_SCALE = 1.5

# Vision input side and patch size: a 4x4 patch grid, i.e. 16 image tokens per 32x32 tile.
IMAGE_SIZE = 32
PATCH_SIZE = 8
# Tile layouts (height, width) for anyres; different aspect ratios pick different layouts.
GRID_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
MID_IMAGE_SIZE = 192

# LLaVA-1.5 conversation format: "USER: <image>\n{text} ASSISTANT:". Transformers renders chat
# templates with trim_blocks, so every tag strips whitespace and the newline is an expression.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- message['role'].upper() + ': ' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] + ' ' -}}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}"
    "{{- '" + IMAGE_TOKEN + "' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}"
    "{{- item['text'] + ' ' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# Tokenizer training text: caption-like English, plus the words of the usual prompts, so that
# prompts and captions tokenize into whole-word-ish pieces rather than single bytes.
CORPUS = """\
Please describe this image in detail. What is in the picture? Describe the scene briefly.
A man in a blue shirt is riding a bicycle down a busy city street next to parked cars.
Two dogs are playing with a red ball on the green grass in a sunny park.
A woman is sitting on a wooden bench and reading a book under a large tree.
A small white cat sleeps on a soft gray sofa near the window of a living room.
A plate of food with rice, chicken and fresh vegetables sits on a kitchen table.
Several people are walking along the beach at sunset while waves roll onto the sand.
A red double decker bus drives past tall buildings on a rainy afternoon.
The kitchen has white cabinets, a steel refrigerator, a stove and a bowl of fruit.
A young boy in a yellow jacket is flying a kite in an open field with blue sky.
A train is stopped at the station and passengers are waiting on the platform.
An old brick house stands at the end of a narrow road surrounded by trees.
A group of children are playing soccer on a dirt field behind the school.
A bird with black and white feathers is sitting on a branch of a tree.
The snowy mountain rises above a calm lake that reflects the clouds in the sky.
A computer, a keyboard, a mouse and a cup of coffee are on the office desk.
A herd of cows is grazing in a green meadow next to a wooden fence.
A girl holds an umbrella while she walks across the street in the rain.
There is a vase of yellow flowers on the table next to a lamp and a clock.
A skateboarder jumps over a ramp in a skate park while his friends watch.
A pizza with cheese, tomato and olives is cut into slices on a round tray.
The airplane is parked on the runway and workers load bags into the cargo hold.
A black horse is standing in a field of tall grass near a red barn.
Boats are tied to the dock in a small harbor with houses on the hill behind.
A man and a woman are sitting at a table in a restaurant and smiling.
A teddy bear is lying on a bed with white sheets and blue pillows.
The traffic light is red and cars are waiting at the intersection.
A giraffe is eating leaves from the top of a tall tree at the zoo.
A person is surfing a large wave in the ocean on a white surfboard.
The bathroom has a white sink, a mirror, a toilet and a green towel.
An elephant walks slowly through the dry grass of the savanna.
A motorcycle is parked on the side of the road in front of a shop.
There are three people, a dog and a car in the image. The photo is bright and clear.
In the background there is a building with many windows and a clock tower.
In the foreground a child is holding a toy and looking at the camera.
The image shows an indoor scene with warm light, a chair, a table and a plant.
"""


@dataclass(frozen=True)
class Dims:
    """Transformer dimensions of a text model or a vision tower."""

    hidden: int
    layers: int
    heads: int
    intermediate: int

    def config_kwargs(self) -> dict:
        """The keywords transformers' Llama/Mistral/Qwen2/CLIP/SigLIP configs name them by."""
        return dict(
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.intermediate,
        )


# Four text layers so that code that starts working at layer 2 has layers to work on.
_TINY_TEXT = Dims(hidden=64, layers=4, heads=4, intermediate=128)
# bitsandbytes 4-bit on CPU needs in_features % 64 == 0 and out_features % 32 == 0 for every
# quantized Linear: hidden 128 with 4 heads gives head_dim 32, so even 2 KV heads give 64.
_QUANT_TEXT = Dims(hidden=128, layers=4, heads=4, intermediate=256)
# For speed benchmarks: ~310M parameters with multi-head attention (llava-llama, llava-next),
# ~285M with the grouped-query attention of the others. The vision tower stays tiny.
_MID_TEXT = Dims(hidden=1024, layers=24, heads=16, intermediate=2816)
# For long prompts (LLaVA-NeXT's ~2.9k tokens per image with llava-next): the mid model's 192-px
# tiles and sequence length, half its width and a third of its depth (~27M text parameters),
# so that 2 CPU cores prefill a batch of 4 such prompts in seconds.
_LONG_TEXT = Dims(hidden=512, layers=8, heads=8, intermediate=1408)
# For what a decode step costs at real width: the layers of a 7B LLaVA (LLaVA-1.5-7B's hidden
# size, heads and MLP), but 6 of its 32, so that 2 CPU cores and 24 GiB hold it (~1.2B text
# parameters, 4.9 GB in fp32). Per-layer costs compare with a 7B model's; whole steps do not.
_WIDE_TEXT = Dims(hidden=4096, layers=6, heads=32, intermediate=11008)

# Two layers so that vision_feature_layer=-2 selects a real hidden state.
_TINY_VISION = Dims(hidden=32, layers=2, heads=2, intermediate=64)
_QUANT_VISION = Dims(hidden=64, layers=2, heads=2, intermediate=128)


def build_tiny_model(
    arch: str,
    out_dir: str | Path,
    *,
    size: str = "tiny",
    init_std: float = 0.3,
    seed: int = 0,
    quantizable: bool = False,
) -> Path:
    """Build a random-weight checkpoint of ``arch`` and save it, with its processor, to ``out_dir``.

    ``init_std`` is the text model's (and projector's) ``initializer_range``; ``seed`` makes the
    weights reproducible. ``quantizable`` picks dimensions that bitsandbytes can quantize on CPU
    (``size="mid"`` dimensions already qualify; its images give 576 tokens, as LLaVA-1.5's
    do). ``size="long"`` is a narrower text model on the same 192-px tiles: with ``llava-next``
    a square image of at least 384 px fills the 2 x 2 anyres grid and gives 2928 image tokens
    (576 base + 2304 tile + 48 row-newline tokens), as LLaVA-NeXT's up to 2880 do.
    ``size="short"`` is the mid text model on the tiny 32-px images (16 image tokens): decode
    steps rather than prefills take its time, as on a GPU, where a prompt of 600 tokens costs a
    few steps. ``size="wide"`` has 6 layers of LLaVA-1.5-7B's width on the mid model's images.
    Returns ``out_dir`` as a ``Path``.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    out = Path(out_dir)

    if size in ("mid", "short"):
        text_dims = _MID_TEXT
    elif size == "long":
        text_dims = _LONG_TEXT
    elif size == "wide":
        text_dims = _WIDE_TEXT
    else:
        text_dims = _QUANT_TEXT if quantizable else _TINY_TEXT
    vision_dims = _QUANT_VISION if quantizable else _TINY_VISION

    if arch in QWEN_ARCHITECTURES:
        config, model_class, tokenizer, save_processor = _qwen_parts(arch, text_dims, init_std, size, quantizable)
        return _save(config, model_class, tokenizer, save_processor, seed, out)
    tokenizer = _build_tokenizer()
    text_config = _text_config(arch, text_dims, init_std, tokenizer)
    # Mid and long models see 192 px: 24 x 24 patches, the 576 image tokens of LLaVA-1.5 per
    # tile, so that benchmarks attend over a cache of realistic length.
    side = IMAGE_SIZE if size in ("tiny", "short") else MID_IMAGE_SIZE
    config, model_class, save_processor = _multimodal_parts(arch, text_config, vision_dims, tokenizer, side)
    return _save(config, model_class, tokenizer, save_processor, seed, out)


def _save(config, model_class, tokenizer: PreTrainedTokenizerFast, save_processor, seed: int, out: Path) -> Path:
    """Random weights of ``config`` from ``seed``, saved to ``out`` with the processor and a
    generation config."""
    config.dtype = torch.float32

    # A private RNG stream: the weights depend on ``seed`` only, and the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.eos_token_id] *= EOS_LOGIT_SCALE
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    save_processor(out)
    return out


def _build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (like Llama-3 / Qwen2) on :data:`CORPUS`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        # The full byte alphabet, so that any text (not only the corpus) can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer)
    return llava_tokenizer(tokenizer, {"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN})


def llava_tokenizer(tokenizer: Tokenizer, extra_special_tokens: dict[str, str]) -> PreTrainedTokenizerFast:
    """A trained ``tokenizers`` model as LLaVA-1.5's tokenizer behaves: BOS prepended (as Llama's
    does), left padding, <pad>/<s>/</s>/<unk> specials, the processors' named tokens, the chat template."""
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens=extra_special_tokens,
        chat_template=CHAT_TEMPLATE,
    )


def _text_config(arch: str, dims: Dims, init_std: float, tokenizer: PreTrainedTokenizerFast):
    common = dict(
        vocab_size=len(tokenizer),
        **dims.config_kwargs(),
        max_position_embeddings=4096,
        initializer_range=init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if arch in ("llava-llama", "llava-next"):
        # Plain multi-head attention, like Vicuna / Llama-2.
        return LlamaConfig(num_key_value_heads=dims.heads, **common)
    if arch == "llava-mistral":
        # Grouped-query attention, like Mistral-7B (2 query heads per KV head).
        return MistralConfig(num_key_value_heads=dims.heads // 2, sliding_window=None, **common)
    # Qwen2 (llava-interleave-qwen, llava-onevision): grouped-query attention, q/k/v biases.
    return Qwen2Config(num_key_value_heads=dims.heads // 2, **common)


def _multimodal_parts(arch: str, text_config, vision: Dims, tokenizer: PreTrainedTokenizerFast, side: int):
    """The top-level config, the model class and a function saving a matching processor.

    ``side`` is the vision tower's input size; anyres tile layouts scale with it.
    """
    pinpoints = [[h * side // IMAGE_SIZE, w * side // IMAGE_SIZE] for h, w in GRID_PINPOINTS]
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision_kwargs = dict(
        **vision.config_kwargs(),
        image_size=side,
        patch_size=PATCH_SIZE,
    )
    if arch == "llava-onevision":
        config = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(vision_use_head=False, **vision_kwargs),
            text_config=text_config,
            image_token_id=image_token_id,
            video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
            image_grid_pinpoints=pinpoints,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
        )
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": side, "width": side}, image_grid_pinpoints=pinpoints
        )
        save = partial(_save_onevision_processor, image_processor, tokenizer, config.vision_aspect_ratio, side)
        return config, LlavaOnevisionForConditionalGeneration, save

    # CLIP tower, LLaVA-1.5 feature selection: penultimate layer, CLS token dropped ("default");
    # the processor then needs num_additional_image_tokens=1 to count the CLS it drops.
    vision_config = CLIPVisionConfig(**vision_kwargs)
    processor_kwargs = dict(
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    if arch == "llava-next":
        config = LlavaNextConfig(
            vision_config=vision_config,
            text_config=text_config,
            image_token_id=image_token_id,
            image_grid_pinpoints=pinpoints,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            image_grid_pinpoints=pinpoints,
        )
        processor = LlavaNextProcessor(image_processor, **processor_kwargs)
        return config, LlavaNextForConditionalGeneration, processor.save_pretrained

    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=(side // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    processor = LlavaProcessor(image_processor, **processor_kwargs)
    return config, LlavaForConditionalGeneration, processor.save_pretrained


def _save_onevision_processor(
    image_processor: LlavaOnevisionImageProcessorPil,
    tokenizer: PreTrainedTokenizerFast,
    vision_aspect_ratio: str,
    side: int,
    out: Path,
) -> None:
    """Write what ``LlavaOnevisionProcessor.save_pretrained`` would write.

    ``LlavaOnevisionProcessor`` insists on a video processor, and transformers' video processors
    need torchvision, which has no CPU build on PyPI; so the processor object cannot be made
    without torchvision. Its files can: the nested ``processor_config.json`` of transformers v5
    plus the tokenizer files. ``AutoProcessor.from_pretrained`` loads them where torchvision is
    installed; without torchvision no LLaVA-OneVision processor loads, downloaded or not.
    """
    tokenizer.save_pretrained(out)
    processor_config = {
        "processor_class": "LlavaOnevisionProcessor",
        "image_processor": json.loads(image_processor.to_json_string()),
        # Class defaults apart from the frame size, which follows the vision tower.
        "video_processor": {
            "video_processor_type": "LlavaOnevisionVideoProcessor",
            "size": {"height": side, "width": side},
        },
        "image_token": IMAGE_TOKEN,
        "video_token": VIDEO_TOKEN,
        # SigLIP has no CLS token: every patch of a tile is an image token.
        "num_image_tokens": (side // PATCH_SIZE) ** 2,
        "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": vision_aspect_ratio,
    }
    (out / "processor_config.json").write_text(json.dumps(processor_config, indent=2, sort_keys=True) + "\n")


# Qwen2-VL and Qwen2.5-VL: their own tokens (no BOS; <|im_end|> ends a turn, <|endoftext|> pads)
# and their own chat template (the hub checkpoints' chat_template.json, verbatim).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
# Tiny Qwen images: 8-px patches merged 2 x 2, so one image token per 16 x 16 pixels, and from
# 4 to 16 of them per image: a 32 x 32 image gives a 2 x 2 grid, 40 x 30 a 3 x 2 one (width x
# height), 30 x 44 a 2 x 3 one, 64 x 60 a 4 x 4 one.
QWEN_PATCH = 8
QWEN_MERGE = 2
QWEN_MIN_PIXELS = 4 * 16 * 16
QWEN_MAX_PIXELS = 16 * 16 * 16
# The mid size sees images as the hub checkpoints do (14-px patches merged 2 x 2, 28 px per
# token), from 480 to 640 image tokens per image (small images are enlarged): about LLaVA-1.5's
# 576, so that benchmarks attend over a cache of realistic length.
QWEN_MID_MIN_PIXELS = 480 * 28 * 28
QWEN_MID_MAX_PIXELS = 640 * 28 * 28


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on :data:`CORPUS` with Qwen2's special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def _qwen_parts(arch: str, text: Dims, init_std: float, size: str, quantizable: bool):
    """(config, model class, tokenizer, processor saver) of a Qwen2-VL or Qwen2.5-VL checkpoint."""
    tokenizer = _qwen_tokenizer()
    head_dim = text.hidden // text.heads
    # M-RoPE splits the head's rotary frequencies among time, height and width as the hub
    # checkpoints do (16, 24, 24 of 64): a quarter, three eighths, three eighths.
    quarter = head_dim // 8
    mrope = [quarter, (head_dim // 2 - quarter) // 2, head_dim // 2 - quarter - (head_dim // 2 - quarter) // 2]
    text_config = dict(
        vocab_size=len(tokenizer),
        **text.config_kwargs(),
        num_key_value_heads=text.heads // 2,
        max_position_embeddings=4096,
        initializer_range=init_std,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision = _QUANT_VISION if quantizable else _TINY_VISION
    mid = size not in ("tiny", "short")
    patch = 14 if mid else QWEN_PATCH
    vision_common = dict(
        depth=vision.layers,
        num_heads=vision.heads,
        patch_size=patch,
        spatial_merge_size=QWEN_MERGE,
        temporal_patch_size=2,
        initializer_range=init_std,
    )
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    if arch == "qwen2-vl":
        vision_config = dict(embed_dim=vision.hidden, hidden_size=text.hidden, mlp_ratio=2, **vision_common)
        config = Qwen2VLConfig(text_config=text_config, vision_config=vision_config, **ids)
        model_class, processor_class = Qwen2VLForConditionalGeneration, "Qwen2VLProcessor"
    else:
        # Windows of 2 x 2 merged tokens, and full attention in the last block (as the hub's
        # fullatt_block_indexes end with the last), so both of Qwen2.5-VL's attentions run.
        vision_config = dict(
            hidden_size=vision.hidden,
            intermediate_size=vision.intermediate,
            out_hidden_size=text.hidden,
            window_size=2 * QWEN_MERGE * patch,
            fullatt_block_indexes=[vision.layers - 1],
            **vision_common,
        )
        config = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **ids)
        model_class, processor_class = Qwen2_5_VLForConditionalGeneration, "Qwen2_5_VLProcessor"
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=QWEN_MERGE,
        temporal_patch_size=2,
        min_pixels=QWEN_MIN_PIXELS if not mid else QWEN_MID_MIN_PIXELS,
        max_pixels=QWEN_MAX_PIXELS if not mid else QWEN_MID_MAX_PIXELS,
    )
    return config, model_class, tokenizer, partial(_save_qwen_processor, processor_class, image_processor, tokenizer)


def _save_qwen_processor(processor_class: str, image_processor, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Write the processor's files as the hub's Qwen2-VL checkpoints hold them: the image
    processor's preprocessor_config.json naming the processor class, chat_template.json and the
    tokenizer files. The processor object itself cannot be made without torchvision (see
    :func:`_save_onevision_processor`); vacap's loader builds it without the video part."""
    image_processor.save_pretrained(out)
    settings = json.loads((out / "preprocessor_config.json").read_text())
    settings["processor_class"] = processor_class
    (out / "preprocessor_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_CHAT_TEMPLATE}, indent=2) + "\n")
    tokenizer.save_pretrained(out)


def shrink_hub_checkpoint(
    source: str | Path,
    out_dir: str | Path,
    *,
    layers: int = 4,
    hidden: int = 32,
    heads: int = 2,
    kv_heads: int = 1,
    vision_depth: int = 2,
    vision_hidden: int = 32,
    init_std: float = 0.3,
    seed: int = 0,
) -> Path:
    """A hub checkpoint's own files (config, processor, tokenizer, chat template, weight index;
    no weights) around random weights of a shrunk model, saved under the index's key names.

    The config keeps every setting but the sizes: ``layers`` text layers of width ``hidden``,
    ``heads`` query and ``kv_heads`` key/value heads (M-RoPE's sections scaled to the smaller
    heads), ``vision_depth`` vision blocks of width ``vision_hidden`` (the last with full
    attention). Only Qwen2-VL-family checkpoints, whose hub weights use the older key layout
    (``model.layers.N``, ``visual.blocks.N``) that transformers renames on loading.
    Returns ``out_dir`` as a ``Path``.
    """
    import shutil

    import transformers
    from safetensors.torch import save_file

    source, out = Path(source), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("generation_config.json", "preprocessor_config.json", "chat_template.json", "tokenizer_config.json",
                 "vocab.json", "merges.txt", "tokenizer.json"):  # fmt: skip
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    config = json.loads((source / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    scale = (hidden // heads) / head_dim
    sections = config["rope_scaling"]["mrope_section"]
    config.update(
        hidden_size=hidden,
        num_hidden_layers=layers,
        max_window_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=2 * hidden,
        initializer_range=init_std,
    )
    config["rope_scaling"]["mrope_section"] = [round(s * scale) for s in sections]
    vision = config["vision_config"]
    vision.update(
        depth=vision_depth,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_heads=2,
        out_hidden_size=hidden,
        fullatt_block_indexes=[vision_depth - 1],
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    hf_config = transformers.AutoConfig.from_pretrained(out)
    hf_config.vision_config.initializer_range = init_std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, config["architectures"][0])(hf_config).float().eval()
    # The hub's names: the language model's weights under model., the vision tower's under visual.
    renamed = {
        key.replace("model.language_model.", "model.").replace("model.visual.", "visual."): value.contiguous()
        for key, value in model.state_dict().items()
    }
    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    kept = {key for key in index if _within(key, layers, vision_depth)}
    if set(renamed) != kept:
        raise ValueError(f"the shrunk model's weights do not match {source}'s index: {sorted(set(renamed) ^ kept)[:8]}")
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _within(key: str, layers: int, depth: int) -> bool:
    """Whether a weight of the hub's index belongs to the first ``layers`` text layers and
    ``depth`` vision blocks (or to no layer or block)."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "blocks") and parts[i + 1].isdigit():
            return int(parts[i + 1]) < (layers if part == "layers" else depth)
    return True
