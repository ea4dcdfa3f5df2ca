"""Optional image-quality metrics from weights the user has on disk: FID and CLIP score.

FID uses torch-fidelity (an optional dependency: `pip install torch-fidelity`) with the
Inception weights file the user gives (torch-fidelity's `weights-inception-2015-12-05-*.pth`),
so nothing is downloaded. CLIP score is torchmetrics' definition, 100 * max(cos(image, text), 0)
averaged over images, with a transformers CLIP model directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from gligen.errors import UserError


def fid(
    generated_dir: str | Path, reference_dir: str | Path, inception_weights: str | Path, device: str = "cpu"
) -> float:
    """Fréchet Inception Distance between the images of two folders."""
    try:
        import torch_fidelity
    except ImportError:
        raise UserError("FID needs torch-fidelity, which is not installed: pip install torch-fidelity") from None
    for path in (generated_dir, reference_dir):
        if not Path(path).is_dir():
            raise UserError(f"{path}: image folder for FID not found")
    if not Path(inception_weights).is_file():
        raise UserError(f"{inception_weights}: Inception weights file not found")
    metrics = torch_fidelity.calculate_metrics(
        input1=str(generated_dir), input2=str(reference_dir), fid=True, verbose=False,
        cuda=torch.device(device).type == "cuda", feature_extractor_weights_path=str(inception_weights),
    )
    return float(metrics["frechet_inception_distance"])


@torch.no_grad()
def clip_score(
    images: Sequence[str | Path],
    prompts: Sequence[str],
    model_dir: str | Path,
    device: str = "cpu",
    batch_size: int = 16,
) -> float:
    """Mean of 100 * max(cos(image embedding, prompt embedding), 0) over image files and their prompts."""
    from transformers import CLIPModel, CLIPProcessor

    if not Path(model_dir).is_dir():
        raise UserError(f"{model_dir}: CLIP model directory not found")
    model = CLIPModel.from_pretrained(model_dir).to(device).eval()
    processor = CLIPProcessor.from_pretrained(model_dir)
    scores = []
    for start in range(0, len(images), batch_size):
        batch = [Image.open(path).convert("RGB") for path in images[start:start + batch_size]]
        inputs = processor(text=list(prompts[start:start + batch_size]), images=batch,
                           return_tensors="pt", padding=True, truncation=True).to(device)
        out = model(**inputs)
        cosine = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
        scores.append(100 * cosine.clamp(min=0))
    return float(torch.cat(scores).mean())
