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

    def _get(self, key: str) -> tuple[torch.Tensor, ...] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            entry = load_file(str(path))
            return tuple(entry[str(i)] for i in range(len(entry)))
        except (SafetensorError, OSError, KeyError):
            return None  # a damaged entry is recomputed

    def encode(self, keys: Sequence[str], fn: Callable[[list[int]], tuple[torch.Tensor, ...]], device: torch.device
               ) -> tuple[torch.Tensor, ...]:
        """The entries of `keys`, stacked on `device`; `fn(indices)` encodes the missing ones in one batch.

        `fn` returns a tuple of tensors (M, ...) (e.g. SDXL's hidden states and pooled embeddings);
        so does `encode`, with B = len(keys) rows each.
        """
        found = [self._get(k) for k in keys]
        missing = [i for i, value in enumerate(found) if value is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = fn(missing)
            for row, i in enumerate(missing):
                found[i] = tuple(part[row] for part in computed)
                path = self._path(keys[i])
                path.parent.mkdir(exist_ok=True)
                with atomic_path(path) as tmp:
                    save_file({str(j): part.detach().cpu().contiguous() for j, part in enumerate(found[i])}, str(tmp))
        return tuple(torch.stack([entry[j].to(device) for entry in found]) for j in range(len(found[0])))
