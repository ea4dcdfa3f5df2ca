"""Training throughput and peak GPU memory of the adapter trainer, with random weights.

    python benchmarks/train.py [--out results.json] [--steps 10]

On CUDA: SD-1.4 shapes (UNet 320-640-1280-1280, CLIP ViT-L/14 text encoder, SD VAE) at
512x512, bf16 + SDPA, batch 8 and 32, with and without gradient checkpointing, with the VAE
latents and text embeddings computed each step or read from the trainer's encoding cache
(`cache_dir`), 30 entities per image. Each step is the trainer's own: VAE encode (or cache
read), text and phrase encoding, UNet + adapter forward and backward, AdamW update; img/s is
the batch over the median step time (CPU: also the process's CPU seconds per step, which
other jobs on the machine change less than wall time). Without CUDA it runs the tiny test components at 32x32
(batch 2 and 4), so that the script is checked on a CPU and CPU step times can be compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gligen.base import FrozenBase  # noqa: E402
from gligen.training.batch import TrainingBatch  # noqa: E402
from gligen.training.config import TrainConfig, build  # noqa: E402
from gligen.training.trainer import Trainer  # noqa: E402
from tests.tiny import tiny_components, tiny_tokenizer  # noqa: E402


def sd14_base(directory: Path) -> FrozenBase:
    """Randomly initialised components in the shapes of Stable Diffusion 1.4."""
    tokenizer = tiny_tokenizer(directory / "tokenizer")  # only the token count (77) matters here
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                                 bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512, scaling_factor=0.18215)
    return FrozenBase(vae=vae, text_encoder=CLIPTextModel(text_config), tokenizer=tokenizer,
                      unet=UNet2DConditionModel(sample_size=64, cross_attention_dim=768),
                      scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))


def tiny_base(directory: Path) -> FrozenBase:
    return FrozenBase(**tiny_components(directory))


def synthetic_batch(batch_size: int, resolution: int, entities: int) -> TrainingBatch:
    generator = torch.Generator().manual_seed(0)
    corner = torch.rand(batch_size, entities, 2, generator=generator) * 0.5
    boxes = torch.cat([corner, corner + 0.2 + torch.rand(batch_size, entities, 2, generator=generator) * 0.3], dim=-1)
    return TrainingBatch(
        pixels=torch.rand(batch_size, 3, resolution, resolution, generator=generator) * 2 - 1,
        boxes=boxes, masks=torch.ones(batch_size, entities),
        captions=["a photo of many things on a table"] * batch_size,
        phrases=[[f"thing number {i}" for i in range(entities)] for _ in range(batch_size)],
        references=[[] for _ in range(batch_size)],
        cache_keys=[str(i) for i in range(batch_size)],
        original_sizes=torch.full((batch_size, 2), float(resolution)),
        crops_top_left=torch.zeros(batch_size, 2),
    )


def measure(base_fn, batch_size: int, checkpointing: bool, cached: bool, resolution: int, steps: int, cuda: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = build(TrainConfig, {
            "output_dir": tmp, "batch_size": batch_size, "mixed_precision": "bf16" if cuda else "no",
            "gradient_checkpointing": checkpointing, "attention": "sdpa", "model": {"base": "random"},
            "data": {"shards": "unused", "resolution": resolution}, "optim": {"warmup_steps": 0},
            "cache_dir": f"{tmp}/cache" if cached else None, "report_to": "none",
        })
        trainer = Trainer(config, base_fn(Path(tmp)))
        batch = synthetic_batch(batch_size, resolution, config.data.max_entities)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, cpu_times = [], []
        for step in range(steps + 2):  # two warm-up steps (the first fills the cache)
            if cuda:
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = trainer.loss(batch)
            trainer.accelerator.backward(loss)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if step >= 2:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
        median = statistics.median(times)
        result = {"batch_size": batch_size, "gradient_checkpointing": checkpointing, "cached_encodings": cached,
                  "resolution": resolution, "images_per_s": round(batch_size / median, 2), "s_per_step": round(median, 4),
                  "s_per_step_min": round(min(times), 4), "cpu_s_per_step": round(statistics.median(cpu_times), 4)}
        if cuda:
            result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        del trainer
        if cuda:
            torch.cuda.empty_cache()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results here as JSON too")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: 8 32 on CUDA, 2 4 on a CPU")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    base_fn, resolution, batches = (sd14_base, 512, (8, 32)) if cuda else (tiny_base, 32, (2, 4))
    batches = args.batch_sizes or batches
    results = []
    for batch_size in batches:
        for checkpointing in (False, True):
            for cached in (False, True):
                try:
                    results.append(measure(base_fn, batch_size, checkpointing, cached, resolution, args.steps, cuda))
                except torch.cuda.OutOfMemoryError:
                    results.append({"batch_size": batch_size, "gradient_checkpointing": checkpointing,
                                    "cached_encodings": cached, "error": "out of memory"})
                    torch.cuda.empty_cache()
                print(json.dumps(results[-1]), flush=True)
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu (tiny components)",
              "shapes": "sd-1.4" if cuda else "tiny", "dtype": "bf16" if cuda else "fp32", "attention": "sdpa",
              "torch": torch.__version__, "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
