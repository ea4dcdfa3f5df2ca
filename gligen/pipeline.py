"""GligenPipeline: layouts in, images out, on a diffusers Stable Diffusion base (1.x, 2.x, XL) plus a grounding adapter.

A `diffusers.DiffusionPipeline`: its components are registered (`vae`, `text_encoder`, `tokenizer`,
`unet`, `scheduler`, and the optional `adapter`, `image_encoder`, `feature_extractor`,
`text_encoder_2`, `tokenizer_2`, `controlnet`), so `.to(device, dtype)`, model and sequential CPU
offload, `save_pretrained` / `from_pretrained`, LoRA, textual inversion, IP-Adapter and single-file
loading work as on diffusers' own pipelines.

One call of the pipeline:
1. each layout keeps at most `max_entities` entities (the largest), padded to `max_entities` slots;
2. prompts and phrases (and reference images) are encoded (`gligen.prompts`: one text encoder,
   or SDXL's two), and the grounding tokens computed ONCE for the whole call, with the null
   grounding for the unconditional half of classifier-free guidance;
3. the denoising loop runs ONE batched UNet call per step, [unconditional; conditional], the
   fusers at the step's scheduled-sampling scale (none at all at scale 0);
4. the latents are decoded and post-processed as diffusers' pipelines do.

Randomness: without a `generator`, layout i draws from its own `torch.Generator("cpu").manual_seed(layout.seed)`:
first its initial latents (as diffusers draws them for batch 1 with that generator), then for inpainting
the sample of the encoded image and each step's noise for the region kept (drawn as
`torch.randn_like(image latents)` draws), and the scheduler's noise (ancestral samplers).
diffusers' GLIGEN pipelines draw the inpainting noise from the global torch RNG instead; with the
global RNG set to the generator's state after the initial latents the two agree exactly
(tests/test_pipeline_parity.py). A `generator` (one, or one per image) replaces the seeds, as in diffusers.
"""

from __future__ import annotations

import inspect
import itertools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import (
    FromSingleFileMixin,
    IPAdapterMixin,
    StableDiffusionLoraLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
    TextualInversionLoaderMixin,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from gligen.adapter import GroundingAdapter
from gligen.base import FrozenBase, is_sdxl, keep_sdxl_vae_in_fp32, load_component, load_image_encoder, model_index
from gligen.bundled import DEMO, resolve_model
from gligen.errors import UserError
from gligen.files import open_image, write_json
from gligen.grounding import GroundingInputs, add_style, encode_images, pad_entities, scatter_embeds
from gligen.keypoints import ignored_keypoints, keypoint_tensors
from gligen.layout import MAX_ENTITIES, Layout
from gligen.masks import (DEFAULT_FEATHER, MaskLike, as_mask, composite, feather_weights, fit_image, fit_mask,
                          latent_keep_mask, union_mask)
from gligen.plms import PLMSScheduler
from gligen.maps import DEFAULT_SCHEDULES, LABEL_TYPES
from gligen.maps.encode import load_map
from gligen.prompts import PromptEmbeds, PromptEncoder, time_ids
from gligen.schedule import DEFAULT_SCHEDULE, Schedule, grounding_scales

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "plms": "PLMSScheduler",  # official GLIGEN's sampler (gligen.plms)
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp": "DPMSolverMultistepScheduler",
    "dpmpp_single": "DPMSolverSinglestepScheduler",
    "deis": "DEISMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
}
OUR_SCHEDULERS = {"PLMSScheduler": PLMSScheduler}
ATTENTION = ("sdpa", "xformers")
INPAINT_CHANNELS = 9  # noisy latent (4) + masked image latent (4) + mask (1)
ADAPTER_FOLDER = "adapter"


def make_scheduler(name: str, config: dict) -> Any:
    """A diffusers scheduler by short name (`SCHEDULERS`) or class name, built from a scheduler config."""
    class_name = SCHEDULERS.get(name, name)
    scheduler_class = OUR_SCHEDULERS.get(class_name) or getattr(diffusers, class_name, None)
    if scheduler_class is None or not class_name.endswith("Scheduler"):
        raise UserError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)} or a diffusers class name")
    return scheduler_class.from_config(config)


@dataclass
class GligenPipelineOutput(BaseOutput):
    """`images`: one per layout (times `num_images_per_prompt`), in order: PIL images, (H,W,3) arrays, (3,H,W)
    tensors or latents, as `output_type` says (a list, since layouts of one call may differ in size)."""

    images: list


@dataclass
class Inpainting:
    """What grounded inpainting adds to each step, and to the decoded image.

    latents (B,4,h,w): the encoded input image; mask (B,1,h,w): 0 in the cells to repaint, 1 elsewhere.
    With keep_outside: original (B,3,H,W), the input image in [-1, 1], and weights (B,1,H,W), the share of the
    generated image in the output (`gligen.masks.feather_weights`).
    """

    latents: torch.Tensor
    mask: torch.Tensor
    original: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    def composite(self, image: torch.Tensor) -> torch.Tensor:
        """The decoded image (B,3,H,W) laid over the input where `weights` say (float32); as it is without them."""
        return image if self.weights is None else composite(image, self.original, self.weights)

    def condition(self, copies: int) -> torch.Tensor:
        """The extra UNet input channels [masked image latent, mask], repeated `copies` times: (copies*B,5,h,w)."""
        return torch.cat([self.latents * self.mask, self.mask], dim=1).repeat(copies, 1, 1, 1)

    def keep_outside_boxes(self, latents: torch.Tensor, noise: torch.Tensor, scheduler, t: torch.Tensor
                           ) -> torch.Tensor:
        """Outside the boxes, the latents become the input image noised to step `t`. -> (B,4,h,w)"""
        noised = scheduler.add_noise(self.latents, noise, t.reshape(1))
        return noised * self.mask + latents * (1 - self.mask)


@dataclass
class Control:
    """ControlNet conditioning of one batch: images (copies*B,3,H,W) in [0,1], per-net scales, active fraction."""

    images: torch.Tensor | list[torch.Tensor]
    scale: float | list[float]
    start: float
    end: float

    def residuals(self, controlnet, model_input, t, unet_kwargs: dict, call: int, calls: int):
        """diffusers' ControlNet residuals for this call (scaled to 0 outside [start, end] of the steps)."""
        keep = 1.0 - float(call / calls < self.start or (call + 1) / calls > self.end)
        scale = [s * keep for s in self.scale] if isinstance(self.scale, list) else self.scale * keep
        extra = {"added_cond_kwargs": unet_kwargs["added_cond_kwargs"]} if "added_cond_kwargs" in unet_kwargs else {}
        down, mid = controlnet(model_input, t, encoder_hidden_states=unet_kwargs["encoder_hidden_states"],
                               controlnet_cond=self.images, conditioning_scale=scale, guess_mode=False,
                               return_dict=False, **extra)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


@dataclass
class _Group:
    """The inputs of one batch of same-size images (see `GligenPipeline.__call__`)."""

    layouts: list[Layout]
    generator: torch.Generator | list[torch.Generator]
    latents: torch.Tensor | None
    prompt_embeds: PromptEmbeds | None
    negative_prompt_embeds: PromptEmbeds | None
    inpaint_images: list[Image.Image] | None
    inpaint_masks: list[MaskLike] | None
    control_images: list | None


class GligenPipeline(DiffusionPipeline, StableDiffusionMixin, TextualInversionLoaderMixin,
                     StableDiffusionLoraLoaderMixin, IPAdapterMixin, FromSingleFileMixin):
    """Grounded text-to-image (text-box, text-image-box) and grounded inpainting on a diffusers SD base.

    `adapter` (a `GroundingAdapter`, or None for plain Stable Diffusion) is attached to `unet`
    here; `image_encoder` / `feature_extractor` (CLIP vision) are needed for reference images and
    IP-Adapter images only. An SDXL base also gives `text_encoder_2` and `tokenizer_2`; with
    `force_zeros_for_empty_prompt` (SDXL's default) an empty negative prompt is the zero embedding,
    as in diffusers. `controlnet` (a `ControlNetModel` or several) adds its residuals to the UNet's,
    as diffusers' ControlNet pipelines do.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->unet->vae"
    _optional_components = ["adapter", "image_encoder", "feature_extractor", "text_encoder_2", "tokenizer_2",
                            "controlnet"]
    _exclude_from_cpu_offload = ["adapter"]  # its fusers live in the UNet and move with it
    _callback_tensor_inputs = ["latents", "prompt_embeds", "grounding_tokens"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, adapter: GroundingAdapter | None = None,
                 image_encoder=None, feature_extractor=None, text_encoder_2=None, tokenizer_2=None, controlnet=None,
                 force_zeros_for_empty_prompt: bool = True):
        super().__init__()
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(controlnet)
        if adapter is not None:
            adapter.to(device=unet.device, dtype=unet.dtype)
            adapter.attach(unet)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              adapter=adapter, image_encoder=image_encoder, feature_extractor=feature_extractor,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, controlnet=controlnet)
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.vae_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True)
        self.control_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True,
                                                   do_normalize=False)
        self.set_progress_bar_config(desc="denoise", leave=False)
        self._warned: set[str] = set()

    @property
    def prompt_encoder(self) -> PromptEncoder:
        """The text side: one tokenizer and text encoder, or SDXL's two (the current components)."""
        return PromptEncoder(self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2)

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        return self.config.force_zeros_for_empty_prompt

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def inpaints(self) -> bool:
        """Whether the UNet (with the adapter's extra input channels) takes the 9-channel inpainting input."""
        extra = self.adapter.config.extra_in_channels if self.adapter is not None else 0
        return self.unet.config.in_channels + extra == INPAINT_CHANNELS

    @property
    def default_schedule(self) -> Schedule:
        """The scheduled sampling the model was released with: the adapter's own (`AdapterConfig.schedule`), else its
        map condition's, else GLIGEN's box default."""
        if self.adapter is None:
            return DEFAULT_SCHEDULE
        config = self.adapter.config
        if config.schedule is not None:
            return config.schedule
        return DEFAULT_SCHEDULES[config.condition.type] if config.condition is not None else DEFAULT_SCHEDULE

    def set_attention(self, kind: str) -> None:
        """'sdpa' (PyTorch scaled_dot_product_attention, diffusers' default) or 'xformers', on every attention."""
        if kind not in ATTENTION:
            raise UserError(f"unknown attention {kind!r}; use one of {', '.join(ATTENTION)}")
        if kind == "xformers":
            try:
                self.unet.enable_xformers_memory_efficient_attention()
            except (ModuleNotFoundError, ValueError) as error:
                raise UserError(f"xformers attention is not available: {error}") from None
        else:
            self.unet.set_attn_processor(AttnProcessor2_0())

    def set_adapter(self, adapter: GroundingAdapter | None) -> None:
        """Replace the grounding adapter (None: plain Stable Diffusion). Attention processors are left as they are."""
        if self.adapter is not None:
            self.adapter.detach(self.unet)
        if adapter is not None:
            adapter.to(device=self.unet.device, dtype=self.unet.dtype)
            adapter.attach(self.unet)
        self.register_modules(adapter=adapter)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        """diffusers' LoRA loading (UNet and text encoder(s)); SDXL bases load as `StableDiffusionXLPipeline` does."""
        mixin = StableDiffusionXLLoraLoaderMixin if self.is_sdxl else StableDiffusionLoraLoaderMixin
        return mixin.load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)

    def load_ip_adapter(self, *args, **kwargs) -> None:
        """diffusers' IP-Adapter loading, on the base UNet: diffusers numbers the UNet's attention processors
        to place the IP-Adapter's weights, so the fusers' own attentions are detached meanwhile."""
        self._without_fusers(IPAdapterMixin.load_ip_adapter, *args, **kwargs)

    def unload_ip_adapter(self) -> None:
        self._without_fusers(IPAdapterMixin.unload_ip_adapter)

    def _without_fusers(self, method, *args, **kwargs):
        if self.adapter is not None:
            self.adapter.detach(self.unet)
        try:
            return method(self, *args, **kwargs)
        finally:
            if self.adapter is not None:
                self.adapter.attach(self.unet)

    def enable_vae_slicing(self) -> None:
        """Decode the images of a batch one at a time (less memory)."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Decode (and encode) in overlapping tiles: large images in little memory."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None):
        """diffusers' sequential offload; the adapter's fusers are offloaded as parts of the UNet, its position net
        on its own."""
        adapter = self.adapter
        self.register_modules(adapter=None)  # its fusers are offloaded with the UNet: no second move
        try:
            super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
        finally:
            self.register_modules(adapter=adapter)
        if adapter is not None:
            from accelerate import cpu_offload

            cpu_offload(adapter.position_net, self._offload_device)
            if adapter.image_projection is not None:
                cpu_offload(adapter.image_projection, self._offload_device)

    # --- compiled fast path ---

    def compile(self, mode: str | None = None, backend: str = "inductor", channels_last: bool = True,
                fuse_qkv: bool = True, fullgraph: bool = False) -> GligenPipeline:
        """`torch.compile` the UNet (fusers included), in place. Returns self.

        `mode` defaults to "reduce-overhead" (CUDA graphs) on CUDA and to inductor's default elsewhere.
        The grounding scale lives in the fusers' scale buffers, so a schedule causes no recompilation:
        one graph with grounding and one without (scale 0). `fuse_qkv` fuses the base attention's
        projections where diffusers offers it (not the fusers', so the adapter saves as it is);
        `channels_last` puts the UNet's convolutions in NHWC.
        """
        if fuse_qkv:
            from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

            for name, module in self.unet.named_modules():
                if isinstance(module, Attention) and ".fuser." not in name and module.processor.__class__ is AttnProcessor2_0:
                    module.fuse_projections(fuse=True)
                    module.set_processor(FusedAttnProcessor2_0())
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if mode is None and self.unet.device.type == "cuda":
            mode = "reduce-overhead"
        self.unet.compile(backend=backend, mode=mode, fullgraph=fullgraph)
        return self

    # --- loading and saving ---

    @classmethod
    def from_base(cls, base: FrozenBase, adapter: GroundingAdapter | None = None) -> GligenPipeline:
        """A pipeline on a loaded base (its networks used as they are, not copied) and an adapter."""
        return cls(base.vae, base.text_encoder, base.tokenizer, base.unet, base.scheduler, adapter,
                   image_encoder=base.image_encoder, feature_extractor=base.image_processor,
                   text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
                   force_zeros_for_empty_prompt=base.force_zeros_for_empty_prompt)

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        adapter: str | GroundingAdapter | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        scheduler: str | None = None,
        image_encoder: str | None = None,
        attention: str | None = None,
        revision: str | None = None,
        adapter_revision: str | None = None,
        controlnet=None,
        torch_dtype: torch.dtype | None = None,
    ) -> GligenPipeline:
        """Load a diffusers SD/SDXL directory or hub id plus an adapter, a diffusers GLIGEN pipeline, or a
        directory written by `GligenPipeline.save_pretrained`.

        `"demo"` is the bundled shapes-world base with its adapter (`gligen.demo`).

        `adapter` is an adapter directory, a hub repository id (at `adapter_revision`) or a loaded
        `GroundingAdapter`; it replaces any adapter inside `model`. A GLIGEN pipeline
        (`StableDiffusionGLIGENPipeline`, `...TextImagePipeline`, or an SDXL pipeline with a gated UNet:
        GLIGEN-XL) has its UNet split into the plain base and its adapter. `image_encoder` (a CLIP
        vision directory or hub id) serves text-image-box adapters on a plain base; a GLIGEN text-image
        pipeline brings its own. `scheduler` replaces the model's scheduler (a short name such as 'ddim',
        'plms', 'euler_a', 'dpmpp' or a diffusers class name). `attention` ('sdpa', 'xformers') sets
        every attention processor; by default the model's are kept. `dtype` (or diffusers'
        `torch_dtype`) defaults to float32.
        """
        dtype = dtype or torch_dtype or torch.float32
        if model == DEMO:  # the bundled shapes world: base and adapter together
            adapter = adapter or DEMO
        model = resolve_model(model, "base")
        if isinstance(adapter, str):
            adapter = resolve_model(adapter, "adapter")
        base = FrozenBase.from_pretrained(model, dtype, revision)
        index = model_index(model, revision)
        if scheduler is not None:
            base.scheduler = make_scheduler(scheduler, base.scheduler.config)
        inside = None
        if (index.get(ADAPTER_FOLDER) or [None, None])[1] is not None:
            inside = GroundingAdapter.from_pretrained(model, dtype, revision=revision, subfolder=ADAPTER_FOLDER)
        for name in ("image_encoder", "feature_extractor"):
            if (index.get(name) or [None, None])[1] is not None:
                setattr(base, "image_processor" if name == "feature_extractor" else name,
                        load_component(model, index, name, dtype, revision))
        if base.unet.config.attention_type in ("gated", "gated-text-image"):
            from gligen.convert import split_gligen_unet

            if "image_project" in index:
                base.image_projection = load_component(model, index, "image_project", dtype, revision).project
                base.image_encoder = load_component(model, index, "image_encoder", dtype, revision)
                base.image_processor = load_component(model, index, "processor", dtype, revision)
            base.unet, inside = split_gligen_unet(base.unet, base.image_projection,
                                                  phrase_embedding="projected" if base.is_sdxl else "pooler_output")
        if isinstance(adapter, str):
            adapter = GroundingAdapter.from_pretrained(adapter, dtype, revision=adapter_revision)
        if image_encoder is not None:
            base.image_encoder, base.image_processor = load_image_encoder(image_encoder, dtype)
        pipeline = cls.from_base(base.to(device), adapter if adapter is not None else inside)
        if controlnet is not None:
            pipeline.register_modules(controlnet=MultiControlNetModel(controlnet) if isinstance(controlnet, (list, tuple))
                                      else controlnet)
            pipeline.controlnet.to(device=device, dtype=dtype)
        if attention is not None:
            pipeline.set_attention(attention)
        return pipeline

    @classmethod
    def from_single_file(cls, path: str, adapter: str | GroundingAdapter | None = None, **kwargs) -> GligenPipeline:
        """A community SD-1.x / SDXL single-file checkpoint (.safetensors), loaded by diffusers' own single-file
        loader (`config=` a local diffusers pipeline directory keeps it offline), with an adapter attached.

        SD or SDXL: that of the `config` pipeline (its model_index.json: SDXL has a second text encoder), else
        inferred by diffusers from the checkpoint's keys and shapes (which knows the released models only).
        """
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

        if kwargs.get("config") is not None:
            sdxl = is_sdxl(model_index(kwargs["config"]))
        else:
            sdxl = infer_diffusers_model_type(load_single_file_checkpoint(path)).startswith("xl")
        reference = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        loaded = reference.from_single_file(path, safety_checker=None, requires_safety_checker=False, **kwargs)
        if isinstance(adapter, str):
            adapter = GroundingAdapter.from_pretrained(resolve_model(adapter, "adapter"), loaded.unet.dtype)
        parts = {name: getattr(loaded, name, None) for name in ("text_encoder_2", "tokenizer_2")}
        return cls(loaded.vae, loaded.text_encoder, loaded.tokenizer, loaded.unet, loaded.scheduler, adapter,
                   force_zeros_for_empty_prompt=getattr(loaded.config, "force_zeros_for_empty_prompt", True), **parts)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """A diffusers pipeline directory: the plain base components as diffusers writes them, and the adapter
        in `adapter/` (adapter_config.json + adapter.safetensors), listed in model_index.json."""
        adapter = self.adapter
        if adapter is not None:
            adapter.detach(self.unet)
            self.register_modules(adapter=None)
        try:
            super().save_pretrained(save_directory, **kwargs)
            if adapter is not None:
                adapter.save_pretrained(Path(save_directory) / ADAPTER_FOLDER)
                index_path = Path(save_directory) / "model_index.json"
                index = json.loads(index_path.read_text())
                index[ADAPTER_FOLDER] = ["gligen", type(adapter).__name__]
                write_json(index_path, index)
        finally:
            if adapter is not None:
                adapter.attach(self.unet)
                self.register_modules(adapter=adapter)

    # --- generation ---

    @torch.no_grad()
    def __call__(
        self,
        layouts: Layout | Sequence[Layout],
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        schedule: Schedule | None = None,
        inpaint_image: Image.Image | Sequence[Image.Image] | None = None,
        inpaint_mask: MaskLike | Sequence[MaskLike] | None = None,
        keep_outside: bool = False,
        feather: int = DEFAULT_FEATHER,
        output_type: str = "pil",
        max_entities: int = MAX_ENTITIES,
        eta: float = 0.0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
        cross_attention_kwargs: dict | None = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        callback_on_step_end: Callable[[GligenPipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        return_dict: bool = True,
        progress: bool | None = None,
    ) -> GligenPipelineOutput | tuple:
        """Images of layouts, in order (`.images`): PIL images ('pil'), (H,W,3) float arrays in [0,1] ('np'),
        (3,H,W) tensors ('pt') or latents ('latent').

        Layouts of one size run as one batch. `inpaint_image` (one image, or one per layout) is
        repainted inside the entity boxes: an inpainting UNet (9 input channels) also sees the masked
        image; any other UNet repaints by latent blending alone (outside the boxes the latents are the
        image's, noised to each step, as in Blended Latent Diffusion).
        The region repainted is the union of the entities' masks (`Entity.mask`; boxes where an entity has
        none), or `inpaint_mask` (one, or one per layout: a PIL image, light = repaint, or an (H, W) bool
        array or tensor, True = repaint; fitted to the layout as the image is) when given; every latent cell
        holding a pixel of it is repainted. `keep_outside` lays the decoded image over the input: pixels
        farther than `feather` pixels from the region are the input's exactly, a linear ramp leads to the
        generated ones inside it (`gligen.masks`).
        `max_entities` is both the most entities kept per layout (the largest, with a warning)
        and the number of grounding slots (the released models were trained with 30). An entity's
        `image` (text-image-box) is a path or a PIL image; an entity with an image and an empty
        phrase grounds the image alone (official GLIGEN's style token: give it the box (0, 1, 0, 1)).

        As in diffusers: `generator` (one, or one per image) replaces the layouts' seeds; `latents`
        (images, C, h, w) are the initial noise; `num_images_per_prompt` images per layout;
        `prompt_embeds` / `negative_prompt_embeds` (layouts, L, C) (SDXL: and the pooled ones) replace
        the encoded prompts; `clip_skip`; `cross_attention_kwargs` (e.g. {"scale": lora_scale});
        `control_image` (one image, a list per ControlNet, or per layout) with the ControlNet settings;
        `ip_adapter_image` / `ip_adapter_image_embeds` (one tensor per IP-Adapter, [negative; positive]
        when guided); `callback_on_step_end(pipe, call, t, tensors)` after every UNet call, with the
        tensors named in `callback_on_step_end_tensor_inputs` ('latents', 'prompt_embeds',
        'grounding_tokens'); what it returns replaces them. `progress` shows (True) or hides (False) the
        denoising bar for this call; None leaves it to `set_progress_bar_config`. `schedule` defaults
        to the model's (`default_schedule`).
        """
        layouts = [layouts] if isinstance(layouts, Layout) else list(layouts)
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise UserError(f"callback tensor inputs must be among {self._callback_tensor_inputs}, got {sorted(unknown)}")
        images = self._per_layout(inpaint_image, len(layouts), "images to inpaint")
        masks = self._inpaint_masks(inpaint_mask, len(layouts), images is not None, keep_outside, feather, output_type)
        controls = self._control_images(control_image, len(layouts))
        self.validate(layouts, inpainting=images is not None)
        layouts = [layout.keep_largest(max_entities) for layout in layouts]
        schedule = schedule or self.default_schedule
        prompts = self._given_embeds(prompt_embeds, pooled_prompt_embeds, len(layouts), "prompt_embeds")
        negatives = self._given_embeds(negative_prompt_embeds, negative_pooled_prompt_embeds, len(layouts),
                                       "negative_prompt_embeds")
        count = len(layouts) * num_images_per_prompt
        own = [i // num_images_per_prompt for i in range(count)]  # image -> its layout
        generators = self._generators(generator, layouts, num_images_per_prompt, count)
        if latents is not None and len(latents) != count:
            raise UserError(f"got latents for {len(latents)} images, expected {count}")
        ip_embeds = self._ip_adapter_embeds(ip_adapter_image, ip_adapter_image_embeds, guidance_scale > 1.0)

        def rows(values, index):
            return None if values is None else [values[i] for i in index]

        outputs: list = [None] * count
        size = lambda i: (layouts[own[i]].width, layouts[own[i]].height)  # noqa: E731
        for _, group in itertools.groupby(sorted(range(count), key=size), key=size):
            group = list(group)
            by_layout = [own[i] for i in group]
            batch = _Group(
                [layouts[i] for i in by_layout],
                generators if isinstance(generators, torch.Generator) else rows(generators, group),
                None if latents is None else latents[group],
                None if prompts is None else prompts.rows(by_layout),
                None if negatives is None else negatives.rows(by_layout),
                rows(images, by_layout), rows(masks, by_layout), rows(controls, by_layout),
            )
            results = self._generate(batch, num_inference_steps, guidance_scale, schedule, output_type, max_entities,
                                     eta, clip_skip, cross_attention_kwargs, ip_embeds, (keep_outside, feather),
                                     (controlnet_conditioning_scale, control_guidance_start, control_guidance_end),
                                     callback_on_step_end, callback_on_step_end_tensor_inputs, progress)
            for i, result in zip(group, results):
                outputs[i] = result
        self.maybe_free_model_hooks()
        return GligenPipelineOutput(images=outputs) if return_dict else (outputs,)

    def validate(self, layouts: Sequence[Layout], inpainting: bool = False) -> None:
        """Raise a UserError for what this pipeline cannot do with these layouts, before any work."""
        if self.inpaints and not inpainting:
            raise UserError("this model inpaints: give an image to repaint (--inpaint-image)")
        if not inpainting and any(e.mask is not None for layout in layouts for e in layout.entities):
            self._warn_once("entity masks are ignored: they choose what inpainting repaints (give --inpaint-image)")
        feature_type = self.adapter.config.feature_type if self.adapter is not None else None
        images = [e.image for layout in layouts for e in layout.entities if e.image is not None]
        images += [layout.style for layout in layouts if layout.style]
        if images and feature_type != "text-image-box":
            self._warn_once("reference and style images are ignored: the model grounds no images")
        elif images and self.image_encoder is None:
            raise UserError(f"image {_describe(images[0])} needs an image encoder (give --image-encoder)")
        for message in ignored_keypoints(layouts, self.adapter.config.max_persons if feature_type == "keypoint" else None):
            self._warn_once(message)
        self._validate_conditions(layouts)

    def _validate_conditions(self, layouts: Sequence[Layout]) -> None:
        """A layout's map must be of the kind the adapter grounds, and a map adapter needs one."""
        condition = self.adapter.config.condition if self.adapter is not None else None
        for layout in layouts:
            given = layout.condition.type if layout.condition is not None else None
            if condition is None and given is not None:
                raise UserError(f"layout {layout.prompt!r}: this model grounds no maps, so it cannot use the "
                                f"{given!r} condition {layout.condition.image}")
            if condition is not None and given != condition.type:
                got = f"has a {given!r} map" if given else "has no 'condition'"
                raise UserError(f"layout {layout.prompt!r} {got}, but this model grounds {condition.type!r} maps")
        if condition is not None and self.adapter.position_net is None and any(layout.entities for layout in layouts):
            self._warn_once(f"entity boxes are ignored: the model grounds {condition.type!r} maps only")

    def _warn_once(self, message: str) -> None:
        """Warn about what this pipeline ignores once, not on every call (a CLI validates, then calls per layout)."""
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=4)

    def _generate(self, batch: _Group, num_steps, guidance_scale, schedule, output_type, slots, eta, clip_skip,
                  cross_attention_kwargs, ip_embeds, outside_settings, control_settings, callback, callback_inputs,
                  progress) -> list:
        """Generate one batch of same-size images (see `__call__`)."""
        layouts, device = batch.layouts, self._execution_device
        guided = guidance_scale > 1.0
        text = self.encode_prompts(layouts, guided, clip_skip, batch.prompt_embeds, batch.negative_prompt_embeds)
        unet_kwargs = text.unet_kwargs(self.time_ids(layouts, guided) if text.pooled is not None else None)
        if ip_embeds is not None:
            copies = len(layouts)
            embeds = [torch.cat([e[:1].repeat(copies, *[1] * (e.ndim - 1)), e[-1:].repeat(copies, *[1] * (e.ndim - 1))])
                      if guided else e[-1:].repeat(copies, *[1] * (e.ndim - 1)) for e in ip_embeds]
            unet_kwargs.setdefault("added_cond_kwargs", {})["image_embeds"] = [e.to(device, self.unet.dtype) for e in embeds]
        tokens = map_channels = None
        if self.adapter is not None:
            grounding = self.grounding_inputs(layouts, slots)
            grounding = grounding.with_null_half() if guided else grounding
            tokens = self.adapter(grounding)

        self.scheduler.set_timesteps(num_steps, device=device)
        timesteps = self.scheduler.timesteps
        call_steps = getattr(self.scheduler, "call_steps", None) or list(range(len(timesteps)))
        scales = grounding_scales(call_steps[-1] + 1, schedule)
        height, width = layouts[0].height, layouts[0].width
        shape = (len(layouts), self.vae.config.latent_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        latents = batch.latents.to(device, self.unet.dtype) if batch.latents is not None else \
            randn_tensor(shape, generator=batch.generator, device=device, dtype=self.unet.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        row_generators = batch.generator if isinstance(batch.generator, list) else [batch.generator] * len(layouts)
        inpainting = self.prepare_inpainting(layouts, batch.inpaint_images, row_generators, batch.inpaint_masks,
                                             *outside_settings)
        control = self._prepare_control(batch.control_images, layouts, guided, *control_settings)
        step_kwargs = self._step_kwargs(batch.generator, eta)
        extra_kwargs = dict(cross_attention_kwargs or {})
        if tokens is not None:
            map_channels = self.adapter.map_channels(grounding, shape[2:])

        bar = self.progress_bar(timesteps) if progress is None else \
            tqdm(timesteps, desc="denoise", disable=not progress, leave=False)
        for i, t in enumerate(bar):
            step = call_steps[i]
            if inpainting is not None and (i == 0 or call_steps[i - 1] != step):
                noise = randn_like(inpainting.latents, row_generators)
                latents = inpainting.keep_outside_boxes(latents, noise, self.scheduler, t)
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            residuals = {}
            if control is not None:
                residuals = control.residuals(self.controlnet, model_input, t, unet_kwargs, i, len(timesteps))
            if inpainting is not None and self.inpaints:
                model_input = torch.cat([model_input, inpainting.condition(2 if guided else 1)], dim=1)
            if map_channels is not None and scales[step] > 0:  # at scale 0 the base's first conv alone, as official
                model_input = torch.cat([model_input, map_channels.to(self.unet.dtype)], dim=1)
            if tokens is not None:
                kwargs = self.adapter.cross_attention_kwargs(tokens, scales[step], extra_kwargs,
                                                             latent_size=latents.shape[2:])
            else:
                kwargs = extra_kwargs or None
            noise_pred = self.unet(model_input, t, cross_attention_kwargs=kwargs, **unet_kwargs, **residuals).sample
            if guided:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
            if callback is not None:
                available = {"latents": latents, "prompt_embeds": unet_kwargs["encoder_hidden_states"],
                             "grounding_tokens": tokens}
                changed = callback(self, i, t, {name: available[name] for name in callback_inputs}) or {}
                latents = changed.get("latents", latents)
                unet_kwargs["encoder_hidden_states"] = changed.get("prompt_embeds", unet_kwargs["encoder_hidden_states"])
                tokens = changed.get("grounding_tokens", tokens)

        if output_type == "latent":
            return list(latents)
        if self.vae.dtype == torch.float16 and self.is_sdxl:
            keep_sdxl_vae_in_fp32(self.vae, torch.float16)
        latents = (latents / self.vae.config.scaling_factor).to(self.vae.dtype)
        image = self.vae.decode(latents, return_dict=False)[0]
        if inpainting is not None:
            image = inpainting.composite(image)
        return list(self.vae_processor.postprocess(image, output_type=output_type))

    def encode_prompts(self, layouts: Sequence[Layout], guided: bool, clip_skip: int | None = None,
                       prompt_embeds: PromptEmbeds | None = None, negative_prompt_embeds: PromptEmbeds | None = None
                       ) -> PromptEmbeds:
        """Prompt embeddings of B layouts, or of [negative prompts; prompts] (2B rows) when guided.

        Given `prompt_embeds` / `negative_prompt_embeds` (B rows) are used as they are; textual
        inversion tokens in the prompts are expanded as diffusers expands them.
        """
        encoder, device = self.prompt_encoder, self._execution_device

        def encode(texts: list[str]) -> PromptEmbeds:
            texts = self.maybe_convert_prompt(texts, self.tokenizer)
            return encoder.prompts(texts, clip_skip=clip_skip, device=device)

        embeds = prompt_embeds if prompt_embeds is not None else encode([layout.prompt for layout in layouts])
        if guided:
            negative = negative_prompt_embeds
            if negative is None:
                negative = encode([layout.negative_prompt for layout in layouts])
            if negative_prompt_embeds is None and self.is_sdxl and self.force_zeros_for_empty_prompt:
                for row, layout in enumerate(layouts):
                    if not layout.negative_prompt:
                        negative.hidden[row] = 0
                        negative.pooled[row] = 0
            embeds = negative.cat(embeds)
        pooled = None if embeds.pooled is None else embeds.pooled.to(device, self.unet.dtype)
        return PromptEmbeds(embeds.hidden.to(device, self.unet.dtype), pooled)

    def time_ids(self, layouts: Sequence[Layout], guided: bool) -> torch.Tensor:
        """SDXL's time ids (B or 2B, 6): the layout's size as original and target size, crop corner (0, 0)."""
        sizes = torch.tensor([[layout.height, layout.width] for layout in layouts], dtype=self.unet.dtype)
        ids = time_ids(sizes, torch.zeros_like(sizes), (layouts[0].height, layouts[0].width))
        return (torch.cat([ids, ids]) if guided else ids).to(self._execution_device)

    def grounding_inputs(self, layouts: Sequence[Layout], slots: int) -> GroundingInputs:
        """Boxes, masks, phrase embeddings (and reference image embeddings) padded to `slots` entities; the maps.

        Entities without a phrase (image-only) get phrase mask 0 and no phrase embedding.
        """
        device, dtype = self._execution_device, self.unet.dtype
        boxes, masks = pad_entities(layouts, slots, device=device, dtype=dtype)
        if self.adapter.position_net is None:  # a map alone: no entity tokens
            return self.with_maps(GroundingInputs(boxes, masks, None), layouts)
        counts = [len(layout.entities) for layout in layouts]
        phrases = [phrase for layout in layouts for phrase in layout.phrases]
        projected = self.adapter.config.projected_phrases
        encoded = self.prompt_encoder.phrases(self.maybe_convert_prompt(phrases, self.tokenizer), projected=projected,
                                              device=device)
        phrase_embeds = scatter_embeds(encoded, counts, slots).to(dtype)
        inputs = GroundingInputs(boxes, masks, phrase_embeds)
        if self.adapter.config.feature_type == "text-image-box":
            inputs.image_embeds, inputs.image_masks = self.reference_embeds(layouts, slots, phrase_embeds.shape[-1])
            phrase_masks = [[float(bool(e.phrase)) for e in layout.entities] for layout in layouts]
            if not all(all(row) for row in phrase_masks):
                inputs.phrase_masks = masks.clone()
                for b, row in enumerate(phrase_masks):
                    inputs.phrase_masks[b, :len(row)] = torch.tensor(row, device=device, dtype=dtype)
            styles = [open_image(layout.style) for layout in layouts if layout.style]
            if styles:
                embeds = encode_images(self.image_encoder, self.feature_extractor, self.adapter.image_projection, styles)
                add_style(inputs, [len(layout.entities) if layout.style else None for layout in layouts], embeds)
        if self.adapter.config.feature_type == "keypoint":
            people = [[(e.box, e.keypoints) for e in layout.entities] for layout in layouts]
            inputs.points, inputs.point_masks = keypoint_tensors(people, self.adapter.config.max_persons, device, dtype)
        return self.with_maps(inputs, layouts)

    def with_maps(self, inputs: GroundingInputs, layouts: Sequence[Layout]) -> GroundingInputs:
        """`inputs` with the layouts' condition maps (`gligen.maps.encode`) when the adapter grounds maps."""
        condition = self.adapter.config.condition
        if condition is not None:
            device, dtype = self._execution_device, self.unet.dtype
            maps = torch.stack([load_map(layout.condition.image, condition.type, layout.width, layout.height)
                                for layout in layouts]).to(device)
            inputs.maps = maps if condition.type in LABEL_TYPES else maps.to(dtype)
            inputs.map_masks = torch.ones(len(layouts), device=device, dtype=dtype)
        return inputs

    def reference_embeds(self, layouts: Sequence[Layout], slots: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference image embeddings (B,slots,D) and their masks (B,slots): 1 where an entity has an image
        (a path or a PIL image)."""
        device, dtype = self._execution_device, self.unet.dtype
        embeds = torch.zeros(len(layouts), slots, dim, device=device, dtype=dtype)
        masks = torch.zeros(len(layouts), slots, device=device, dtype=dtype)
        where = [(b, n) for b, layout in enumerate(layouts) for n, e in enumerate(layout.entities) if e.image is not None]
        if not where:
            return embeds, masks
        images = [_image(layouts[b].entities[n].image) for b, n in where]
        encoded = encode_images(self.image_encoder, self.feature_extractor, self.adapter.image_projection, images)
        for (b, n), embed in zip(where, encoded):
            embeds[b, n], masks[b, n] = embed, 1
        return embeds, masks

    def prepare_inpainting(self, layouts, images, generators, masks=None, keep_outside: bool = False,
                           feather: int = DEFAULT_FEATHER) -> Inpainting | None:
        """Encode the images to repaint (one sample each from its generator) and the cells to repaint: the
        layouts' entity masks and boxes, or the given `masks` (one per layout); with `keep_outside`, the
        input pixels and the weights of the composite."""
        if images is None:
            return None
        height, width = layouts[0].height, layouts[0].width
        device = self._execution_device
        pixels = self.vae_processor.preprocess([fit_image(image, width, height) for image in images], height, width)
        posterior = self.vae.encode(pixels.to(device, self.vae.dtype)).latent_dist
        latents = posterior.sample(generator=generators) * self.vae.config.scaling_factor
        given = [None if m is None else fit_mask(as_mask(m), width, height) for m in masks or [None] * len(layouts)]
        keep = torch.stack([latent_keep_mask(layout, mask, latents.shape[2:], self.vae_scale_factor)
                            for layout, mask in zip(layouts, given)])
        inpainting = Inpainting(latents.to(self.unet.dtype), keep[:, None].to(device, self.unet.dtype))
        if keep_outside:
            regions = [union_mask(layout.entities, width, height) if mask is None else mask
                       for layout, mask in zip(layouts, given)]
            inpainting.original = pixels.to(device, torch.float32)
            inpainting.weights = torch.stack([feather_weights(region, feather) for region in regions])[:, None].to(device)
        return inpainting

    def _prepare_control(self, images, layouts, guided: bool, scale, start: float, end: float) -> Control | None:
        """ControlNet inputs as diffusers' ControlNet pipelines prepare them: [0,1] pixels, twice when guided."""
        if images is None:
            return None
        if self.controlnet is None:
            raise UserError("a control image needs a ControlNet (give controlnet= when loading the pipeline)")
        height, width = layouts[0].height, layouts[0].width
        multi = isinstance(self.controlnet, MultiControlNetModel)

        def prepare(per_layout: list[Image.Image]) -> torch.Tensor:
            pixels = self.control_processor.preprocess(per_layout, height=height, width=width).to(torch.float32)
            pixels = pixels.to(self._execution_device, self.controlnet.dtype)
            return torch.cat([pixels] * 2) if guided else pixels

        if multi:
            nets = len(self.controlnet.nets)
            prepared = [prepare([image[k] for image in images]) for k in range(nets)]
            scale = scale if isinstance(scale, list) else [scale] * nets
            return Control(prepared, scale, start, end)
        return Control(prepare(images), scale, start, end)

    def _step_kwargs(self, generator, eta: float) -> dict:
        """`eta` and `generator` for schedulers whose `step` takes them."""
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs = {"eta": eta} if "eta" in accepted else {}
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    def _ip_adapter_embeds(self, images, embeds, guided: bool) -> list[torch.Tensor] | None:
        """One tensor per IP-Adapter, rows [negative; positive] when guided (diffusers' `ip_adapter_image_embeds`
        layout), from given embeddings or encoded from `images`."""
        if embeds is not None or images is None:
            return embeds
        from diffusers.models.embeddings import ImageProjection

        images = images if isinstance(images, list) else [images]
        layers = self.unet.encoder_hid_proj.image_projection_layers
        if len(images) != len(layers):
            raise UserError(f"got {len(images)} IP-Adapter images for {len(layers)} IP-Adapters")
        out = []
        for image, layer in zip(images, layers):
            pixels = self.feature_extractor(image, return_tensors="pt").pixel_values
            pixels = pixels.to(self._execution_device, self.image_encoder.dtype)
            if isinstance(layer, ImageProjection):
                positive = self.image_encoder(pixels).image_embeds
                negative = torch.zeros_like(positive)
            else:
                positive = self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
                negative = self.image_encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
            positive, negative = positive[None], negative[None]  # (1, images=1, ...), as diffusers lays them out
            out.append(torch.cat([negative, positive]) if guided else positive)
        return out

    def _given_embeds(self, hidden, pooled, count: int, name: str) -> PromptEmbeds | None:
        if hidden is None:
            return None
        if len(hidden) != count or (pooled is not None and len(pooled) != count):
            raise UserError(f"{name}: expected {count} rows (one per layout), got {len(hidden)}")
        if self.is_sdxl and pooled is None:
            raise UserError(f"{name}: an SDXL base also needs the pooled embeddings (pooled_{name})")
        return PromptEmbeds(hidden, pooled)

    @staticmethod
    def _generators(generator, layouts: Sequence[Layout], per_layout: int, count: int):
        """A generator per image (the layouts' seeds, shared by a layout's images), one for all, or the given list."""
        if generator is None:
            seeded = [torch.Generator("cpu").manual_seed(layout.seed) for layout in layouts]
            return [seeded[i // per_layout] for i in range(count)]
        if isinstance(generator, torch.Generator):
            return generator
        generator = list(generator)
        if len(generator) != count:
            raise UserError(f"got {len(generator)} generators for {count} images")
        return generator

    @staticmethod
    def _inpaint_masks(masks, count: int, inpainting: bool, keep_outside: bool, feather: int, output_type: str
                       ) -> list | None:
        """The free-form masks per layout (None: the layouts' own), checked with the other inpainting options."""
        if not inpainting and (masks is not None or keep_outside):
            raise UserError("an inpainting mask and keep_outside need an image to repaint (inpaint_image)")
        if keep_outside and output_type == "latent":
            raise UserError("keep_outside lays decoded images over the input; it does not apply to latents")
        if not (isinstance(feather, int) and feather >= 0):
            raise UserError(f"feather must be a whole number of pixels >= 0, got {feather!r}")
        if masks is None:
            return None
        if isinstance(masks, (Image.Image, np.ndarray, torch.Tensor)):
            return [masks] * count
        masks = list(masks)
        if len(masks) != count:
            raise UserError(f"got {len(masks)} inpainting masks for {count} layouts")
        return masks

    @staticmethod
    def _per_layout(images, count: int, what: str) -> list | None:
        if images is None or isinstance(images, Image.Image):
            return None if images is None else [images] * count
        images = list(images)
        if len(images) != count:
            raise UserError(f"got {len(images)} {what} for {count} layouts")
        return images

    def _control_images(self, images, count: int) -> list | None:
        """Control images per layout: for several ControlNets, a list (one per net) per layout."""
        if images is None:
            return None
        if isinstance(self.controlnet, MultiControlNetModel):
            nets = len(self.controlnet.nets)
            if isinstance(images, list) and len(images) == nets and all(isinstance(i, Image.Image) for i in images):
                return [images] * count
            return self._per_layout(images, count, "control image lists")
        return self._per_layout(images, count, "control images")


def randn_like(x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Standard normal noise shaped like x (B,...): row i drawn as `torch.randn_like(x[i:i+1])` from generators[i].

    The values of a CPU draw depend on the memory layout (strides) of the tensor it fills, so
    the noise is drawn into tensors laid out like `x`, as diffusers' `randn_like` draws.
    """
    rows = [torch.empty_like(x[i:i + 1], device="cpu").normal_(generator=g) for i, g in enumerate(generators)]
    return torch.cat(rows).to(x.device)


def _image(image: str | Image.Image) -> Image.Image:
    """A reference image given as a path or in memory."""
    return image.convert("RGB") if isinstance(image, Image.Image) else open_image(image)


def _describe(image: str | Image.Image) -> str:
    return image if isinstance(image, str) else f"an in-memory {image.size[0]}x{image.size[1]} image"

