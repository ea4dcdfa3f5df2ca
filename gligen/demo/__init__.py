"""The offline demo world: tiny models trained on synthetic shapes, bundled with the package.

`--model demo` (and `--adapter demo`, `detector ... --model demo`) name the bundled models
under `gligen/demo/models/`: `base/` (a StableDiffusionPipeline directory), `adapter/`
(adapter_config.json + adapter.safetensors) and `detector/`; `gligen.bundled.resolve_model`
turns the name into the directory. How each was trained is in `gligen/demo/model_card.md`;
the base is trained by `python -m gligen.demo.train_base`.
"""

from gligen.bundled import DEMO, KINDS, MODELS_DIR, resolve_model

__all__ = ["DEMO", "KINDS", "MODELS_DIR", "resolve_model"]
