"""The optimizer of the adapter's trainable parameters (AdamW, or bitsandbytes' 8-bit AdamW) and its lr schedule."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler
from torch import nn

from gligen.errors import UserError
from gligen.training.config import OptimConfig

GATES = ("alpha_attn", "alpha_dense")


def make_optimizer(config: OptimConfig, adapter: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; the fusers' gates in a group of their own at lr * gate_lr_scale."""
    named = [(name, p) for name, p in adapter.named_parameters() if p.requires_grad]
    gates = [p for name, p in named if name.rsplit(".", 1)[-1] in GATES]
    others = [p for name, p in named if name.rsplit(".", 1)[-1] not in GATES]
    groups = [{"params": others}, {"params": gates, "lr": config.lr * config.gate_lr_scale}]
    kwargs = dict(lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
    if not config.use_8bit_adam:
        return torch.optim.AdamW(groups, **kwargs)
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("config key optim.use_8bit_adam: bitsandbytes is not installed (pip install bitsandbytes)"
                        ) from None
    return bitsandbytes.optim.AdamW8bit(groups, **kwargs)


def make_lr_scheduler(config: OptimConfig, optimizer: torch.optim.Optimizer, max_steps: int):
    """Linear warmup, then constant or cosine to `max_steps`; stepped once per update."""
    name = "constant_with_warmup" if config.lr_schedule == "constant" else "cosine"
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=max_steps)
