"""Dense spatial conditions (GLIGEN's map releases): canny edges, HED edges, depth, surface normals, ADE20K labels.

A map grounds the whole image. It enters the UNet twice (`gligen.maps.nets`): as 64 tokens for the
fusers (a ConvNeXt tokenizer) and as a few extra UNet input channels (a downsampler to the
latent size). This module is light (no torch): layouts import it to check a condition's type.

How a map file is read (`gligen.maps.encode`):

| type   | file                                                       | network input                 |
|--------|------------------------------------------------------------|-------------------------------|
| canny  | white edges on black (8-bit grey or RGB)                   | RGB in [-1, 1]                |
| hed    | white soft edges on black (8-bit grey or RGB)              | RGB in [-1, 1]                |
| depth  | 8- or 16-bit grey, near bright (inverse depth, as DPT)     | RGB in [-1, 1]                |
| normal | RGB = (n + 1) / 2 * 255 of unit normals (x, y, z)          | RGB in [-1, 1]                |
| sem    | ADE20K label PNG: one channel, a class index per pixel     | 152-channel one-hot           |
"""

from __future__ import annotations

CONDITION_TYPES = ("canny", "hed", "depth", "normal", "sem")
LABEL_TYPES = ("sem",)  # maps of class indices: one channel, resized with nearest neighbours, one-hot encoded
SEM_CLASSES = 152  # the channels of the released semantic model's one-hot input (ADE20K labels 0..150, and one spare)

# The official releases' scheduled sampling: [scale-1 fraction, linear decay, scale-0 fraction]
DEFAULT_SCHEDULES = {
    "canny": (0.9, 0.0, 0.1),
    "hed": (0.9, 0.0, 0.1),
    "depth": (0.7, 0.0, 0.3),
    "normal": (0.7, 0.0, 0.3),
    "sem": (0.7, 0.0, 0.3),
}
