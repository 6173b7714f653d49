"""Qwen2-VL and Qwen2.5-VL: dynamic resolution, M-RoPE and their hub layout in vacap's own loop."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from helpers import IMAGES, MAX_NEW, PROMPT, hf_greedy, hf_model, noise_image
from test_vista import hf_layer_outputs
from PIL import Image

from vacap import Captioner
from vacap.config import DecodeConfig
from vacap.decode import Steering, generate, generate_stream
from vacap.diagnostics import decode_grid
from vacap.methods import steering_for
from vacap.model import QWEN_ARCHITECTURES as QWEN_ARCHITECTURES_HF
from vacap.model import ModelLoadError, Preparer, load_model
from vacap.risk_signals import RiskSettings
from vacap.tiny_models import QWEN_ARCHITECTURES, shrink_hub_checkpoint
from vacap.vista import visual_vector

# The hub's own files of Qwen/Qwen2.5-VL-7B-Instruct (no weights; see their SOURCES.md), in the
# shared folder beside the checkout (a worktree's checkout: beside the main one).
HUB_FILES = next(
    (
        folder / "shared" / "real" / "Qwen2.5-VL-7B-Instruct"
        for folder in (Path(__file__).resolve().parents[2], Path("/work"))
        if (folder / "shared" / "real" / "Qwen2.5-VL-7B-Instruct").is_dir()
    ),
    Path("../shared/real/Qwen2.5-VL-7B-Instruct"),
)


@pytest.fixture(scope="module", params=QWEN_ARCHITECTURES)
def qwen(request, tiny_model):
    path = tiny_model(request.param)
    return path, load_model(str(path), dtype="fp32", device="cpu")


def ours(model, images, prompt=PROMPT, max_new=MAX_NEW) -> list[list[int]]:
    return [g.tokens for g in generate(model, model.prepare(images, prompt), Steering(), max_new)]


def test_greedy_matches_hf_generate_single_and_batched(qwen):
    path, model = qwen
    single = model.prepare(IMAGES[:1], PROMPT)
    assert ours(model, IMAGES[:1]) == hf_greedy(path, single)

    # Images of different sizes and prompts of different lengths: different grids (one not
    # square), so different image-token counts and M-RoPE deltas, in a left-padded batch.
    prompts = [PROMPT, "Describe the scene briefly.", "What is in the picture?", PROMPT + " " + PROMPT]
    batch = model.prepare(IMAGES, prompts)
    grids = batch["image_grid_thw"][:, 1:].tolist()
    assert len({tuple(g) for g in grids}) > 2 and any(h != w for h, w in grids)
    assert not batch["attention_mask"].bool().all()
    batched = [g.tokens for g in generate(model, batch, Steering(), MAX_NEW)]
    assert batched == hf_greedy(path, batch)
    assert len({t for row in batched for t in row}) > 5, "parity on varied tokens, not on an instant EOS"
    assert batched == [ours(model, [image], prompt)[0] for image, prompt in zip(IMAGES, prompts)]


def test_image_tokens_follow_the_image_grid(qwen):
    _, model = qwen
    inputs = model.prepare(IMAGES, PROMPT)
    counts = (inputs["input_ids"] == model.image_token_id).sum(-1).tolist()
    grids = model.image_grids(inputs)
    assert counts == [h * w for h, w in grids]
    assert (3, 2) in grids  # 30 x 44 pixels: 3 rows of 2 merged tokens


def test_positions_are_the_models_own_rope_index(qwen):
    path, model = qwen
    inputs = model.prepare(IMAGES, PROMPT)
    positions, deltas = model.positions(inputs)
    assert positions.shape == (3, *inputs["input_ids"].shape)
    # An image's tokens share one time position; their rows and columns differ.
    image = inputs["input_ids"][1] == model.image_token_id
    assert positions[0, 1, image].unique().numel() == 1 and positions[1, 1, image].unique().numel() == 3
    # The next token's position (count of real tokens + delta) is one past the prompt's largest.
    n = inputs["attention_mask"].sum(-1, keepdim=True)
    assert torch.equal(n + deltas, positions.amax(dim=(0, 2))[:, None] + 1)


def test_unsupported_architectures_are_refused_with_the_supported_ones_named(tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["Qwen2AudioForConditionalGeneration"], "model_type": "qwen2_audio"})
    )
    with pytest.raises(ModelLoadError) as error:
        load_model(str(folder), device="cpu")
    message = str(error.value)
    assert "Qwen2AudioForConditionalGeneration" in message
    for name in ("LlavaForConditionalGeneration", *QWEN_ARCHITECTURES_HF):
        assert name in message


@pytest.fixture(scope="module")
def hub_model(tmp_path_factory):
    """Qwen2.5-VL-7B-Instruct's own config, processor, tokenizer and chat template around shrunk
    random weights saved under the names of its weight index."""
    if not (HUB_FILES / "config.json").is_file():
        pytest.skip(f"the hub's Qwen2.5-VL-7B-Instruct files are not at {HUB_FILES}")
    return shrink_hub_checkpoint(HUB_FILES, tmp_path_factory.mktemp("qwen2.5-vl-7b"))


def test_hub_checkpoint_captions_through_the_cli_as_hf_generate_does(hub_model, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    # 84 x 56 and 56 x 112 pixels: grids of 3 x 2 and 4 x 2 merged tokens (28 px each).
    for name, (width, height) in {"wide.png": (84, 56), "tall.png": (56, 112)}.items():
        noise_image(width, height, len(name)).save(folder / name)
    output = tmp_path / "captions.jsonl"
    command = [sys.executable, "-m", "vacap.cli", "caption", str(folder), "--model", str(hub_model), "--dtype", "fp32",
               "--device", "cpu", "--method", "greedy", "--max-new-tokens", "10", "--prompt", PROMPT,
               "--batch-size", "2", "-o", str(output)]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    records = {Path(r["path"]).name: r for r in map(json.loads, output.read_text(encoding="utf-8").splitlines())}

    # The reference: transformers alone, the checkpoint's processor and chat template applied by
    # its own apply_chat_template. Greedy without the checkpoint's sampling defaults (its
    # generation_config asks for sampling with a repetition penalty).
    processor = Preparer.load(str(hub_model)).processor
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(hub_model, dtype=torch.float32).eval()
    eos = hf.generation_config.eos_token_id
    for name, record in records.items():
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
        inputs = processor(images=[Image.open(folder / name).convert("RGB")], text=[text], return_tensors="pt")
        generated = hf.generate(**inputs, do_sample=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=10)
        tokens = generated[0, inputs["input_ids"].shape[1] :].tolist()
        tokens = tokens[: next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]
        assert record["status"] == "ok" and record["tokens"] == len(tokens)
        assert record["caption"] == processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        assert record["image_tokens"] == int(inputs["image_grid_thw"].prod()) // 4
    assert records["wide.png"]["image_tokens"] == 6 and records["tall.png"]["image_tokens"] == 8


def caption(*args, timeout=600, command=("caption",)):
    return subprocess.run([sys.executable, "-m", "vacap.cli", *command, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_pixel_flags_set_the_image_token_count_and_the_resume_key(tiny_model, tmp_path):
    path = tiny_model("qwen2-vl")
    image = tmp_path / "photo.png"
    noise_image(64, 60, 4).save(image)
    counts = {}
    for flags in ([], ["--max-pixels", "1024"], ["--min-pixels", "2048"]):
        output = tmp_path / f"{len(counts)}.jsonl"
        out = caption(image, "--model", path, "--dtype", "fp32", "--max-new-tokens", "4", *flags, "-o", output)
        assert out.returncode == 0, out.stderr
        (record,) = map(json.loads, output.read_text(encoding="utf-8").splitlines())
        counts[" ".join(flags)] = record["image_tokens"]
        for flag, value in zip(flags[::2], flags[1::2]):
            assert record["params"][flag[2:].replace("-", "_")] == int(value)
    # 64 x 60 pixels: a 4 x 4 grid of 16-px tokens; at most 1024 pixels: 32 x 16 (sides rounded
    # down to whole tokens), 2 tokens. The tiny model's own range (1024 to 4096 pixels) holds the
    # image, so a larger minimum changes nothing.
    assert counts == {"": 16, "--max-pixels 1024": 2, "--min-pixels 2048": 16}
    # compare takes the same limits, for every setting it runs.
    output = tmp_path / "compare.jsonl"
    out = caption(image, "--model", path, "--dtype", "fp32", "--max-new-tokens", "4", "--methods", "greedy,vcd",
                  "--max-pixels", "1024", "-o", output, command=("compare",))  # fmt: skip
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [(r["setting"], r["image_tokens"]) for r in records] == [("greedy", 2), ("vcd", 2)]


def test_pixel_flags_are_refused_where_they_cannot_act(tiny_model, tmp_path):
    image = tmp_path / "photo.png"
    noise_image(32, 32, 1).save(image)
    out = caption(image, "--model", "demo", "--max-pixels", "1024")
    assert out.returncode == 2 and "Qwen2-VL" in out.stderr and "fixed size" in out.stderr
    out = caption(image, "--model", tiny_model("qwen2-vl"), "--min-pixels", "4096", "--max-pixels", "1024")
    assert out.returncode == 2 and "--min-pixels 4096 is above --max-pixels 1024" in " ".join(out.stderr.split())
    out = caption(image, "--model", tiny_model("qwen2-vl"), "--min-pixels", "8192")
    assert out.returncode == 2 and "--min-pixels 8192 is above --max-pixels 4096" in " ".join(out.stderr.split())
    out = caption(image, "--model", "demo", "--max-pixels", "1024", "--methods", "greedy", command=("compare",))
    assert out.returncode == 2 and "Qwen2-VL" in out.stderr and "fixed size" in out.stderr
    out = caption(image, "--instances", tmp_path / "instances.json", "--min-pixels", "4096", "--max-pixels", "1024",
                  command=("eval", "pope"))  # fmt: skip
    assert out.returncode == 2 and "--min-pixels 4096 is above --max-pixels 1024" in " ".join(out.stderr.split())


def test_doctor_names_the_qwen_family(tmp_path):
    from test_doctor import doctor

    home = tmp_path / "home"
    report = doctor(home=home, cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    qwen = next(line for line in report.stdout.splitlines() if line.strip().startswith("Qwen2-VL:"))
    assert "Qwen2VLForConditionalGeneration" in qwen and "Qwen2_5_VLForConditionalGeneration" in qwen
    assert "--max-pixels 1003520" in qwen
    models = json.loads(doctor("--json", home=home, cwd=tmp_path).stdout)["models"]
    assert models["qwen"] == list(QWEN_ARCHITECTURES_HF) and models["qwen_max_pixels"] == 1280 * 28 * 28


# The methods on M-RoPE, each where it acts: VASparse's defaults (selection, sink, contrast),
# its KV budget with a contrast branch of its own layers, VCD's noised copies, FastV's pruning.
METHODS = {
    "vasparse": dict(),
    "vasparse-budget-contrast": dict(kv_budget=0.5, contrast_layers=1),
    "vcd": dict(method="vcd"),
    "fastv": dict(method="fastv"),
    # Issue 26's methods; VAR with sink dimensions given, as a random model has none of its own.
    "vista": dict(method="vista"),
    "var": dict(method="var", var_dims=tuple(range(64)), var_tau=2.5, var_start_layer=1),
    "pai": dict(method="pai"),
}
OFF = dict(method="vasparse", sparsity=0.0, alpha=0.0, sink_beta=0.0, kv_budget=1.0)
# Each other method with its mechanisms off.
OTHERS_OFF = [
    dict(method="vista", vista_lambda=0.0, vista_gamma=0.0),
    dict(method="var", var_p=1.0),
    dict(method="pai", pai_alpha=0.0, alpha=0.0),
]
# Images on grids of varied shapes whose captions end at different lengths within STREAM_NEW
# tokens (from 4 to 32 on the tiny Qwen2.5-VL), so that rows free early.
PICTURES = [noise_image(20 + 7 * i, 30 + 3 * i, 10 + i) for i in range(10)]
STREAM_NEW = 32


def decoded(model, images, risk=False, steps="dynamic", max_new=MAX_NEW, **settings):
    config = DecodeConfig(max_new_tokens=max_new, risk=risk, **settings)
    outputs = generate(model, model.prepare(images, PROMPT), steering_for(model, config), max_new, steps=steps,
                       risk=RiskSettings.of(config))  # fmt: skip
    return [(g.tokens, g.signals) for g in outputs]


def test_mechanisms_off_is_greedy_is_hf_generate(qwen):
    path, model = qwen
    off = [tokens for tokens, _ in decoded(model, IMAGES, **OFF)]
    assert off == [tokens for tokens, _ in decoded(model, IMAGES, method="greedy")]
    assert off == hf_greedy(path, model.prepare(IMAGES, PROMPT))
    for settings in OTHERS_OFF:
        assert [tokens for tokens, _ in decoded(model, IMAGES, **settings)] == off, settings


@torch.no_grad()
def test_the_extra_prompts_of_vista_and_pai_take_their_own_positions(qwen):
    """VISTA's steering vector (the prompt with its image at M-RoPE's positions, minus the prompt
    without it) and PAI's image-free rows (1-D positions over their own tokens) equal Hugging
    Face's forward of each prompt alone, rows of a left-padded batch included."""
    path, model = qwen
    hf = hf_model(path, attention="sdpa")
    inputs = model.prepare(IMAGES, PROMPT)
    valid = inputs["attention_mask"].bool()
    embeds, image_mask = model.embed(inputs)
    vector = visual_vector(model, embeds, image_mask, valid, model.positions(inputs, valid)[0])  # (B, L, hidden)
    steering = steering_for(model, DecodeConfig(method="pai", pai_alpha=0.0))
    seen, next_token = [], steering.next_token
    steering.next_token = lambda logits, *rest: seen.append(logits.clone()) or next_token(logits, *rest)
    generate(model, inputs, steering, 1)
    image_free = seen[0][len(IMAGES) :]
    for b, image in enumerate(IMAGES):
        alone = model.prepare([image], PROMPT)
        ids = alone["input_ids"][0]
        text = ids[ids != model.image_token_id][None]
        with_image = hf_layer_outputs(hf, lambda: hf(**alone))
        without = hf_layer_outputs(hf, lambda: hf.model.language_model(input_ids=text))
        expected = torch.stack([p[0, -1] - n[0, -1] for p, n in zip(with_image, without)]).float()
        torch.testing.assert_close(vector[b], expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(image_free[b], hf(input_ids=text).logits[0, -1].float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_methods_act_and_are_deterministic_and_batch_independent(qwen, name):
    _, model = qwen
    settings = METHODS[name]
    batched = decoded(model, IMAGES, risk=True, **settings)
    assert [tokens for tokens, _ in batched] != [tokens for tokens, _ in decoded(model, IMAGES, method="greedy")]
    assert decoded(model, IMAGES, risk=True, **settings) == batched
    alone = [decoded(model, [image], risk=True, **settings)[0] for image in IMAGES]
    assert [tokens for tokens, _ in alone] == [tokens for tokens, _ in batched]
    for (tokens, signals), (_, own) in zip(batched, alone):
        # The risk signals of a row's tokens, up to the rounding of a padded batch's kernels.
        for name, values in signals.items():
            assert len(values) == len(tokens) and values == pytest.approx(own[name], abs=1e-4), name


@pytest.mark.parametrize("name", ["greedy", "vasparse", "vcd", "fastv", "vista", "var", "pai"])
def test_continuous_batching_gives_each_image_what_it_gets_alone(qwen, name):
    _, model = qwen
    settings = {"method": "greedy"} if name == "greedy" else METHODS[name]
    config = DecodeConfig(max_new_tokens=STREAM_NEW, **settings)
    alone = [decoded(model, [image], max_new=STREAM_NEW, **settings)[0][0] for image in PICTURES]
    assert len({len(tokens) for tokens in alone}) > 1, "captions of varied lengths, or no row frees early"
    prepared = ((i, model.prepare([image], PROMPT)) for i, image in enumerate(PICTURES))
    out = dict(generate_stream(model, prepared, lambda: steering_for(model, config), 3, STREAM_NEW))
    assert [out[i].tokens for i in range(len(PICTURES))] == alone


@pytest.mark.parametrize("steps", ["static", "compiled"])
def test_static_and_compiled_steps_give_hf_tokens(qwen, steps):
    path, model = qwen
    tokens = [t for t, _ in decoded(model, IMAGES, steps=steps, method="greedy")]
    assert tokens == hf_greedy(path, model.prepare(IMAGES, PROMPT))
    fastv = decoded(model, IMAGES, steps=steps, method="fastv")
    assert fastv == decoded(model, IMAGES, method="fastv")


def test_diagnostics_follow_a_non_square_grid_and_match_hf_attentions(qwen, tmp_path):
    path, model = qwen
    image_path = tmp_path / "tall.png"
    noise_image(30, 44, 2).save(image_path)  # 3 rows of 2 merged tokens
    captioner = Captioner(str(path), dtype="fp32", method="greedy", max_new_tokens=6, diagnostics="tokens")
    record = captioner.caption([image_path])[0]
    assert record["diagnostics"]["grid"] == [3, 2] and record["image_tokens"] == 6
    details = record["token_diagnostics"]

    # One eager forward of transformers over prompt + caption: its own M-RoPE positions.
    inputs = captioner.model.preparer.prepare([Image.open(image_path).convert("RGB")], captioner.config.prompt)
    generated = hf_greedy(path, inputs, 6)[0][: len(details)]
    extra = torch.tensor([generated[:-1]])
    ids = torch.cat([inputs["input_ids"], extra], 1)
    hf = hf_model(path)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                 image_grid_thw=inputs["image_grid_thw"], output_attentions=True,
                 mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1))  # fmt: skip
    T = inputs["input_ids"].shape[1]
    image = ids[0] == captioner.model.image_token_id
    start = captioner.config.start_layer
    for i, entry in enumerate(details):
        rows = torch.stack([a[0, :, T - 1 + i] for a in out.attentions[start:]])  # (layers, H, keys)
        assert entry["image_attention"] == pytest.approx(float(rows[..., image].sum(-1).mean()), abs=2e-4)
        expected = rows[..., image].mean((0, 1)).view(3, 2)  # the image's tokens, row-major
        grid = decode_grid(entry["patch_attention"], record["diagnostics"]["grid"])
        assert torch.allclose(grid, expected / expected.max(), atol=1 / 255)
        best = int(expected.flatten().argmax())
        assert entry["top_patches"][0] == [best // 2, best % 2]

    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps(record) + "\n", encoding="utf-8")
    heat = tmp_path / "heat.png"
    command = [sys.executable, "-m", "vacap.cli", "show", str(records), "--image", "tall.png", "--heatmap", str(heat),
               "--token", "0"]  # fmt: skip
    shown = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    with Image.open(heat) as picture, Image.open(image_path) as original:
        assert picture.size == (30, 44)
        # The most attended patch's part of the picture (15 x 14.7 px of it) turns red.
        row, column = details[0]["top_patches"][0]
        box = (column * 15 + 4, int(row * 44 / 3) + 4, column * 15 + 11, int((row + 1) * 44 / 3) - 4)
        assert picture.convert("RGB").crop(box).tobytes() != original.convert("RGB").crop(box).tobytes()


def test_a_model_that_needs_its_own_code_is_refused_with_the_supported_ones_named(tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["QwenVLForCausalLM"], "model_type": "qwen_vl_remote",
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModel": "modeling_qwen.QWenLMHeadModel"},
    }))  # fmt: skip
    (folder / "configuration_qwen.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelLoadError) as error:
        load_model(str(folder), device="cpu")
    message = str(error.value)
    assert "runs no model code from a checkpoint" in message and "Qwen2_5_VLForConditionalGeneration" in message


@pytest.mark.parametrize("quant, layer_class", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_language_model_and_full_precision_vision_tower(tiny_model, quant, layer_class):
    pytest.importorskip("bitsandbytes")
    model = load_model(str(tiny_model("qwen2.5-vl", quantizable=True)), quant=quant, dtype="fp32", device="cpu")
    assert type(model.layers[0].self_attn.q_proj).__name__ == layer_class
    assert model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases stay
    assert type(model.lm_head).__name__ == "Linear"
    vision = [m for m in model.hf.model.visual.modules() if "Linear" in type(m).__name__]
    assert vision and all(type(m).__name__ == "Linear" for m in vision)
    out = generate(model, model.prepare(IMAGES[:2], PROMPT), steering_for(model, DecodeConfig(max_new_tokens=6)), 6)
    assert all(1 <= len(g.tokens) <= 6 for g in out)


def test_ray_run_gives_the_local_records_with_the_pixel_limits(tiny_model, tmp_path):
    pytest.importorskip("ray")
    from test_ray import RAY_TMP, comparable, environment, ray_processes, read_records

    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(PICTURES[:4]):
        image.save(folder / f"picture_{i}.png")
    flags = ["--model", tiny_model("qwen2.5-vl"), "--dtype", "fp32", "--max-new-tokens", "8", "--max-pixels", "1024"]
    runs = {}
    for name, extra in {"local": [], "ray": ["--ray", "--workers", "1"]}.items():
        output = tmp_path / f"{name}.jsonl"
        command = [sys.executable, "-m", "vacap.cli", "caption", folder, *flags, *extra, "-o", output]
        out = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600, env=environment())
        assert out.returncode == 0, out.stderr
        runs[name] = read_records(output)
    assert comparable(runs["ray"]) == comparable(runs["local"])
    # Ray's reading tasks prepared the images under the same limit as the local run.
    tokens = {name: {Path(r["path"]).name: r["image_tokens"] for r in records} for name, records in runs.items()}
    assert tokens["ray"] == tokens["local"]
    assert tokens["ray"]["picture_3.png"] == 2  # 41 x 39 pixels: 6 tokens (3 x 2) without the limit
    assert all(r["params"]["max_pixels"] == 1024 for r in runs["ray"])
    # The run's local Ray instance ends with it; its files go once its processes have.
    deadline = time.monotonic() + 180
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    shutil.rmtree(RAY_TMP, ignore_errors=True)
