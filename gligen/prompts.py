"""Text conditioning of a Stable Diffusion base: prompts for the UNet, phrases for the grounding tokens.

SD 1.x / 2.x have one CLIP text encoder: the prompt embedding is its last hidden states, and a
phrase embedding its `pooler_output` (official GLIGEN's phrase feature).

SDXL has two (`CLIPTextModel`, `CLIPTextModelWithProjection`), encoded as diffusers'
`StableDiffusionXLPipeline` does: the prompt embedding is both encoders' penultimate hidden
states concatenated (768 + 1280 = 2048 for SDXL), and the UNet also takes the second
encoder's projected `text_embeds` and six "time ids" (original size, crop corner, target
size). A phrase embedding is both encoders' `pooler_output` concatenated (2048 for SDXL, the
cross-attention size), each before any projection, as for SD 1.x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


@dataclass
class PromptEmbeds:
    """hidden (B, L, C): the UNet's `encoder_hidden_states`; pooled (B, P): SDXL's `text_embeds`, else None."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def unet_kwargs(self, time_ids: torch.Tensor | None = None) -> dict:
        """Keyword arguments of a diffusers UNet call; `time_ids` (B, 6) are needed with a pooled embedding."""
        kwargs = {"encoder_hidden_states": self.hidden}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": time_ids}
        return kwargs


class PromptEncoder:
    """The base's tokenizer(s) and frozen text encoder(s): one pair for SD 1.x / 2.x, two for SDXL."""

    def __init__(self, tokenizer, text_encoder: nn.Module, tokenizer_2=None, text_encoder_2: nn.Module | None = None):
        self.tokenizers = [tokenizer] + ([tokenizer_2] if text_encoder_2 is not None else [])
        self.text_encoders = [text_encoder] + ([text_encoder_2] if text_encoder_2 is not None else [])

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    @property
    def phrase_dim(self) -> int:
        """The size of a phrase embedding: the sum of the encoders' hidden sizes."""
        return sum(encoder.config.hidden_size for encoder in self.text_encoders)

    @property
    def device(self) -> torch.device:
        return next(self.text_encoders[0].parameters()).device

    def _tokens(self, tokenizer, texts: Sequence[str], padding: str | bool):
        return tokenizer(list(texts), padding=padding, max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").to(self.device)

    @torch.no_grad()
    def prompts(self, texts: Sequence[str]) -> PromptEmbeds:
        """Prompts -> hidden states (B, 77, C) (and SDXL's pooled embedding (B, P))."""
        if not self.is_sdxl:
            encoder = self.text_encoders[0]
            tokens = self._tokens(self.tokenizers[0], texts, "max_length")
            use_mask = getattr(encoder.config, "use_attention_mask", False)  # as diffusers' encode_prompt
            mask = tokens.attention_mask if use_mask else None
            return PromptEmbeds(encoder(tokens.input_ids, attention_mask=mask)[0])
        hidden = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            output = encoder(self._tokens(tokenizer, texts, "max_length").input_ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
        return PromptEmbeds(torch.cat(hidden, dim=-1), output.text_embeds)

    @torch.no_grad()
    def phrases(self, phrases: Sequence[str]) -> torch.Tensor:
        """Phrase embeddings (len(phrases), phrase_dim): each encoder's `pooler_output` for the phrase alone.

        For CLIP this is the EOS token after the final LayerNorm, before any projection.
        """
        if not phrases:
            return torch.zeros(0, self.phrase_dim, device=self.device)
        pooled = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            transformer = getattr(encoder, "text_model", encoder)  # CLIPTextModelWithProjection: skip the projection
            pooled.append(transformer(**self._tokens(tokenizer, phrases, True)).pooler_output)
        return torch.cat(pooled, dim=-1)


def time_ids(original_sizes: torch.Tensor, crops_top_left: torch.Tensor, target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL's micro-conditioning: (B, 2) original (height, width), (B, 2) crop (top, left) -> (B, 6) time ids."""
    target = torch.tensor(target_size, dtype=original_sizes.dtype).expand(len(original_sizes), 2)
    return torch.cat([original_sizes, crops_top_left, target.to(original_sizes.device)], dim=1)
