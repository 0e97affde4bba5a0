"""Image grids: tiles captioned with their prompt and reward under each image; every image of
an iteration saved on request."""

import json

import numpy as np
import torch
from PIL import Image

from rebel.diffusion import DiffusionConfig, DiffusionTrainer, brightness, image_grid
from rebel.diffusion.rewards import to_uint8
from rebel.diffusion.trainer import grid_captions

COLOURS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])


def solid(n: int, side: int = 8) -> torch.Tensor:
    """``n`` images of one colour each, ``[n, 3, side, side]``."""
    return COLOURS[:n].view(n, 3, 1, 1).expand(n, 3, side, side).clone()


def dark(region: np.ndarray) -> int:
    """Pixels of ``region`` darker than light grey (drawn text)."""
    return int((region.min(axis=-1) < 160).sum())


def test_tiles_and_captions_are_where_they_should_be():
    captions = ["a red circle\nreward 0.5", "a green square\nreward 1", "", "yellow"]
    grid = np.asarray(image_grid(solid(4), captions, columns=2, tile=96))
    line = 11 + 3
    caption = 2 * line + 4  # the longest caption has two lines
    assert grid.shape == (2 * (96 + caption), 2 * 96, 3)
    for k in range(4):
        x, y = (k % 2) * 96, (k // 2) * (96 + caption)
        assert (grid[y : y + 96, x : x + 96] == (COLOURS[k] * 255).numpy().astype(np.uint8)).all()  # the tile, scaled 12x
        below = grid[y + 96 : y + 96 + caption, x : x + 96]
        first, second = below[: line + 2], below[line + 2 :]
        assert (dark(first) > 5, dark(second) > 5) == [(True, True), (True, True), (False, False), (True, False)][k]


def test_long_prompts_wrap_under_their_tile_and_stop_at_max_lines():
    prompt = "a watercolour painting of a fox reading a newspaper in the rain"
    grid = image_grid(solid(2), [prompt, "short"], columns=2, tile=48)
    lines = (grid.height - 48 - 4) // 14
    assert 3 <= lines <= 4  # wrapped to the tile's width, at most max_lines=4
    capped = image_grid(solid(2), [prompt, "short"], columns=2, tile=48, max_lines=2)
    assert capped.height == 48 + 2 * 14 + 4
    with_reward = image_grid(solid(1), [prompt + "\nreward 0.5"], columns=1, tile=48, max_lines=2)
    assert with_reward.height == 48 + 2 * 14 + 4
    reward_line = np.asarray(with_reward)[48 + 2 + 14 :]
    alone = np.asarray(image_grid(solid(1), ["reward 0.5"], columns=1, tile=48))[48 + 2 :]
    assert (reward_line[:14] == alone[:14]).all()  # the prompt is cut short, its reward line stays whole
    pixels = np.asarray(grid)
    assert dark(pixels[48:, 48:][:, :, :]) < dark(pixels[48:, :48])  # the second tile's caption is shorter
    # nothing spills over into the neighbouring tile's caption: a blank caption stays white
    blank = np.asarray(image_grid(solid(2), [prompt + " " + prompt, ""], columns=2, tile=48))
    assert dark(blank[48:, 48:]) == 0 and dark(blank[48:, :48]) > 50


def test_the_old_call_still_works():
    grid = image_grid(solid(3), ["0.1", "0.2", "0.3"], 3)  # (images, captions, columns), tile 96 by default
    assert grid.size == (3 * 96, 96 + 14 + 4)
    assert grid_captions(["a red circle"], [0.12345]) == ["a red circle\nreward 0.123"]


def test_save_images_writes_every_image_of_an_iteration(tiny_pipe, tmp_path):
    config = DiffusionConfig(
        output_dir=str(tmp_path / "run"), iterations=1, prompts_per_iteration=3, num_generations=2, num_inference_steps=2,
        lora_rank=2, log_images=4, save_images=True, progress=False, plot=False, report_to="none",
    )  # fmt: skip
    trainer = DiffusionTrainer(tiny_pipe, brightness, ["a red circle", "a blue square"], config)
    trainer.train()
    run = tmp_path / "run"
    files = sorted((run / "images" / "iter_0001").iterdir())
    assert [f.name for f in files] == [f"{k:03d}.png" for k in range(6)]  # 3 prompts x 2 images, the grid holds 4
    samples = trainer.trainer.sampler.last_samples
    expected = to_uint8(samples["images"])
    assert all((np.asarray(Image.open(f)) == expected[k]).all() for k, f in enumerate(files))
    rows = [json.loads(line) for line in (run / "images.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == [f"images/iter_0001/{k:03d}.png" for k in range(6)]
    assert [r.get("file") for r in rows] == ["images/iter_0001.png"] * 4 + [None, None]
    assert [r["prompt"] for r in rows] == samples["prompts"] and [r["reward"] for r in rows] == samples["rewards"]
    grid = Image.open(run / "images" / "iter_0001.png")
    assert grid.width == 2 * 96 and grid.height == 2 * (96 + 2 * 14 + 4)  # two captioned rows of two tiles
