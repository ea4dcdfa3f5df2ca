"""Gated self-attention ("fuser") and attaching it to any diffusers UNet.

In every transformer block, after self-attention and before cross-attention:

    x = x + s * tanh(alpha_attn)  * SelfAttn(LN([x, Linear(tokens)]))[:, :n_visual]
    x = x + s * tanh(alpha_dense) * FF(LN(x))

with both gates zero-initialised, so a fresh fuser changes nothing, and `s` the
scheduled-sampling scale of the current step. diffusers' `BasicTransformerBlock` already
calls `block.fuser(x, tokens)` at that point when the UNet is given
`cross_attention_kwargs={"gligen": {...}}`; attaching sets `block.fuser` and nothing else
of the block, so the base parameters are never touched.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import BasicTransformerBlock, GatedSelfAttentionDense
from torch import nn


class GatedSelfAttention(GatedSelfAttentionDense):
    """diffusers' gated self-attention with a scheduled-sampling `scale`; same parameters and names.

    x (B, n_visual, dim), tokens (B, n_tokens, context_dim) -> (B, n_visual, dim).

    `scale` is a 0-dim buffer (not saved) changed in place by `set_scale`: a compiled UNet reads
    it as an input, so a changing schedule causes no recompilation.
    """

    def __init__(self, query_dim: int, context_dim: int, n_heads: int, d_head: int):
        super().__init__(query_dim, context_dim, n_heads, d_head)
        self.register_buffer("scale", torch.ones(()), persistent=False)

    def set_scale(self, value: float) -> None:
        self.scale.fill_(value)

    def forward(self, x: torch.Tensor, objs: torch.Tensor) -> torch.Tensor:
        n_visual = x.shape[1]
        objs = self.linear(objs)
        x = x + self.scale * self.alpha_attn.tanh() * self.attn(self.norm1(torch.cat([x, objs], dim=1)))[:, :n_visual]
        return x + self.scale * self.alpha_dense.tanh() * self.ff(self.norm2(x))


class PrecomputedTokens(nn.Module):
    """Stands in the UNet's `position_net` slot: tokens are computed once per call, not once per step."""

    def forward(self, objs: torch.Tensor) -> torch.Tensor:
        return objs


def block_shape(block: BasicTransformerBlock) -> tuple[int, int, int]:
    """(dim, heads, head_dim) of a transformer block's self-attention, which its fuser must match."""
    attn = block.attn1
    return attn.query_dim, attn.heads, attn.inner_dim // attn.heads


def transformer_blocks(unet: nn.Module) -> dict[str, BasicTransformerBlock]:
    """Every cross-attention transformer block of a UNet, by module path, in forward order."""
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, BasicTransformerBlock) and module.attn2 is not None
    }


def attach_fusers(unet: nn.Module, fusers: dict[str, GatedSelfAttention]) -> None:
    """Give each named block its fuser and the UNet a `PrecomputedTokens` position net."""
    for path, fuser in fusers.items():
        unet.get_submodule(path).fuser = fuser
    unet.position_net = PrecomputedTokens()


def detach_fusers(unet: nn.Module) -> None:
    """Remove every fuser and the position net: the UNet is its base again."""
    for block in transformer_blocks(unet).values():
        if hasattr(block, "fuser"):
            del block.fuser
    if hasattr(unet, "position_net"):
        del unet.position_net
