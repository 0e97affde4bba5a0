"""Image rewards: JPEG (in)compressibility, the LAION aesthetic predictor, user callables.

A reward function is called as ``fn(images, prompts, **kwargs)`` with ``images`` a float
tensor ``[B, 3, H, W]`` in [0, 1] on the CPU and ``prompts`` a list of B strings; it
returns B floats. :func:`call_reward` checks what comes back and names the function in
every error.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rebel.hf.inputs import call_reward_function

RewardFunc = Callable[..., Sequence[float]]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AESTHETIC_HELP = (
    "The LAION aesthetic predictor needs two downloads: the CLIP ViT-L/14 model "
    "(`huggingface-cli download openai/clip-vit-large-patch14 --local-dir models/clip-vit-large-patch14`) and the MLP head "
    "`sac+logos+ava1-l14-linearMSE.pth` from https://github.com/christophschuhmann/improved-aesthetic-predictor "
    "(put it at models/sac+logos+ava1-l14-linearMSE.pth). Then pass "
    "AestheticScorer(clip='models/clip-vit-large-patch14', head='models/sac+logos+ava1-l14-linearMSE.pth')"
)


def call_reward(fn: RewardFunc, images: Tensor, prompts: Sequence[str], **kwargs: Any) -> Tensor:
    """``[B]`` float64 rewards from ``fn``; a :class:`RewardFunctionError` naming ``fn`` when it
    raises, or returns the wrong number or kind of values (not one float per image) or a non-finite one."""
    return call_reward_function(fn, len(images), "image", images, list(prompts), **kwargs)


# ------------------------------------------------------------------- JPEG


def jpeg_size_kb(images: Tensor, quality: int = 95) -> list[float]:
    """Size in kB of each image encoded as a JPEG at ``quality`` with PIL."""
    from PIL import Image

    sizes = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return sizes


def jpeg_compressibility(images: Tensor, prompts: Sequence[str], **kwargs: Any) -> list[float]:
    """``-size_kb`` of the JPEG (quality 95): smaller files score higher (as in DDPO)."""
    return [-s for s in jpeg_size_kb(images)]


def jpeg_incompressibility(images: Tensor, prompts: Sequence[str], **kwargs: Any) -> list[float]:
    """``+size_kb`` of the JPEG (quality 95): larger files score higher (as in DDPO)."""
    return jpeg_size_kb(images)


def brightness(images: Tensor, prompts: Sequence[str], **kwargs: Any) -> list[float]:
    """Mean pixel value in [0, 1] (a simple reward for tests and the embedded task)."""
    return images.float().flatten(1).mean(1).tolist()


def to_uint8(images: Tensor) -> Any:
    """``[B, H, W, 3]`` uint8 numpy array of ``[B, 3, H, W]`` images in [0, 1]."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# -------------------------------------------------------------- aesthetic


class AestheticHead(torch.nn.Module):
    """The LAION improved-aesthetic-predictor MLP over a normalised CLIP image embedding
    (layer layout of its published state dict: ``layers.{0,2,4,6,7}``)."""

    def __init__(self, in_features: int = 768) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(in_features, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings)


class AestheticScorer:
    """The LAION aesthetic score of images: CLIP ViT-L/14 image embeddings, L2-normalised,
    through :class:`AestheticHead`. Nothing is downloaded at run time.

    Args:
        clip: folder or hub id (in the local cache) of a transformers CLIP model
            (``CLIPModel`` or ``CLIPVisionModelWithProjection``), e.g. ``openai/clip-vit-large-patch14``.
        head: path of the head's state dict (``sac+logos+ava1-l14-linearMSE.pth``; ``.pth``/``.pt``
            or ``.safetensors``).
        batch_size: images per CLIP forward.
        device: where to run (default: CPU).
    """

    __name__ = "aesthetic"

    def __init__(self, clip: str | Path, head: str | Path, *, batch_size: int = 16, device: str | torch.device = "cpu") -> None:
        self.model = load_clip_vision(clip)
        config = self.model.config
        dim = config.projection_dim
        self.head = AestheticHead(dim)
        self.head.load_state_dict(load_head_state(head))
        self.head.eval().requires_grad_(False)
        self.image_size = getattr(config, "vision_config", config).image_size
        self.batch_size = batch_size
        self.to(device)

    def to(self, device: str | torch.device) -> AestheticScorer:
        self.model.to(device)
        self.head.to(device)
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """``[B, projection_dim]`` L2-normalised CLIP image embeddings."""
        pixels = clip_preprocess(images, self.image_size).to(self.device)
        embeds = image_embeddings(self.model, pixels)
        return embeds / embeds.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str] | None = None, **kwargs: Any) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            embeds = self.embed(images[start : start + self.batch_size])
            scores += self.head(embeds.float()).flatten().tolist()
        return scores


def clip_preprocess(images: Tensor, size: int) -> Tensor:
    """CLIP's preprocessing in torch: bicubic resize of the short side to ``size``, centre
    crop, normalisation with CLIP's mean and std. ``images``: ``[B, 3, H, W]`` in [0, 1]."""
    import torch.nn.functional as F

    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images.float(), size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def load_clip_vision(source: str | Path) -> Any:
    """A CLIP image tower with its projection from a folder or cached hub id: a full
    ``CLIPModel`` checkpoint or a ``CLIPVisionModelWithProjection`` one."""
    from transformers import AutoConfig, CLIPModel, CLIPVisionModelWithProjection

    try:
        config = AutoConfig.from_pretrained(str(source))
        cls = CLIPModel if config.model_type == "clip" else CLIPVisionModelWithProjection
        model = cls.from_pretrained(str(source))
    except OSError as error:
        raise FileNotFoundError(f"cannot load the CLIP model {str(source)!r} ({error}). {AESTHETIC_HELP}") from error
    return model.eval().requires_grad_(False)


def image_embeddings(model: Any, pixels: Tensor) -> Tensor:
    """Projected CLIP image embeddings (not normalised) of preprocessed ``pixels``."""
    if hasattr(model, "get_image_features"):
        out = model.get_image_features(pixel_values=pixels)
        return out if isinstance(out, Tensor) else out.pooler_output
    return model(pixel_values=pixels).image_embeds


def load_head_state(path: str | Path) -> dict[str, Tensor]:
    """The aesthetic head's state dict from a ``.pth``/``.pt`` or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the aesthetic head {str(path)!r} does not exist. {AESTHETIC_HELP}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- lookup

REWARDS: dict[str, RewardFunc] = {
    "compressibility": jpeg_compressibility,
    "incompressibility": jpeg_incompressibility,
    "brightness": brightness,
}
