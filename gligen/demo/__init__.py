"""The offline demo world: tiny models trained on synthetic shapes, bundled with the package.

`--model demo` (and `--adapter demo`, `detector ... --model demo`) name the bundled models
under `gligen/demo/models/`: `base/` (a StableDiffusionPipeline directory), `adapter/`
(adapter_config.json + adapter.safetensors) and `detector/`. How each was trained is in
`gligen/demo/model_card.md`; the base is trained by `python -m gligen.demo.train_base`.
"""

from __future__ import annotations

from pathlib import Path

from gligen.errors import UserError

DEMO = "demo"
MODELS_DIR = Path(__file__).parent / "models"
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
