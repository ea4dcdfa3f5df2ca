"""Gated self-attention ("fuser") and attaching it to any diffusers UNet.

In every transformer block, after self-attention and before cross-attention:

    x = x + s * tanh(alpha_attn)  * SelfAttn(LN([x, Linear(tokens)]))[:, :n_visual]
    x = x + s * tanh(alpha_dense) * FF(LN(x))

with both gates zero-initialised, so a fresh fuser changes nothing, and `s` the
scheduled-sampling scale of the current step. diffusers' `BasicTransformerBlock` already
calls `block.fuser(x, tokens)` at that point when the UNet is given
`cross_attention_kwargs={"gligen": {...}}`; attaching sets `block.fuser` and nothing else
of the block, so the base parameters are never touched.

With visual positions (an option, not in GLIGEN) the attention's visual input is
`x + Linear(Fourier(token centre))`, the Linear zero-initialised and the frequencies octaves
(pi, 2 pi, 4 pi, ...: each halves the grid cell it tells apart, as in NeRF), so the tokens say
where they are. A large UNet's features carry their position (GLIGEN relies on it); a small
base's barely do at high noise, where the layout is decided.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import BasicTransformerBlock, GatedSelfAttentionDense
from torch import nn

# periods 2 down to 1/64 of the side: enough for 128 tokens a side; a coarser grid sees the finer ones as constants
POSITION_OCTAVES = 8


class GatedSelfAttention(GatedSelfAttentionDense):
    """diffusers' gated self-attention with a scheduled-sampling `scale`; same parameters and names.

    x (B, n_visual, dim), tokens (B, n_tokens, context_dim) -> (B, n_visual, dim).

    `scale` is a 0-dim buffer (not saved) changed in place by `set_scale`: a compiled UNet reads
    it as an input, so a changing schedule causes no recompilation. `position_octaves` > 0 adds the
    visual positions (`position`, zero-initialised); they need the UNet input's latent size, given
    by `set_latent_size` before each call.
    """

    def __init__(self, query_dim: int, context_dim: int, n_heads: int, d_head: int, position_octaves: int = 0):
        super().__init__(query_dim, context_dim, n_heads, d_head)
        self.register_buffer("scale", torch.ones(()), persistent=False)
        self.position_octaves = position_octaves
        self.position = None
        self.latent_size: tuple[int, int] | None = None
        if position_octaves:
            self.position = nn.Linear(4 * position_octaves, query_dim)
            nn.init.zeros_(self.position.weight)
            nn.init.zeros_(self.position.bias)

    def set_scale(self, value: float) -> None:
        self.scale.fill_(value)

    def set_latent_size(self, size: tuple[int, int]) -> None:
        self.latent_size = (int(size[0]), int(size[1]))

    def forward(self, x: torch.Tensor, objs: torch.Tensor) -> torch.Tensor:
        n_visual = x.shape[1]
        objs = self.linear(objs)
        visual = x
        if self.position is not None:
            if self.latent_size is None:
                raise ValueError("a fuser with visual positions needs the latent size: pass latent_size to "
                                 "GroundingAdapter.cross_attention_kwargs")
            centres = token_centres(n_visual, self.latent_size).to(x.device, x.dtype)
            visual = x + self.position(octave_features(centres, self.position_octaves))
        x = x + self.scale * self.alpha_attn.tanh() * self.attn(self.norm1(torch.cat([visual, objs], dim=1)))[:, :n_visual]
        return x + self.scale * self.alpha_dense.tanh() * self.ff(self.norm2(x))


def octave_features(points: torch.Tensor, octaves: int) -> torch.Tensor:
    """(n, 2) normalized points -> (n, 4 octaves): sin and cos of each coordinate times pi, 2 pi, 4 pi, ..."""
    angles = points[..., None] * (torch.pi * 2.0 ** torch.arange(octaves, device=points.device)).to(points.dtype)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)


def token_centres(n: int, latent_size: tuple[int, int]) -> torch.Tensor:
    """(n, 2) normalized (x, y) centres of a transformer block's n visual tokens, on a UNet input of
    `latent_size` (h, w): the level whose h * w is n (each downsampling halves a side, rounding up),
    in the row-major order in which diffusers flattens (B, C, h, w) feature maps into tokens."""
    h, w = latent_size
    while h * w > n and (h, w) != (1, 1):
        h, w = -(-h // 2), -(-w // 2)
    if h * w != n:
        raise ValueError(f"{n} visual tokens are no level of a {latent_size[0]}x{latent_size[1]} latent")
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)


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
