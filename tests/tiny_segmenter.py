"""A tiny random SAM saved the way a user's segmenter directory looks.

`save_tiny_sam(path)` writes a `SamModel` (ViT of width 32, 64-pixel inputs) and its
`SamProcessor` (PIL image processor) with `save_pretrained`, so `Segmenter.from_pretrained(path)`
and `SamProcessor.from_pretrained(path)` load it like facebook/sam-vit-base. A forward pass over
a few images and boxes takes milliseconds on a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import SamConfig, SamModel, SamProcessor
from transformers.models.sam import SamImageProcessorPil


def tiny_sam(seed: int = 0, image_size: int = 64, patch_size: int = 8) -> SamModel:
    """A randomly initialised tiny SAM in eval mode (deterministic for a seed).

    transformers draws SAM's layers with tiny weights (the released ones replace them), which
    gives mask logits of about 1e-6: thresholding them at 0 would be a coin toss of rounding.
    Here the layers get PyTorch's default initialisation and the mask hypernetworks' last
    layers are scaled up, so that logits are of order one. The masks are random, not meaningful:
    one mask per box mostly covers the whole image, the three-mask output is more varied.
    """
    torch.manual_seed(seed)
    config = SamConfig(
        vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size, window_size=4, global_attn_indexes=[1],
                           num_pos_feats=8, mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=16, image_size=image_size, patch_size=patch_size, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=16),
    )
    model = SamModel(config).eval()
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            module.reset_parameters()
    with torch.no_grad():
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.proj_out.weight.mul_(30.0)
    return model


def tiny_sam_processor(image_size: int = 64) -> SamProcessor:
    """transformers' SamProcessor with the PIL image processor: longest side resized to `image_size`, padded square."""
    image_processor = SamImageProcessorPil(size={"longest_edge": image_size},
                                           pad_size={"height": image_size, "width": image_size})
    return SamProcessor(image_processor=image_processor)


def save_tiny_sam(path: str | os.PathLike, seed: int = 0, image_size: int = 64) -> Path:
    """Save a tiny random SAM + its processor into `path`; return `path`."""
    path = Path(path)
    tiny_sam(seed, image_size).save_pretrained(path)
    tiny_sam_processor(image_size).save_pretrained(path)
    return path
