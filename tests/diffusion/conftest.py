"""Fixtures of the diffusion adapter's tests: tiny pipelines built from configs, no network."""

import importlib.util

import pytest

if any(importlib.util.find_spec(name) is None for name in ("diffusers", "transformers", "peft")):
    collect_ignore_glob = ["test_*.py"]  # the diffusion extra is not installed


@pytest.fixture(scope="session")
def tiny_pipe(tmp_path_factory):
    """Folder of a random tiny StableDiffusionPipeline (8x8 pictures, 4x4x4 latents), saved with save_pretrained."""
    from rebel_envs.diffusion_tasks import tiny_pipeline

    path = tmp_path_factory.mktemp("tiny_pipe")
    tiny_pipeline(image_size=8, width=8, seed=0).save_pretrained(str(path))
    return str(path)
