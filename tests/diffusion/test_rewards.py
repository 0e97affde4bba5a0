"""Image rewards: JPEG sizes, the aesthetic predictor's code path and errors, reward checks."""

import numpy as np
import pytest
import torch

from rebel.diffusion import (
    AestheticHead,
    AestheticScorer,
    RewardFunctionError,
    call_reward,
    jpeg_compressibility,
    jpeg_incompressibility,
    jpeg_size_kb,
)


def test_jpeg_rewards_prefer_flat_or_busy_images():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noisy = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noisy])
    small, large = jpeg_size_kb(images)
    assert 0 < small < large
    assert jpeg_compressibility(images, ["a", "b"]) == [-small, -large]
    assert jpeg_incompressibility(images, ["a", "b"]) == [small, large]


def test_call_reward_names_the_function_in_errors():
    images = torch.rand(2, 3, 8, 8)

    def broken(images, prompts):
        raise RuntimeError("model not loaded")

    def short(images, prompts):
        return [1.0]

    def nan(images, prompts):
        return [1.0, float("nan")]

    with pytest.raises(RewardFunctionError, match="'broken' raised RuntimeError: model not loaded"):
        call_reward(broken, images, ["a", "b"])
    with pytest.raises(RewardFunctionError, match="'short' returned 1 values for 2 images"):
        call_reward(short, images, ["a", "b"])
    with pytest.raises(RewardFunctionError, match="'nan' returned non-finite values \\(nan or inf\\) for images \\[1\\]"):
        call_reward(nan, images, ["a", "b"])
    out = call_reward(lambda images, prompts, scale: [scale, 2 * scale], images, ["a", "b"], scale=3.0)
    assert out.dtype == torch.float64 and out.tolist() == [3.0, 6.0]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([True, False], r"returned a bool \(True\)"),
        (["0.5", "1"], r"returned a str \('0.5'\)"),
        (torch.tensor([True, False]), r"returned a Tensor of torch.bool"),
        (np.array([True, False]), r"returned a ndarray of bool"),
        (np.array(["0.5", "1"]), r"returned a ndarray of <U3"),
        ([np.bool_(True), 1.0], r"returned a bool \(np.True_\)|returned a bool_ \(True\)"),
        ([1.0, None], r"returned a NoneType \(None\)"),
        ("0.5", r"returned a str;"),
        (0.5, r"returned a float;"),
    ],
)
def test_rewards_must_be_real_numbers(values, message):
    images = torch.rand(2, 3, 8, 8)

    def judge(images, prompts):
        return values

    with pytest.raises(RewardFunctionError, match=f"^reward function 'judge' {message}.*expected one float per image .ints and numpy"):
        call_reward(judge, images, ["a", "b"])


@pytest.mark.parametrize(
    "values",
    [[1, 2], [np.float32(1), np.int64(2)], np.array([1, 2]), torch.tensor([1.0, 2.0]), [torch.tensor(1), torch.tensor(2.0)], (1.0, 2.0)],
    ids=["ints", "numpy_scalars", "numpy_array", "tensor", "tensor_scalars", "tuple"],
)
def test_rewards_as_ints_numpy_or_torch_numbers_are_fine(values):
    out = call_reward(lambda images, prompts: values, torch.rand(2, 3, 8, 8), ["a", "b"])
    assert out.dtype == torch.float64 and out.tolist() == [1.0, 2.0]


def test_aesthetic_missing_head_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="sac\\+logos\\+ava1-l14-linearMSE.pth.*improved-aesthetic-predictor"):
        AestheticScorer(tiny_clip(tmp_path), tmp_path / "missing.pth")


def test_aesthetic_missing_clip_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-large-patch14"):
        AestheticScorer(tmp_path / "no-clip-here", tmp_path / "head.pth")


def tiny_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=12,
    )
    torch.manual_seed(0)
    path = tmp_path / "clip"
    CLIPModel(config).save_pretrained(str(path))
    return path


def test_aesthetic_scores_are_the_head_on_normalised_clip_embeddings(tmp_path):
    from transformers import CLIPModel

    from rebel.diffusion.rewards import clip_preprocess

    clip = tiny_clip(tmp_path)
    head = AestheticHead(12)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    scorer = AestheticScorer(clip, tmp_path / "head.pth", batch_size=3)
    images = torch.rand(5, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    scores = scorer(images, ["p"] * 5)
    assert len(scores) == 5 and len(set(scores)) == 5

    model = CLIPModel.from_pretrained(str(clip)).eval()
    pixels = clip_preprocess(images, 32)
    assert pixels.shape == (5, 3, 32, 32)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)
        expected = head.eval()(features / features.norm(dim=-1, keepdim=True)).flatten()
    torch.testing.assert_close(torch.tensor(scores), expected, rtol=1e-4, atol=1e-5)
    assert call_reward(scorer, images, ["p"] * 5).shape == (5,)
