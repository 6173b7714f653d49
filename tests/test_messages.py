"""What a user reads when something is off: bad --model values, no hub, --version."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
IMAGE = SAMPLES / "house.jpg"
HUB_ID = "llava-hf/llava-1.5-7b-hf"


def vacap(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vacap.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "250", **(env or {})})  # fmt: skip


def assert_each_line_once(text: str) -> None:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), f"a line is printed twice:\n{text}"


# -- --model that names no model ------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, message",
    [("", "--model is empty"), ("./my_model_dir", "no such model folder: ./my_model_dir")],
)
def test_cli_refuses_a_model_that_is_not_there(model, message):
    out = vacap("caption", IMAGE, "--model", model)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Repo id" not in out.stderr
    assert out.stdout == ""


@pytest.mark.parametrize(
    "name, message",
    [
        ("", "--model is empty"),
        ("   ", "--model is empty"),
        ("~/no-such-vacap-model", "no such model folder"),
        ("models/llava/7b", "no such model folder"),
        ("my_models/", "no such model folder"),
        ("C:\\models\\llava", "no such model folder"),
        ("not a model id", "neither a folder nor a Hugging Face id"),
    ],
)
def test_load_model_names_the_problem(name, message):
    from vacap.model import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match=message):
        load_model(name, device="cpu")


def test_folder_without_config_or_a_file_is_not_a_model(tmp_path):
    from vacap.model import ModelLoadError, load_model

    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="holds no config.json"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(ModelLoadError, match="is a file, not a model folder"):
        load_model(str(tmp_path / "weights.safetensors"), device="cpu")


# -- no hub ---------------------------------------------------------------------------------------


@pytest.fixture
def closed_port():
    """A loopback port bound but not listening: connecting to it is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def online_env(hf_home: Path, endpoint: str | None = None) -> dict:
    """The test process runs offline (conftest); these runs must try the hub, at a loopback address."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(hf_home), COLUMNS="250")
    if endpoint is not None:
        env["HF_ENDPOINT"] = endpoint
    return env


def run_clean(args, env: dict, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "vacap.cli", *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, env=env)  # fmt: skip
    return out, time.monotonic() - start


def test_unreachable_hub_fails_fast_and_says_what_works(tmp_path, closed_port):
    env = online_env(tmp_path / "hf", f"http://127.0.0.1:{closed_port}")
    out, seconds = run_clean(["caption", IMAGE, "--model", HUB_ID], env, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "hub cannot be reached" in out.stderr and "not in the local cache" in out.stderr
    assert "--model demo" in out.stderr and "HF_HUB_OFFLINE=1" in out.stderr
    assert "Retrying" not in out.stderr
    assert_each_line_once(out.stderr)
    # The hub library's retries alone sleep 23 s; startup here takes a few.
    assert seconds < 20, f"took {seconds:.1f} s"


def test_offline_mode_and_nothing_cached(tmp_path):
    env = {**online_env(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out, _ = run_clean(["caption", IMAGE, "--model", HUB_ID], env, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "HF_HUB_OFFLINE is set" in out.stderr and "not in the Hugging Face cache" in out.stderr
    assert "--model demo" in out.stderr
    assert_each_line_once(out.stderr)


def test_unreachable_hub_still_loads_a_cached_model(tmp_path, tiny_model, closed_port):
    """A model in the hub cache works with no hub, without a retry loop for every optional file."""
    repo = tmp_path / "hf" / "hub" / "models--vacap-test--tiny-llava"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model("llava-llama"), repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = online_env(tmp_path / "hf", f"http://127.0.0.1:{closed_port}")
    args = ["caption", IMAGE, "--model", "vacap-test/tiny-llava", "--max-new-tokens", "3", "--dtype", "fp32"]
    out, _ = run_clean(args, env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert '"status": "ok"' in out.stdout and "Retrying" not in out.stderr


# -- --version ------------------------------------------------------------------------------------


def test_version_prints_the_installed_version_without_torch():
    from importlib.metadata import version

    out = vacap("--version", timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"vacap {version('vacap')}\n"
    probe = (
        "import sys\nfrom vacap.cli import app\ntry:\n    app(['--version'])\nexcept SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\nassert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


# -- tables in 80 columns -------------------------------------------------------------------------


def test_compare_table_shows_sweep_labels_whole_in_80_columns():
    import io

    from rich.console import Console

    from vacap.compare import settings_grid, summary_table

    grid = settings_grid(["greedy", "vasparse", "vcd"], {"sparsity": [0.35, 0.7], "alpha": [0.15, 1.0]}, ablation=True)
    records = [
        {"setting": label, "path": "a.png", "status": "ok", "caption": "a red heart.", "tokens": 5, "seconds": 0.5,
         "diagnostics": {"image_attention": 0.4}}
        for label in grid
    ]  # fmt: skip
    console = Console(file=io.StringIO(), width=80)
    console.print(summary_table(records, list(grid)))
    lines = console.file.getvalue().splitlines()
    assert max(map(len, lines)) <= 80
    rows = [line for line in lines if line.startswith(("greedy", "vasparse", "vcd"))]
    assert [row.split("  ")[0] for row in rows] == list(grid)
    assert "…" not in console.file.getvalue()


def test_a_reader_that_goes_away_ends_the_run_quietly_as_unix_tools_do():
    """`vacap caption ... | head -1`: once head has its line and leaves, the run ends with the
    exit status SIGPIPE gives a Unix tool (141) and says nothing."""
    samples = Path(__file__).resolve().parent.parent / "sample_images"
    command = f"set -o pipefail; {shlex.quote(sys.executable)} -m vacap.cli caption {shlex.quote(str(samples))} " \
              "--model demo --max-new-tokens 8 | head -1"  # fmt: skip
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert json.loads(out.stdout)["status"] == "ok"
    assert out.returncode == 141
    assert "error" not in out.stderr and "Broken pipe" not in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_transformers_loading_bar_stays_out_of_the_run_unless_verbose():
    samples = Path(__file__).resolve().parent.parent / "sample_images"
    command = [sys.executable, "-m", "vacap.cli", "caption", str(samples / "scene_2.png"), "--model", "demo"]
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and "captioning" in quiet.stderr and "Loading weights" not in quiet.stderr
    verbose = subprocess.run([*command, "-v"], capture_output=True, text=True, timeout=300)
    assert verbose.returncode == 0 and "Loading weights" in verbose.stderr


@pytest.mark.parametrize("command", [[], ["caption"], ["compare"], ["export"], ["eval"], ["eval", "shapes"]])
def test_h_is_help_as_well(command):
    base = [sys.executable, "-m", "vacap.cli", *command]
    env = {**os.environ, "COLUMNS": "80"}
    short = subprocess.run([*base, "-h"], capture_output=True, text=True, timeout=120, env=env)
    long = subprocess.run([*base, "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert short.returncode == long.returncode == 0
    assert short.stdout == long.stdout and "Usage:" in short.stdout
