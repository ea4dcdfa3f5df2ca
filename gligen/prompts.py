"""Text conditioning of a Stable Diffusion base: prompts for the UNet, phrases for the grounding tokens.

SD 1.x / 2.x have one CLIP text encoder: the prompt embedding is its last hidden states, and a
phrase embedding its `pooler_output` (official GLIGEN's phrase feature).

SDXL has two (`CLIPTextModel`, `CLIPTextModelWithProjection`), encoded as diffusers'
`StableDiffusionXLPipeline` does: the prompt embedding is both encoders' penultimate hidden
states concatenated (768 + 1280 = 2048 for SDXL), and the UNet also takes the second
encoder's projected `text_embeds` and six "time ids" (original size, crop corner, target
size). A phrase embedding is both encoders' `pooler_output` concatenated (2048 for SDXL, the
cross-attention size), each before any projection, as for SD 1.x; GLIGEN-XL's ("projected") takes
the second encoder's projected `text_embeds` instead of its pooled output.
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

    def rows(self, index: Sequence[int]) -> PromptEmbeds:
        """These rows, in this order (repeats allowed)."""
        index = torch.as_tensor(list(index), dtype=torch.long, device=self.hidden.device)
        pooled = None if self.pooled is None else self.pooled[index.to(self.pooled.device)]
        return PromptEmbeds(self.hidden[index], pooled)

    def cat(self, other: PromptEmbeds) -> PromptEmbeds:
        """[self; other] along the batch."""
        pooled = None if self.pooled is None else torch.cat([self.pooled, other.pooled.to(self.pooled.device)])
        return PromptEmbeds(torch.cat([self.hidden, other.hidden.to(self.hidden.device)]), pooled)

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
    def device(self) -> torch.device:
        return next(self.text_encoders[0].parameters()).device

    def _tokens(self, tokenizer, texts: Sequence[str], padding: str | bool, device: torch.device | None):
        return tokenizer(list(texts), padding=padding, max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").to(device or self.device)

    @torch.no_grad()
    def prompts(self, texts: Sequence[str], clip_skip: int | None = None, device: torch.device | None = None
                ) -> PromptEmbeds:
        """Prompts -> hidden states (B, 77, C) (and SDXL's pooled embedding (B, P)), as diffusers encodes them.

        `clip_skip` layers are skipped from the end (SD: then the final LayerNorm, as in diffusers);
        `device` is where the tokens go (the execution device when the encoders are offloaded).
        """
        if not self.is_sdxl:
            encoder = self.text_encoders[0]
            tokens = self._tokens(self.tokenizers[0], texts, "max_length", device)
            use_mask = getattr(encoder.config, "use_attention_mask", False)  # as diffusers' encode_prompt
            mask = tokens.attention_mask if use_mask else None
            if clip_skip is None:
                return PromptEmbeds(encoder(tokens.input_ids, attention_mask=mask)[0])
            hidden = encoder(tokens.input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
            transformer = getattr(encoder, "text_model", encoder)
            return PromptEmbeds(transformer.final_layer_norm(hidden[-(clip_skip + 1)]))
        hidden = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            output = encoder(self._tokens(tokenizer, texts, "max_length", device).input_ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-(clip_skip or 0) - 2])
        return PromptEmbeds(torch.cat(hidden, dim=-1), output.text_embeds)

    def phrase_dim(self, projected: bool = False) -> int:
        """The size of a phrase embedding: the sum of the encoders' hidden sizes (`projected`: the second
        encoder's projection size in place of its hidden size)."""
        sizes = [encoder.config.hidden_size for encoder in self.text_encoders]
        if projected and self.is_sdxl:
            sizes[1] = self.text_encoders[1].config.projection_dim
        return sum(sizes)

    @torch.no_grad()
    def phrases(self, phrases: Sequence[str], projected: bool = False, device: torch.device | None = None
                ) -> torch.Tensor:
        """Phrase embeddings (len(phrases), phrase_dim): each encoder's `pooler_output` for the phrase alone.

        For CLIP this is the EOS token after the final LayerNorm, before any projection. With
        `projected` (GLIGEN-XL, SDXL only) the second encoder gives its projected `text_embeds`.
        """
        pooled = []
        for k, (tokenizer, encoder) in enumerate(zip(self.tokenizers, self.text_encoders)):
            tokens = self._tokens(tokenizer, list(phrases) or [""], True, device)
            output = encoder(**tokens)
            if projected and k == 1:
                pooled.append(output.text_embeds)
            elif getattr(output, "pooler_output", None) is not None:
                pooled.append(output.pooler_output)
            else:  # CLIPTextModelWithProjection: the pooled output before its projection
                pooled.append(eos_states(output.last_hidden_state, tokens.input_ids, encoder.config.eos_token_id))
        return torch.cat(pooled, dim=-1)[:len(phrases)]  # no phrase: one encoded for the size, then dropped


def eos_states(hidden: torch.Tensor, input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """CLIP's pooled output: the hidden state (B, L, C) at each row's first EOS token (the highest id for
    configs with the legacy eos_token_id 2, as transformers does). -> (B, C)"""
    if eos_token_id == 2:
        positions = input_ids.to(torch.int).argmax(dim=-1)
    else:
        positions = (input_ids == eos_token_id).int().argmax(dim=-1)
    return hidden[torch.arange(len(hidden), device=hidden.device), positions.to(hidden.device)]


def time_ids(original_sizes: torch.Tensor, crops_top_left: torch.Tensor, target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL's micro-conditioning: (B, 2) original (height, width), (B, 2) crop (top, left) -> (B, 6) time ids."""
    target = torch.tensor(target_size, dtype=original_sizes.dtype).expand(len(original_sizes), 2)
    return torch.cat([original_sizes, crops_top_left, target.to(original_sizes.device)], dim=1)
