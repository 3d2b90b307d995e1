"""The LAION aesthetic predictor: a CLIP ViT-L/14 image embedding, L2-normalised, scored by an MLP.

Reference: christophschuhmann/improved-aesthetic-predictor (the MLP ``sac+logos+ava1-l14-linearMSE``),
used as a reward by DDPO and DAG. The MLP's layer layout matches that checkpoint
(``layers.{0,2,4,6,7}``), so the real file loads as is. The CLIP model is any
``CLIPVisionModelWithProjection`` checkpoint, a hub id (``openai/clip-vit-large-patch14``) or a local
directory; tests use a tiny randomly initialised one saved locally.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import register

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class AestheticMLP(nn.Module):
    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        return self.layers(embed)


def load_mlp(path: str | Path, dim: int) -> AestheticMLP:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"aesthetic reward: mlp_path {str(path)!r} not found (the .pth or .safetensors of the MLP)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    mlp = AestheticMLP(dim)
    mlp.load_state_dict(state)
    return mlp.eval()


class AestheticReward:
    name = "aesthetic"

    def __init__(self, clip_model: str = "openai/clip-vit-large-patch14", mlp_path: str = "",
                 device: str = "cpu", batch_size: int = 32):
        from transformers import CLIPVisionModelWithProjection

        try:
            self.clip = CLIPVisionModelWithProjection.from_pretrained(clip_model).eval().to(device)
        except OSError as e:
            raise ValueError(f"aesthetic reward: cannot load clip_model {clip_model!r}: {e}") from None
        self.mlp = load_mlp(mlp_path, self.clip.config.projection_dim).to(device)
        self.size = self.clip.config.image_size
        self.device, self.batch_size = device, batch_size
        self.mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompts, metadata):
        scores = []
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(images[i:i + self.batch_size]).to(self.device).permute(0, 3, 1, 2).float() / 255
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
            embed = self.clip(pixel_values=(x - self.mean) / self.std).image_embeds
            embed = embed / embed.norm(dim=-1, keepdim=True)
            scores.append(self.mlp(embed).squeeze(-1).cpu())
        return torch.cat(scores).numpy().astype(np.float64), {}


@register("aesthetic")
def aesthetic(clip_model: str = "openai/clip-vit-large-patch14", mlp_path: str = "", device: str = "cpu",
              batch_size: int = 32) -> AestheticReward:
    return AestheticReward(clip_model, mlp_path, device, batch_size)
