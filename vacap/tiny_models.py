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
    Qwen2Config,
    SiglipVisionConfig,
)

ARCHITECTURES = ("llava-llama", "llava-mistral", "llava-qwen2", "llava-next", "llava-onevision")
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

    tokenizer = _build_tokenizer()
    text_config = _text_config(arch, text_dims, init_std, tokenizer)
    # Mid and long models see 192 px: 24 x 24 patches, the 576 image tokens of LLaVA-1.5 per
    # tile, so that benchmarks attend over a cache of realistic length.
    side = IMAGE_SIZE if size in ("tiny", "short") else MID_IMAGE_SIZE
    config, model_class, save_processor = _multimodal_parts(arch, text_config, vision_dims, tokenizer, side)
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
