"""rebel.console: the libraries' messages a user cannot act on are hidden, narrowly; the
embedded tasks' warm-ups show their progress only when asked."""

import importlib.util
import re
import subprocess
import sys

import pytest

# Each library message in a fresh process (they print once per process), beside messages
# of the same loggers and a warning of our own that must still show.
SCRIPT = """
import contextlib, logging, sys, warnings
if sys.argv[1] == "rebel":
    from rebel.console import quiet_saving   # import rebel hides the messages
else:
    quiet_saving = contextlib.nullcontext
import transformers
transformers.CLIPImageProcessor          # without torchvision: falls back to the PIL processor, with a notice
logging.getLogger("transformers.utils.import_utils").warning("transformers: a message to keep")
if sys.argv[3] == "deepspeed":
    from deepspeed.accelerator import get_accelerator
    get_accelerator()                    # on a machine without a GPU: "Setting accelerator to CPU"
    logging.getLogger("DeepSpeed").warning("DeepSpeed: a message to keep")
config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8, bos_token_id=0, eos_token_id=0)
with quiet_saving():
    transformers.GPT2LMHeadModel(config).save_pretrained(sys.argv[2])
warnings.warn("rebel: a warning of our own")
"""
NOISE = ("requires torchvision (not installed)", "Setting accelerator to CPU", "Writing model shards")
KEPT = ("transformers: a message to keep", "rebel: a warning of our own")


def _output(mode: str, tmp_path) -> str:
    """stderr and stdout together (DeepSpeed's logger prints to stdout)."""
    deepspeed = "deepspeed" if importlib.util.find_spec("deepspeed") else "none"
    args = [sys.executable, "-c", SCRIPT, mode, str(tmp_path / mode), deepspeed]
    return subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120, check=True).stdout


def test_library_noise_is_hidden_and_the_rest_shows(tmp_path):
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: transformers has nothing to fall back from")
    expected_noise = NOISE if importlib.util.find_spec("deepspeed") else (NOISE[0], NOISE[2])
    kept = (*KEPT, "DeepSpeed: a message to keep") if importlib.util.find_spec("deepspeed") else KEPT
    plain = _output("plain", tmp_path)
    assert [n for n in expected_noise if n not in plain] == []  # without rebel, each message is there
    quiet = _output("rebel", tmp_path)
    assert [n for n in NOISE if n in quiet] == []
    assert [k for k in kept if k not in quiet] == []
    assert (tmp_path / "rebel" / "model.safetensors").is_file()


def test_quiet_saving_restores_the_progress_bars():
    from transformers.utils import logging as hf_logging

    from rebel.console import quiet_saving

    assert hf_logging.is_progress_bar_enabled()
    with quiet_saving():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a user who turned them off keeps them off
    try:
        with quiet_saving():
            pass
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


@pytest.mark.parametrize("progress", [True, False])
def test_diffusion_warm_up_shows_its_stages(progress, capsys):
    from rebel_envs.diffusion_tasks import ShapesTaskConfig, make_shapes_pipeline

    task = ShapesTaskConfig(image_size=8, min_radius=1, max_radius=3, width=8, vae_steps=2, unet_steps=3, pretrain_batch=2)
    make_shapes_pipeline(task, progress=progress)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    if not progress:
        assert out == "" and "warm-up" not in err
        return
    assert [line.split(" steps in ")[0] for line in lines] == ["warm-up 1/2: autoencoder: 2", "warm-up 2/2: denoiser: 3"]
    assert all(line.endswith(" s") for line in lines)
    assert re.search(r"warm-up 1/2: autoencoder: +0%\|.*\| 0/2", err) and re.search(
        r"warm-up 2/2: denoiser: +0%\|.*\| 0/3", err
    )  # the bars


def test_text_warm_up_shows_its_progress(capsys):
    from rebel_envs.text_tasks import SortingTaskConfig, make_sorting_model

    make_sorting_model(SortingTaskConfig(pretrain_steps=2), progress=True)
    out, err = capsys.readouterr()
    assert out.startswith("warm-up: supervised sorting: 2 steps in ") and re.search(r"warm-up: supervised sorting: +0%\|.*\| 0/2", err)


@pytest.mark.slow
def test_a_short_diffusion_run_shows_no_library_noise(tmp_path):
    """The embedded diffusion run end to end in a fresh process (about 1 min on a busy CPU):
    the warm-up's bars and lines, none of the hidden messages, our own warning on resume."""
    quick = "--image-size 8 --min-radius 1 --max-radius 3 --width 8 --vae-steps 3 --unet-steps 3 --pretrain-batch 4"
    quick += " --iterations 1 --prompts-per-iteration 2 --num-generations 2 --num-inference-steps 2 --report-to none"
    run = tmp_path / "run"

    def train(*args: str) -> str:
        command = [sys.executable, "-m", "rebel.cli", "train", "diffusion", *args]
        return subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, check=True).stdout

    first = train(*quick.split(), "--output-dir", str(run))
    assert "warm-up 1/2: autoencoder: 3 steps in " in first and "warm-up 2/2: denoiser: 3 steps in " in first
    assert [n for n in NOISE if n in first] == []
    with (run / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"iteration": 2, "rew')  # a torn last line: resume drops it with a warning of ours
    resumed = train("--resume", str(run), "--iterations", "2")
    assert "dropping a torn last line" in resumed and [n for n in NOISE if n in resumed] == []
