"""A disk cache of encoder outputs (VAE latent distributions, text embeddings) keyed by strings.

The base is frozen, so an encoding depends only on its input: the cached VAE moments of a
crop (sample key + crop + flip + resolution) and the text encoder output of a caption or
phrase are exact. Each entry is one safetensors file named by the SHA-1 of its key and
written atomically, so several processes may share one cache directory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gligen.files import atomic_path


class EncodingCache:
    """`cache.encode(keys, fn)` -> fn's outputs for the keys, computing only the misses."""

    def __init__(self, directory: str | os.PathLike, namespace: str):
        self.directory = Path(directory) / hashlib.sha1(namespace.encode()).hexdigest()[:16]
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        digest = hashlib.sha1(key.encode()).hexdigest()
        return self.directory / digest[:2] / f"{digest}.safetensors"

    def _get(self, key: str) -> torch.Tensor | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["value"]
        except (SafetensorError, OSError, KeyError):
            return None  # a damaged entry is recomputed

    def encode(self, keys: Sequence[str], fn: Callable[[list[int]], torch.Tensor], device: torch.device) -> torch.Tensor:
        """Stack the entries of `keys` on `device`; `fn(indices)` encodes the missing ones (M, ...) in one batch."""
        found = [self._get(k) for k in keys]
        missing = [i for i, value in enumerate(found) if value is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = fn(missing)
            for row, i in enumerate(missing):
                found[i] = computed[row]
                path = self._path(keys[i])
                path.parent.mkdir(exist_ok=True)
                with atomic_path(path) as tmp:
                    save_file({"value": computed[row].detach().cpu().contiguous()}, str(tmp))
        return torch.stack([v.to(device) for v in found])
