"""TrainingBatch: what one training step reads, typed.

Made by `ShardDataset` (see `dataset.collate`); read by `step.loss`. It can also be read by
key (`batch["pixels"]`, `{**batch}`) with the keys of the dict batches it replaces. It is no
`Mapping` on purpose: a DataLoader would turn a Mapping into a plain dict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Mapping

import torch
from PIL import Image

from gligen.pose import Keypoints

if TYPE_CHECKING:
    from gligen.training.dataset import DataPosition


@dataclass
class TrainingBatch:
    """B augmented samples, entities padded to N slots.

    pixels (B,3,R,R) in [-1,1]; boxes (B,N,4) normalized xyxy of the crop; masks (B,N): 1 for a
    real entity; captions [B]; phrases [B][n_b] (n_b <= N); references [B][n_b]: each entity's
    reference image (text-image-box only, else empty lists); cache_keys [B]: the sample and its
    crop, for the encoding cache; original_sizes (B,2): each image's (height, width);
    crops_top_left (B,2): the crop's (top, left) corner (SDXL's size and crop conditioning);
    keypoints [B][n_b]: each entity's 17 normalized (x, y, v) keypoints of the crop, or None;
    styles [B]: each sample's style image (text-image-box only), or None; both None for batches
    made without them.
    maps: the condition maps of a map adapter's training, (B,3,R,R) in [-1,1] or (B,1,R,R) labels, else None.
    `reader` and `position` say which reader of the process made the batch and where that
    reader stands after it (what a checkpoint saves); None for batches made otherwise.
    """

    pixels: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor
    captions: list[str]
    phrases: list[list[str]]
    references: list[list[Image.Image]]
    cache_keys: list[str]
    original_sizes: torch.Tensor
    crops_top_left: torch.Tensor
    keypoints: list[list[Keypoints | None]] | None = None
    styles: list[Image.Image | None] | None = None
    maps: torch.Tensor | None = None
    reader: int | None = None
    position: DataPosition | None = None

    @classmethod
    def of(cls, batch: Mapping[str, Any]) -> TrainingBatch:
        """`batch` itself, or a TrainingBatch from a mapping of its data keys (the reader position is not kept;
        keypoints and styles are optional)."""
        if isinstance(batch, TrainingBatch):
            return batch
        return cls(**{name: batch[name] for name in DATA_KEYS if name in batch})

    def __getitem__(self, key: str) -> Any:
        if key == "position":  # the dict form: {"worker": reader, "epoch": ..., "shard": ..., ...}
            return None if self.position is None else {"worker": self.reader, **asdict(self.position)}
        if key not in DATA_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> tuple[str, ...]:
        return DATA_KEYS + (("position",) if self.position is not None else ())


DATA_KEYS = tuple(f.name for f in fields(TrainingBatch) if f.name not in ("reader", "position"))
