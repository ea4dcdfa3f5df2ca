"""Grounding tokens: one token per entity from its phrase (and reference image) and its box.

Shapes: B layouts, N entity slots (padded), D the phrase embedding size (`positive_len`),
C the UNet's cross-attention size. Padded slots (mask 0) take learnable null features,
and so does the unconditional half of classifier-free guidance.

The parameter names match official GLIGEN's `position_net.*` and diffusers'
`GLIGENTextBoundingboxProjection`, so their weights load as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from gligen.layout import Layout


def fourier_embed(boxes: torch.Tensor, num_freqs: int = 8) -> torch.Tensor:
    """Fourier features of boxes: (B, N, 4) normalized xyxy -> (B, N, num_freqs * 2 * 4); of points (B, N, 2) likewise.

    Frequencies are `100 ** (k / num_freqs)`; the output order (frequency, sin/cos, coordinate)
    is diffusers' `get_fourier_embeds_from_boundingbox`, which the released weights expect.
    """
    freqs = 100 ** (torch.arange(num_freqs, device=boxes.device) / num_freqs)
    angles = freqs.to(boxes.dtype) * boxes.unsqueeze(-1)  # B, N, 4, F
    features = torch.stack((angles.sin(), angles.cos()), dim=-1)  # B, N, 4, F, 2
    return features.permute(0, 1, 3, 4, 2).reshape(*boxes.shape[:2], -1)


def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, 512), nn.SiLU(), nn.Linear(512, 512), nn.SiLU(), nn.Linear(512, out_dim))


def _or_null(features: torch.Tensor, masks: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """Features where the mask is 1, the learnable null feature where it is 0. (B,N,D),(B,N)->(B,N,D)"""
    masks = masks.unsqueeze(-1).to(features.dtype)
    return features * masks + (1 - masks) * null.view(1, 1, -1)


class TextBoxPositionNet(nn.Module):
    """Text-box grounding: MLP(phrase embedding ++ Fourier(box)) -> one token per entity."""

    def __init__(self, positive_len: int = 768, out_dim: int = 768, fourier_freqs: int = 8):
        super().__init__()
        self.fourier_freqs = fourier_freqs
        position_dim = fourier_freqs * 8
        self.linears = _mlp(positive_len + position_dim, out_dim)
        self.null_positive_feature = nn.Parameter(torch.zeros(positive_len))
        self.null_position_feature = nn.Parameter(torch.zeros(position_dim))

    def forward(self, boxes: torch.Tensor, masks: torch.Tensor, phrase_embeds: torch.Tensor) -> torch.Tensor:
        """boxes (B,N,4), masks (B,N), phrase_embeds (B,N,D) -> tokens (B,N,C)."""
        position = _or_null(fourier_embed(boxes, self.fourier_freqs), masks, self.null_position_feature)
        phrase = _or_null(phrase_embeds, masks, self.null_positive_feature)
        return self.linears(torch.cat([phrase, position], dim=-1))


class TextImageBoxPositionNet(nn.Module):
    """Text-image-box grounding: a text token and an image token per entity (2N tokens: texts, then images)."""

    def __init__(self, positive_len: int = 768, out_dim: int = 768, fourier_freqs: int = 8):
        super().__init__()
        self.fourier_freqs = fourier_freqs
        position_dim = fourier_freqs * 8
        self.linears_text = _mlp(positive_len + position_dim, out_dim)
        self.linears_image = _mlp(positive_len + position_dim, out_dim)
        self.null_text_feature = nn.Parameter(torch.zeros(positive_len))
        self.null_image_feature = nn.Parameter(torch.zeros(positive_len))
        self.null_position_feature = nn.Parameter(torch.zeros(position_dim))

    def forward(
        self,
        boxes: torch.Tensor,
        masks: torch.Tensor,
        phrase_embeds: torch.Tensor,
        image_embeds: torch.Tensor,
        phrase_masks: torch.Tensor,
        image_masks: torch.Tensor,
    ) -> torch.Tensor:
        """boxes (B,N,4), masks/phrase_masks/image_masks (B,N), embeds (B,N,D) -> tokens (B,2N,C)."""
        position = _or_null(fourier_embed(boxes, self.fourier_freqs), masks, self.null_position_feature)
        phrase = _or_null(phrase_embeds, phrase_masks, self.null_text_feature)
        image = _or_null(image_embeds, image_masks, self.null_image_feature)
        text_tokens = self.linears_text(torch.cat([phrase, position], dim=-1))
        image_tokens = self.linears_image(torch.cat([image, position], dim=-1))
        return torch.cat([text_tokens, image_tokens], dim=1)


@dataclass
class GroundingInputs:
    """Padded per-entity inputs of a batch of layouts.

    boxes (B,N,4) normalized xyxy, masks (B,N) 1 for real entities; phrase_embeds (B,N,D);
    image_embeds (B,N,D) and image_masks (B,N) for text-image-box grounding only, with
    phrase_masks (B,N) where a slot's phrase is masked but its box is not (a style token; None:
    the masks). points (B,S,2) and point_masks (B,S) for keypoint grounding (`gligen.keypoints`).
    maps (B,3,H,W) in [-1,1] or (B,1,H,W) labels and map_masks (B,) for a map condition only (`gligen.maps`).
    """

    boxes: torch.Tensor
    masks: torch.Tensor
    phrase_embeds: torch.Tensor
    image_embeds: torch.Tensor | None = None
    image_masks: torch.Tensor | None = None
    phrase_masks: torch.Tensor | None = None
    points: torch.Tensor | None = None
    point_masks: torch.Tensor | None = None
    maps: torch.Tensor | None = None
    map_masks: torch.Tensor | None = None

    def with_null_half(self) -> GroundingInputs:
        """[null grounding; this] along the batch: the unconditional half of classifier-free guidance.

        The maps themselves stay in the null half (only their tokens are null): official GLIGEN gives the
        unconditional pass the same extra input channels.
        """
        def twice(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.cat([t, t])

        def null_then(m: torch.Tensor | None) -> torch.Tensor | None:
            return None if m is None else torch.cat([torch.zeros_like(m), m])

        return GroundingInputs(
            twice(self.boxes), null_then(self.masks), twice(self.phrase_embeds),
            twice(self.image_embeds), null_then(self.image_masks), null_then(self.phrase_masks),
            twice(self.points), null_then(self.point_masks), twice(self.maps), null_then(self.map_masks),
        )


# Reference image embeddings are scaled to this norm, the typical norm of CLIP text features.
IMAGE_EMBED_NORM = 28.7


@torch.no_grad()
def encode_images(image_encoder: nn.Module, image_processor, image_projection: nn.Module, images) -> torch.Tensor:
    """Reference image embeddings in the text embedding space. PIL images -> (len(images), D).

    CLIP `image_embeds` are mapped back by the transposed text projection (`image_projection`)
    and rescaled to norm 28.7, as official GLIGEN's text-image models were trained.
    """
    device = next(image_encoder.parameters()).device
    pixels = image_processor(images=list(images), return_tensors="pt").pixel_values
    embeds = image_projection(image_encoder(pixel_values=pixels.to(device, image_encoder.dtype)).image_embeds)
    return embeds / embeds.norm(dim=-1, keepdim=True) * IMAGE_EMBED_NORM


# The style token's box: official GLIGEN's dummy location [0, 1, 0, 1] (x0 = x1 = 0, y0 = y1 = 1).
STYLE_BOX = (0.0, 1.0, 0.0, 1.0)


def add_style(inputs: GroundingInputs, slots: Sequence[int | None], embeds: torch.Tensor) -> None:
    """Put a style token into the text-image-box `inputs`, in place: one per row whose slot is given.

    Row b's style takes slot `slots[b]` (the one after its entities): the dummy box `STYLE_BOX`,
    its phrase masked and its image (`embeds`, one row per given slot, as `encode_images` gives) shown.
    """
    if inputs.phrase_masks is None:
        inputs.phrase_masks = inputs.masks.clone()
    styled = [(b, slot) for b, slot in enumerate(slots) if slot is not None]
    for (b, slot), embed in zip(styled, embeds, strict=True):
        inputs.boxes[b, slot] = torch.tensor(STYLE_BOX, dtype=inputs.boxes.dtype)
        inputs.image_embeds[b, slot] = embed
        inputs.masks[b, slot] = inputs.image_masks[b, slot] = 1
        inputs.phrase_masks[b, slot] = 0


def pad_entities(
    layouts: Sequence[Layout], max_entities: int, device=None, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (B, max_entities, 4) and masks (B, max_entities) of the layouts, zero-padded."""
    boxes = torch.zeros(len(layouts), max_entities, 4, device=device, dtype=dtype)
    masks = torch.zeros(len(layouts), max_entities, device=device, dtype=dtype)
    for i, layout in enumerate(layouts):
        n = len(layout.entities)
        if n:
            boxes[i, :n] = torch.tensor(layout.boxes, device=device, dtype=dtype)
            masks[i, :n] = 1
    return boxes, masks


def scatter_embeds(embeds: torch.Tensor, counts: Sequence[int], max_entities: int) -> torch.Tensor:
    """Spread per-entity embeddings (sum(counts), D) of B layouts into zero-padded (B, max_entities, D)."""
    out = embeds.new_zeros(len(counts), max_entities, embeds.shape[-1])
    start = 0
    for i, n in enumerate(counts):
        out[i, :n] = embeds[start:start + n]
        start += n
    return out
