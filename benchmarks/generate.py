"""Seconds per image: plain SD, our GLIGEN pipeline (eager and `pipe.compile()`d), diffusers' deprecated GLIGEN
pipeline, in one run.

    python benchmarks/generate.py [--out generate_benchmark.json] [--repeats 3] [--tiny | --demo]

With CUDA: random weights in the real SD-1.4 shapes (UNet, VAE, CLIP ViT-L/14 text encoder, built from
configs in code; nothing is downloaded; speed does not depend on the weight values), fp16,
512x512, 50 DDIM steps, guidance 7.5, batch 1 and 4, PyTorch SDPA attention. Ours and diffusers'
share every weight: our base UNet and adapter are diffusers' gated UNet split in two.
Without CUDA (or with --tiny) the tiny test components stand in (fp32, 32x32) so the script can be
checked anywhere; those figures say nothing about GPU speed. `--demo` times the bundled demo model (base and
adapter, fp32, its native size, on the CPU): ours eager and compiled only.

Prints a table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionGLIGENPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gligen.bundled import native_size, resolve_model  # noqa: E402
from gligen.convert import split_gligen_unet  # noqa: E402
from gligen.layout import Entity, Layout  # noqa: E402
from gligen.pipeline import GligenPipeline  # noqa: E402
from gligen.schedule import schedule_from_beta  # noqa: E402
from tests.tiny import randomize_grounding, tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae  # noqa: E402

PROMPT = "a cat and a dog on a sofa, a lamp and a window behind them"
ENTITIES = (
    Entity("a cat", (0.05, 0.4, 0.45, 0.95)),
    Entity("a dog", (0.5, 0.35, 0.95, 0.95)),
    Entity("a lamp", (0.05, 0.05, 0.25, 0.45)),
    Entity("a window", (0.4, 0.05, 0.9, 0.35)),
)
DEMO_PROMPT = "a red circle, a blue star and a yellow square on a gray background"  # the demo's 32-token vocabulary
DEMO_ENTITIES = (
    Entity("a red circle", (0.06, 0.08, 0.42, 0.44)),
    Entity("a blue star", (0.56, 0.10, 0.94, 0.48)),
    Entity("a yellow square", (0.32, 0.56, 0.66, 0.90)),
)
BETAS = (0.3, 1.0)


def sd14_models(tokenizer) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """Random models in the shapes of Stable Diffusion 1.4 (its UNet with GLIGEN's gated attention)."""
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_type="gated")  # SD 1.x defaults
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    return unet, vae, text_encoder


def build(tiny: bool, device: torch.device, dtype: torch.dtype, workdir: Path) -> dict:
    """The pipelines on shared weights: {'plain SD', 'diffusers GLIGEN', 'ours', 'ours compiled'}."""
    tokenizer = tiny_tokenizer(workdir / "tokenizer")
    with device:  # initialise the big random models on the GPU directly
        unet, vae, text_encoder = (
            (tiny_unet(attention_type="gated"), tiny_vae(), tiny_text_encoder(len(tokenizer))) if tiny
            else sd14_models(tokenizer)
        )
    randomize_grounding(unet)
    unet, vae, text_encoder = (m.to(device, dtype).eval() for m in (unet, vae, text_encoder))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    base, adapter = split_gligen_unet(copy.deepcopy(unet))
    shared = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    plain = StableDiffusionPipeline(**shared, unet=base, scheduler=copy.deepcopy(scheduler), safety_checker=None,
                                    feature_extractor=None, requires_safety_checker=False)
    reference = StableDiffusionGLIGENPipeline(**shared, unet=unet, scheduler=copy.deepcopy(scheduler), safety_checker=None,
                                              feature_extractor=None, requires_safety_checker=False)
    for pipe in (plain, reference):
        pipe.set_progress_bar_config(disable=True)
    ours = GligenPipeline(**shared, unet=base, scheduler=copy.deepcopy(scheduler), adapter=adapter)
    compiled = GligenPipeline(**shared, unet=copy.deepcopy(base).eval(), scheduler=copy.deepcopy(scheduler),
                              adapter=copy.deepcopy(adapter)).compile()  # its own UNet copy: compiling works in place
    for pipe in (ours, compiled):
        pipe.set_progress_bar_config(disable=True)
    return {"plain SD": plain, "diffusers GLIGEN": reference, "ours": ours, "ours compiled": compiled}


def build_demo() -> dict:
    """The bundled demo model on the CPU: {'ours', 'ours compiled'} (each its own copy: compiling works in place)."""
    def load() -> GligenPipeline:
        pipe = GligenPipeline.from_pretrained(resolve_model("demo"), adapter=resolve_model("demo", "adapter"))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return {"ours": load(), "ours compiled": load().compile()}


def runner(name: str, pipe, beta: float | None, batch: int, size: int, steps: int, demo: bool = False):
    """A no-argument function generating one batch with the given settings (the demo's scene with `demo`)."""
    common = dict(num_inference_steps=steps, guidance_scale=7.5, output_type="np")
    if name == "plain SD":
        return lambda: pipe([PROMPT] * batch, height=size, width=size, **common)
    if name == "diffusers GLIGEN":
        return lambda: pipe(
            [PROMPT] * batch, height=size, width=size, gligen_phrases=[e.phrase for e in ENTITIES],
            gligen_boxes=[list(e.box) for e in ENTITIES], gligen_scheduled_sampling_beta=beta, **common,
        )
    prompt, entities = (DEMO_PROMPT, DEMO_ENTITIES) if demo else (PROMPT, ENTITIES)
    layouts = [Layout(prompt, entities, width=size, height=size, seed=i) for i in range(batch)]
    return lambda: pipe(layouts, schedule=schedule_from_beta(beta), **common)


def seconds_per_image(run, batch: int, repeats: int, device: torch.device) -> float:
    """Median wall time of `repeats` runs (after one warm-up), divided by the batch size."""
    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed()
    return statistics.median(timed() for _ in range(repeats)) / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="generate_benchmark.json", help="JSON file for the figures")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="tiny CPU config even when CUDA is present")
    parser.add_argument("--demo", action="store_true", help="the bundled demo model on the CPU (eager vs compiled)")
    args = parser.parse_args()

    tiny = args.tiny or args.demo or not torch.cuda.is_available()
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.float16
    size = native_size("demo") if args.demo else 32 if tiny else 512
    with tempfile.TemporaryDirectory() as workdir, torch.no_grad():
        pipelines = build_demo() if args.demo else build(tiny, device, dtype, Path(workdir))
        rows = []
        for batch in (1, 4):
            for name, pipe in pipelines.items():
                for beta in (None,) if name == "plain SD" else BETAS:
                    run = runner(name, pipe, beta, batch, size, args.steps, args.demo)
                    seconds = seconds_per_image(run, batch, args.repeats, device)
                    rows.append({"pipeline": name, "beta": beta, "batch": batch, "seconds_per_image": seconds})
                    print(f"{name:>17}  beta {str(beta):>4}  batch {batch}  {seconds:8.3f} s/image", flush=True)

    def figure(name, beta, batch):
        key = (name, beta, batch)
        return next(r["seconds_per_image"] for r in rows if (r["pipeline"], r["beta"], r["batch"]) == key)

    comparisons = [
        {"beta": beta, "batch": batch,
         "ours_over_diffusers": None if args.demo else figure("ours", beta, batch) / figure("diffusers GLIGEN", beta, batch),
         "compiled_over_eager": figure("ours compiled", beta, batch) / figure("ours", beta, batch)}
        for batch in (1, 4) for beta in BETAS
    ]
    print(f"\n{'batch':>5} {'beta':>5} {'ours':>10} {'compiled':>10} {'comp/eager':>10} {'ours/diff':>10}")
    for c in comparisons:
        b, beta = c["batch"], c["beta"]
        over_diffusers = "" if c["ours_over_diffusers"] is None else f"{c['ours_over_diffusers']:>10.3f}"
        print(f"{b:>5} {beta:>5} {figure('ours', beta, b):>10.3f} {figure('ours compiled', beta, b):>10.3f} "
              f"{c['compiled_over_eager']:>10.3f} {over_diffusers}")
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "config": "bundled demo model" if args.demo else "tiny test components" if tiny else "SD-1.4 shapes, random weights",
        "dtype": str(dtype).removeprefix("torch."), "size": size, "steps": args.steps, "guidance": 7.5,
        "scheduler": "DDIMScheduler", "attention": "sdpa", "entities": len(DEMO_ENTITIES if args.demo else ENTITIES), "repeats": args.repeats,
        "results": rows, "comparisons": comparisons,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
