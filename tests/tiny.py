"""Tiny Stable Diffusion components built in the test, saved as diffusers directories.

Everything is random but seeded; nothing is downloaded. The tokenizer is a character-level
CLIP BPE tokenizer (a made-up vocabulary with no merges).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

HIDDEN = 32  # text embedding size = cross-attention size = phrase embedding size


def tiny_tokenizer(directory: str | Path) -> CLIPTokenizer:
    """A character-level CLIP tokenizer saved in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(directory)
    return tokenizer


def tiny_text_encoder(vocab_size: int, hidden: int = HIDDEN, projection: int = HIDDEN, with_projection: bool = False,
                      seed: int = 0) -> CLIPTextModel | CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=projection,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def tiny_unet(in_channels: int = 4, attention_type: str = "default") -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=in_channels, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN, attention_head_dim=(2, 4), norm_num_groups=16, attention_type=attention_type,
    ).eval()


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=16,
    ).eval()


# SDXL: two text encoders of different sizes (so that a mix-up shows), hidden states concatenated
SDXL_HIDDEN_2, SDXL_PROJECTION = 48, 24
SDXL_CROSS = HIDDEN + SDXL_HIDDEN_2


def tiny_sdxl_unet() -> UNet2DConditionModel:
    """An SDXL-shaped UNet: `text_time` added conditioning, linear projections, 2 transformer layers deep."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + SDXL_PROJECTION,
        cross_attention_dim=SDXL_CROSS, norm_num_groups=16,
    ).eval()


def save_tiny_sdxl(directory: str | Path) -> Path:
    """A tiny StableDiffusionXLPipeline directory (no watermarker)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    directory = Path(directory)
    tokenizer = tiny_tokenizer(directory / "_build" / "tokenizer")
    tokenizer_2 = tiny_tokenizer(directory / "_build" / "tokenizer_2")
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), unet=tiny_sdxl_unet(), tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        text_encoder=tiny_text_encoder(len(tokenizer)),
        text_encoder_2=tiny_text_encoder(len(tokenizer_2), SDXL_HIDDEN_2, SDXL_PROJECTION, with_projection=True, seed=1),
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         timestep_spacing="leading", steps_offset=1),
        add_watermarker=False,
    )
    pipe.save_pretrained(directory)
    return directory


def tiny_image_encoder() -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=HIDDEN,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModelWithProjection(config).eval(), processor


def save_text_image_box_adapter(sd: str | Path, directory: str | Path) -> tuple[Path, Path]:
    """A text-image-box adapter for the tiny base `sd` (non-zero gates) and a tiny CLIP image encoder, saved in
    `directory`/adapter and `directory`/clip; returns both paths."""
    from gligen.adapter import GroundingAdapter

    directory = Path(directory)
    adapter = GroundingAdapter.for_unet(UNet2DConditionModel.from_pretrained(sd, subfolder="unet"), "text-image-box",
                                        image_embed_dim=HIDDEN)
    randomize_grounding(adapter)
    adapter.save_pretrained(directory / "adapter")
    encoder, processor = tiny_image_encoder()
    encoder.save_pretrained(directory / "clip")
    processor.save_pretrained(directory / "clip")
    return directory / "adapter", directory / "clip"


def tiny_components(directory: str | Path, unet: UNet2DConditionModel | None = None) -> dict:
    """The components of a tiny SD pipeline (tokenizer files written under `directory`/tokenizer)."""
    tokenizer = tiny_tokenizer(Path(directory) / "tokenizer")
    return dict(
        unet=unet if unet is not None else tiny_unet(),
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
    )


def save_tiny_sd(directory: str | Path) -> Path:
    """A tiny text-to-image StableDiffusionPipeline directory (16x16 latents for 64x64... any size)."""
    directory = Path(directory)
    pipe = StableDiffusionPipeline(**tiny_components(directory / "_build"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return directory


def randomize_grounding(module: torch.nn.Module, gate: float = 0.8, seed: int = 1) -> None:
    """Non-zero gates and null features, so grounding visibly changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "alpha_" in name:
                param.fill_(gate)
            elif "null_" in name:
                param.copy_(torch.randn(param.shape, generator=generator))


def save_tiny_gligen(directory: str | Path, in_channels: int = 4, gate: float = 0.8):
    """A tiny diffusers `StableDiffusionGLIGENPipeline` (gated UNet, non-zero gates) saved in `directory`/pipe.

    Returns (the pipeline object, the saved directory).
    """
    from diffusers import StableDiffusionGLIGENPipeline

    directory = Path(directory)
    unet = tiny_unet(in_channels, attention_type="gated")
    randomize_grounding(unet, gate)
    pipe = StableDiffusionGLIGENPipeline(**tiny_components(directory / "_build", unet), safety_checker=None,
                                         feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory / "pipe")
    return pipe, directory / "pipe"


def tiny_train_args(base: str | Path, shards: str | Path, output_dir: str | Path, *overrides: str) -> list[str]:
    """The `key=value` overrides that run configs/tiny_test.yaml on a tiny base and shards at 16 px, then `overrides`."""
    return [f"model.base={base}", f"data.shards={shards}", f"output_dir={output_dir}", "data.resolution=16", *overrides]


def tiny_train_config(base: str | Path, shards: str | Path, output_dir: str | Path, *overrides: str):
    """configs/tiny_test.yaml with `tiny_train_args`: a TrainConfig."""
    from gligen.training import load_config

    return load_config("configs/tiny_test.yaml", tiny_train_args(base, shards, output_dir, *overrides))
