"""Model names: `"demo"` is the bundled shapes world, anything else a local directory or hub id.

Below the pipeline and the detector alike (both resolve `--model demo` here); the bundled
models themselves live in `gligen/demo/models/` (see `gligen/demo/model_card.md`).
"""

from __future__ import annotations

import json
from pathlib import Path

from gligen.errors import UserError

DEMO = "demo"
MODELS_DIR = Path(__file__).parent / "demo" / "models"
KINDS = ("base", "adapter", "detector")


def resolve_model(name: str, kind: str = "base") -> str:
    """`name` itself, or for `"demo"` the bundled model directory of `kind` (base, adapter or detector).

    Raises a UserError when the demo bundle of that kind is not installed.
    """
    if name != DEMO:
        return name
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = MODELS_DIR / kind
    if not path.is_dir() or not any(path.iterdir()):
        raise UserError(
            f"the demo {kind} model is not bundled in this installation (expected it in {path}); "
            "train it as gligen/demo/model_card.md says, or pass a model directory or hub id"
        )
    return str(path)


def looks_like_repo_id(name: str) -> bool:
    """'owner/name' (or 'name'): one slash at most, no path syntax; what to look up on the hub when no such
    local path exists."""
    return name.count("/") <= 1 and not name.startswith((".", "/", "~")) and "\\" not in name


def native_size(name: str) -> int | None:
    """The image side a local diffusers model (or `"demo"`) makes by default: UNet sample size x VAE factor.

    None for a hub id or a directory without those configs (the caller keeps its own default).
    """
    root = Path(resolve_model(name, "base"))
    try:
        unet = json.loads((root / "unet" / "config.json").read_text())
        vae = json.loads((root / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None
