"""HED soft edges with ControlNet 1.1's Apache-2.0 HED network (`ControlNetHED.pth` of lllyasviel/Annotators).

The network: five VGG-like stages (64, 128, 256, 512, 512 channels; 2, 2, 3, 3, 3 3x3 convs with ReLU, a 2x2
max-pool before stages 2-5), each with a 1x1 projection to one edge logit map; the input is RGB in 0 .. 255
minus a learned per-channel `norm`. The edge map is the sigmoid of the mean of the five logit maps, each
resized bilinearly to the image. Weights load without running code from the pickle (`gligen.safe_pickle`),
from a `.pth` / `.safetensors` file, a directory holding `ControlNetHED.pth`, or a hub repository id.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from gligen.bundled import looks_like_repo_id
from gligen.errors import UserError

WEIGHTS_NAME = "ControlNetHED.pth"
DEFAULT_REPO = "lllyasviel/Annotators"
STAGES = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))  # (in, out, convs)


class HedStage(nn.Module):
    """3x3 convs with ReLU, after an optional 2x2 max-pool; returns the features and their 1-channel edge logits."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1)
                                     for i in range(num_convs)])
        self.projection = nn.Conv2d(out_channels, 1, 1)

    def forward(self, x: torch.Tensor, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if pool:
            x = F.max_pool2d(x, 2, 2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HedNetwork(nn.Module):
    """(B, 3, H, W) RGB in 0 .. 255 -> (B, 1, H, W) edge probabilities; state-dict keys as `ControlNetHED.pth`."""

    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        for i, stage in enumerate(STAGES, 1):
            self.add_module(f"block{i}", HedStage(*stage))

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        x, logits = rgb - self.norm, []
        for i in range(1, len(STAGES) + 1):
            x, edge = getattr(self, f"block{i}")(x, pool=i > 1)
            logits.append(F.interpolate(edge, rgb.shape[2:], mode="bilinear", align_corners=False))
        return torch.sigmoid(torch.cat(logits, dim=1).mean(dim=1, keepdim=True))

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike = DEFAULT_REPO, trust_pickle: bool = False) -> HedNetwork:
        """The network with the weights of `source` (see the module docstring)."""
        path = _weights_path(source)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            from gligen.safe_pickle import load_checkpoint

            state = load_checkpoint(path, trust_pickle)
        network = cls()
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserError(f"{path}: not a HED state dict (a mapping of names to tensors)")
        missing, unexpected = set(network.state_dict()) - set(state), set(state) - set(network.state_dict())
        if missing or unexpected:
            wrong = f"missing {sorted(missing)[0]}" if missing else f"unexpected {sorted(unexpected)[0]}"
            raise UserError(f"{path}: not ControlNet's HED network ({wrong})")
        try:
            network.load_state_dict(state)
        except RuntimeError as error:
            raise UserError(f"{path}: not ControlNet's HED network ({str(error).splitlines()[-1].strip()})") from None
        return network.eval().requires_grad_(False)

    def edge_map(self, image: Image.Image) -> Image.Image:
        """The HED map of `image`: white soft edges on black, 8-bit grey, at the image's size."""
        rgb = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
        with torch.no_grad():
            edges = self(rgb.to(self.norm.device))[0, 0]
        return Image.fromarray((edges * 255).clamp(0, 255).byte().cpu().numpy(), "L")


def _weights_path(source: str | os.PathLike) -> Path:
    """The weights file of `source`: a file, a directory holding ControlNetHED.pth, or the hub cache's copy."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file():
            raise UserError(f"{path}: no {WEIGHTS_NAME} in this directory (ControlNet's HED network)")
        return path / WEIGHTS_NAME
    if path.exists() or not looks_like_repo_id(str(source)):
        raise UserError(f"{source}: no such HED weights file or directory")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(source), WEIGHTS_NAME))
    except (OSError, ValueError) as error:
        raise UserError(f"{source}: cannot load {WEIGHTS_NAME} from the hub ({str(error).splitlines()[0]})") from None
