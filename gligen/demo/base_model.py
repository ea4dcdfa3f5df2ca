"""The tiny base text-to-image model of the demo world, in the Stable Diffusion architecture.

Same component classes as SD 1.x (AutoencoderKL, UNet2DConditionModel, CLIPTextModel,
CLIPTokenizer, a DDIM scheduler with SD's noise schedule), so every code path that runs on
SD runs on it: `StableDiffusionPipeline`, `GligenPipeline`, `GroundingAdapter.for_unet`.
Only the sizes shrink, chosen so that all of it trains on a 2-core CPU in about an hour:
64x64 images, an autoencoder with SD's factor 8 but 8 latent channels (8x8x8 latents: a
UNet step at 8x8 costs a third of one at 16x16 on a CPU, and 8 channels keep the shapes'
edges), a 5.9M-parameter UNet with cross-attention at 8x8, 4x4 and the middle, and a
2-layer, 128-wide text encoder over a word-level vocabulary learned from the captions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterable

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# SD 1.x's noise schedule, so schedulers and GLIGEN's sampling behave as on the real base.
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@dataclass(frozen=True)
class BaseModelConfig:
    """Sizes of the base model's networks.

    `vae_channels` has one entry per VAE level (each but the last halves the resolution:
    4 levels map 64x64 images to 8x8 latents). `unet_channels` likewise for the UNet;
    the first `attention_levels` UNet levels (and the middle block) carry cross-attention,
    with `unet_heads[i]` heads at level i.
    """

    image_size: int = 64
    vae_channels: tuple[int, ...] = (16, 32, 64, 64)
    latent_channels: int = 8
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_heads: tuple[int, ...] = (2, 4, 4)
    attention_levels: int = 2
    norm_groups: int = 8
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 32

    @classmethod
    def tiny(cls) -> BaseModelConfig:
        """A ~100k-parameter version for tests: 16x16 images, 8x8 latents."""
        return cls(
            image_size=16, vae_channels=(8, 16), latent_channels=4, unet_channels=(16, 32), unet_heads=(1, 2),
            attention_levels=2, norm_groups=8, text_dim=16, text_layers=1, text_heads=2,
        )

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BaseModelConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def build_tokenizer(captions: Iterable[str], max_length: int = 32) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges make every word of `captions` a single token.

    The vocabulary holds all 256 byte-level characters (alone and word-final), so any text
    still tokenizes, unknown words falling back to characters. The merges are `bpe_merges` of
    the captions' words as CLIP splits them: the same captions always give the same tokenizer.
    """
    clip = CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[]).backend_tokenizer  # CLIP's normalizer + word split
    words = Counter(word for caption in captions
                    for word, _ in clip.pre_tokenizer.pre_tokenize_str(clip.normalizer.normalize_str(caption)))
    merges = bpe_merges(words)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = dict.fromkeys(alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + [BOS, EOS])
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=max_length)


def bpe_merges(words: Counter[str]) -> list[tuple[str, str]]:
    """Byte-pair merges (Sennrich et al.) that join every word of `words` (word -> count) into one symbol.

    Each round merges the most frequent adjacent pair, the smallest pair on ties, so the result
    is a function of the words alone (the `tokenizers` trainer breaks ties by hash order).
    """
    split = {word: (*word[:-1], word[-1] + "</w>") for word in words}
    merges = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, symbols in split.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += words[word]
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        split = {word: _merged(symbols, best) for word, symbols in split.items()}


def _merged(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if symbols[i:i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def build_text_encoder(config: BaseModelConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A CLIP text encoder sized by `config`; its pooled output is the EOS token (as in CLIP)."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_dim, intermediate_size=4 * config.text_dim,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_length, projection_dim=config.text_dim,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def build_vae(config: BaseModelConfig) -> AutoencoderKL:
    """An SD-style KL autoencoder: (B, 3, S, S) in [-1, 1] <-> (B, latent_channels, S/f, S/f)."""
    levels = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=config.latent_channels,
        block_out_channels=config.vae_channels, layers_per_block=1, norm_num_groups=config.norm_groups,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        sample_size=config.image_size,
    )


def build_unet(config: BaseModelConfig) -> UNet2DConditionModel:
    """An SD-style conditional UNet over the latents: cross-attention at the first levels and the middle."""
    levels = len(config.unet_channels)
    attention = [i < config.attention_levels for i in range(levels)]
    return UNet2DConditionModel(
        sample_size=config.latent_size, in_channels=config.latent_channels, out_channels=config.latent_channels,
        block_out_channels=config.unet_channels, layers_per_block=1, norm_num_groups=config.norm_groups,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        cross_attention_dim=config.text_dim,
        attention_head_dim=config.unet_heads,  # diffusers' name; SD configs use it as the number of heads
    )


def training_scheduler() -> DDPMScheduler:
    """The noise schedule used to train (epsilon prediction)."""
    return DDPMScheduler(**NOISE_SCHEDULE, prediction_type="epsilon", clip_sample=False)


def sampling_scheduler() -> DDIMScheduler:
    """The scheduler saved with the pipeline: DDIM over the training schedule, as SD's configs set it."""
    return DDIMScheduler(
        **NOISE_SCHEDULE, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )


def assemble_pipeline(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    """The components as a text-to-image `StableDiffusionPipeline` (no safety checker)."""
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sampling_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
