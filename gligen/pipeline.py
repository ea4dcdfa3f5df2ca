"""GligenPipeline: layouts in, images out, on a diffusers Stable Diffusion base (1.x, 2.x, XL) plus a grounding adapter.

One call of the pipeline:
1. each layout keeps at most `max_entities` entities (the largest), padded to `max_entities` slots;
2. prompts and phrases (and reference images) are encoded (`gligen.prompts`: one text encoder,
   or SDXL's two), and the grounding tokens computed ONCE for the whole call, with the null
   grounding for the unconditional half of classifier-free guidance;
3. the denoising loop runs ONE batched UNet call per step, [unconditional; conditional], the
   fusers at the step's scheduled-sampling scale (none at all at scale 0);
4. the latents are decoded and post-processed as diffusers' pipelines do.

Randomness: layout i draws from its own `torch.Generator("cpu").manual_seed(layout.seed)`: first
its initial latents (as diffusers draws them for batch 1 with that generator), then for inpainting
the sample of the encoded image and each step's noise for the region kept (drawn as
`torch.randn_like(image latents)` draws), and the scheduler's noise (ancestral samplers).
diffusers' GLIGEN pipelines draw the inpainting noise from the global torch RNG instead; with the
global RNG set to the generator's state after the initial latents the two agree exactly
(tests/test_pipeline_parity.py).
"""

from __future__ import annotations

import inspect
import itertools
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import diffusers
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from gligen.adapter import GroundingAdapter
from gligen.base import FrozenBase, load_component, load_image_encoder, model_index
from gligen.bundled import DEMO, resolve_model
from gligen.errors import UserError
from gligen.files import open_image
from gligen.grounding import GroundingInputs, add_style, encode_images, pad_entities, scatter_embeds
from gligen.keypoints import check_persons, keypoint_tensors
from gligen.layout import MAX_ENTITIES, Layout
from gligen.prompts import PromptEmbeds, PromptEncoder, time_ids
from gligen.schedule import DEFAULT_SCHEDULE, Schedule, grounding_scales

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp": "DPMSolverMultistepScheduler",
    "dpmpp_single": "DPMSolverSinglestepScheduler",
    "deis": "DEISMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
ATTENTION = ("sdpa", "xformers")
INPAINT_CHANNELS = 9  # noisy latent (4) + masked image latent (4) + mask (1)


def make_scheduler(name: str, config: dict) -> Any:
    """A diffusers scheduler by short name (`SCHEDULERS`) or class name, built from a scheduler config."""
    class_name = SCHEDULERS.get(name, name)
    scheduler_class = getattr(diffusers, class_name, None)
    if scheduler_class is None or not class_name.endswith("Scheduler"):
        raise UserError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)} or a diffusers class name")
    return scheduler_class.from_config(config)


@dataclass
class Inpainting:
    """What grounded inpainting adds to each step.

    latents (B,4,h,w): the encoded input image; mask (B,1,h,w): 0 inside the boxes to repaint, 1 elsewhere.
    """

    latents: torch.Tensor
    mask: torch.Tensor

    def condition(self, copies: int) -> torch.Tensor:
        """The extra UNet input channels [masked image latent, mask], repeated `copies` times: (copies*B,5,h,w)."""
        return torch.cat([self.latents * self.mask, self.mask], dim=1).repeat(copies, 1, 1, 1)

    def keep_outside_boxes(self, latents: torch.Tensor, noise: torch.Tensor, scheduler, t: torch.Tensor
                           ) -> torch.Tensor:
        """Outside the boxes, the latents become the input image noised to step `t`. -> (B,4,h,w)"""
        noised = scheduler.add_noise(self.latents, noise, t.reshape(1))
        return noised * self.mask + latents * (1 - self.mask)


class GligenPipeline:
    """Grounded text-to-image (text-box, text-image-box) and grounded inpainting on a diffusers SD base.

    `adapter` (a `GroundingAdapter`, or None for plain Stable Diffusion) is attached to `unet`
    here; `image_encoder` / `image_processor` (CLIP vision) are needed for reference images only.
    An SDXL base also gives `text_encoder_2` and `tokenizer_2`; with `force_zeros_for_empty_prompt`
    (SDXL's default) an empty negative prompt is the zero embedding, as in diffusers.
    """

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, adapter: GroundingAdapter | None = None,
                 image_encoder=None, image_processor=None, text_encoder_2=None, tokenizer_2=None,
                 force_zeros_for_empty_prompt: bool = True):
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.prompt_encoder = PromptEncoder(tokenizer, text_encoder, tokenizer_2, text_encoder_2)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.unet, self.scheduler, self.adapter = unet, scheduler, adapter
        self.image_encoder, self.image_processor = image_encoder, image_processor
        if adapter is not None:
            adapter.to(device=unet.device, dtype=unet.dtype)
            adapter.attach(unet)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.vae_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def inpaints(self) -> bool:
        """Whether the UNet (with the adapter's extra input channels) takes the 9-channel inpainting input."""
        extra = self.adapter.config.extra_in_channels if self.adapter is not None else 0
        return self.unet.config.in_channels + extra == INPAINT_CHANNELS

    def set_attention(self, kind: str) -> None:
        """'sdpa' (PyTorch scaled_dot_product_attention, diffusers' default) or 'xformers'."""
        if kind not in ATTENTION:
            raise UserError(f"unknown attention {kind!r}; use one of {', '.join(ATTENTION)}")
        if kind == "xformers":
            try:
                self.unet.enable_xformers_memory_efficient_attention()
            except (ModuleNotFoundError, ValueError) as error:
                raise UserError(f"xformers attention is not available: {error}") from None
        else:
            self.unet.set_attn_processor(AttnProcessor2_0())

    # --- loading ---

    @classmethod
    def from_base(cls, base: FrozenBase, adapter: GroundingAdapter | None = None) -> GligenPipeline:
        """A pipeline on a loaded base (its networks used as they are, not copied) and an adapter."""
        return cls(base.vae, base.text_encoder, base.tokenizer, base.unet, base.scheduler, adapter, base.image_encoder,
                   base.image_processor, base.text_encoder_2, base.tokenizer_2, base.force_zeros_for_empty_prompt)

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        adapter: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        scheduler: str | None = None,
        image_encoder: str | None = None,
        attention: str = "sdpa",
    ) -> GligenPipeline:
        """Load a diffusers SD directory or hub id plus an adapter directory, or a diffusers GLIGEN pipeline.

        `"demo"` is the bundled shapes-world base with its adapter (`gligen.demo`).

        A GLIGEN pipeline (`StableDiffusionGLIGENPipeline` or `...TextImagePipeline`) has its UNet
        split into the plain base and its adapter; a given `adapter` replaces the one inside.
        `image_encoder` (a CLIP vision directory or hub id) serves text-image-box adapters on a plain
        base; a GLIGEN text-image pipeline brings its own. `scheduler` replaces the model's scheduler
        (a short name such as 'ddim', 'euler_a', 'dpmpp' or a diffusers class name).
        """
        if model == DEMO:  # the bundled shapes world: base and adapter together
            adapter = adapter or DEMO
        model, adapter = resolve_model(model, "base"), adapter and resolve_model(adapter, "adapter")
        base = FrozenBase.from_pretrained(model, dtype)
        if scheduler is not None:
            base.scheduler = make_scheduler(scheduler, base.scheduler.config)
        inside = None
        if base.unet.config.attention_type in ("gated", "gated-text-image"):
            from gligen.convert import split_gligen_unet

            index = model_index(model)
            if "image_project" in index:
                base.image_projection = load_component(model, index, "image_project", dtype).project
                base.image_encoder = load_component(model, index, "image_encoder", dtype)
                base.image_processor = load_component(model, index, "processor", dtype)
            base.unet, inside = split_gligen_unet(base.unet, base.image_projection)
        grounding = GroundingAdapter.from_pretrained(adapter, dtype) if adapter is not None else inside
        if image_encoder is not None:
            base.image_encoder, base.image_processor = load_image_encoder(image_encoder, dtype)
        pipeline = cls.from_base(base.to(device), grounding)
        pipeline.set_attention(attention)
        return pipeline

    # --- generation ---

    @torch.no_grad()
    def __call__(
        self,
        layouts: Layout | Sequence[Layout],
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        schedule: Schedule = DEFAULT_SCHEDULE,
        inpaint_image: Image.Image | Sequence[Image.Image] | None = None,
        output_type: str = "pil",
        max_entities: int = MAX_ENTITIES,
        eta: float = 0.0,
        progress: bool = False,
    ) -> list:
        """One image per layout, in order: PIL images ('pil'), (H,W,3) float arrays in [0,1] ('np'),
        (3,H,W) tensors ('pt') or latents ('latent').

        Layouts of one size run as one batch. `inpaint_image` (one image, or one per layout) is
        repainted inside the entity boxes; the UNet must take the 9-channel inpainting input.
        `max_entities` is both the most entities kept per layout (the largest, with a warning)
        and the number of grounding slots (the released models were trained with 30).
        """
        layouts = [layouts] if isinstance(layouts, Layout) else list(layouts)
        images = self._inpaint_images(inpaint_image, len(layouts))
        self.validate(layouts, inpainting=images is not None)
        layouts = [layout.keep_largest(max_entities) for layout in layouts]
        outputs: list = [None] * len(layouts)
        by_size = sorted(range(len(layouts)), key=lambda i: (layouts[i].width, layouts[i].height))
        for _, group in itertools.groupby(by_size, key=lambda i: (layouts[i].width, layouts[i].height)):
            group = list(group)
            results = self._generate(
                [layouts[i] for i in group], num_inference_steps, guidance_scale, schedule,
                [images[i] for i in group] if images else None, output_type, max_entities, eta, progress,
            )
            for i, result in zip(group, results):
                outputs[i] = result
        return outputs

    def validate(self, layouts: Sequence[Layout], inpainting: bool = False) -> None:
        """Raise a UserError for what this pipeline cannot do with these layouts, before any work."""
        if inpainting and not self.inpaints:
            raise UserError("this model does not inpaint: its UNet does not take the 9-channel inpainting input")
        if self.inpaints and not inpainting:
            raise UserError("this model inpaints: give an image to repaint (--inpaint-image)")
        feature_type = self.adapter.config.feature_type if self.adapter is not None else None
        images = [e.image for layout in layouts for e in layout.entities if e.image]
        images += [layout.style for layout in layouts if layout.style]
        if images and feature_type != "text-image-box":
            warnings.warn(f"reference and style images (such as {images[0]}) are ignored: the model grounds no "
                          "images", stacklevel=2)
        elif images and self.image_encoder is None:
            raise UserError(f"image {images[0]} needs an image encoder (give --image-encoder)")
        check_persons(layouts, self.adapter.config.max_persons if feature_type == "keypoint" else None)

    def _generate(self, layouts, num_steps, guidance_scale, schedule, inpaint_images, output_type, slots, eta,
                  progress) -> list:
        """Generate one batch of same-size layouts (see `__call__`)."""
        guided = guidance_scale > 1.0
        generators = [torch.Generator("cpu").manual_seed(layout.seed) for layout in layouts]
        text = self.encode_prompts(layouts, guided)
        unet_kwargs = text.unet_kwargs(self.time_ids(layouts, guided) if text.pooled is not None else None)
        tokens = None
        if self.adapter is not None:
            grounding = self.grounding_inputs(layouts, slots)
            tokens = self.adapter.tokens(grounding.with_null_half() if guided else grounding)

        self.scheduler.set_timesteps(num_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        scales = grounding_scales(len(timesteps), schedule)
        height, width = layouts[0].height, layouts[0].width
        shape = (len(layouts), self.vae.config.latent_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        inpainting = self.prepare_inpainting(layouts, inpaint_images, generators)
        step_kwargs = self._step_kwargs(generators, eta)

        for i, t in enumerate(tqdm(timesteps, desc="denoise", disable=not progress, leave=False)):
            if inpainting is not None:
                noise = randn_like(inpainting.latents, generators)
                latents = inpainting.keep_outside_boxes(latents, noise, self.scheduler, t)
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            if inpainting is not None:
                model_input = torch.cat([model_input, inpainting.condition(2 if guided else 1)], dim=1)
            kwargs = self.adapter.cross_attention_kwargs(tokens, scales[i]) if tokens is not None else None
            noise_pred = self.unet(model_input, t, cross_attention_kwargs=kwargs, **unet_kwargs).sample
            if guided:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample

        if output_type == "latent":
            return list(latents)
        latents = (latents / self.vae.config.scaling_factor).to(self.vae.dtype)
        image = self.vae.decode(latents, return_dict=False)[0]
        return list(self.vae_processor.postprocess(image, output_type=output_type))

    def encode_prompts(self, layouts: Sequence[Layout], guided: bool) -> PromptEmbeds:
        """Prompt embeddings of B layouts, or of [negative prompts; prompts] (2B rows) when guided."""
        texts = [layout.prompt for layout in layouts]
        if guided:
            texts = [layout.negative_prompt for layout in layouts] + texts
        embeds = self.prompt_encoder.prompts(texts)
        pooled = None if embeds.pooled is None else embeds.pooled.to(self.dtype)
        embeds = PromptEmbeds(embeds.hidden.to(self.dtype), pooled)
        if guided and self.prompt_encoder.is_sdxl and self.force_zeros_for_empty_prompt:
            for row, layout in enumerate(layouts):
                if not layout.negative_prompt:
                    embeds.hidden[row] = 0
                    embeds.pooled[row] = 0
        return embeds

    def time_ids(self, layouts: Sequence[Layout], guided: bool) -> torch.Tensor:
        """SDXL's time ids (B or 2B, 6): the layout's size as original and target size, crop corner (0, 0)."""
        sizes = torch.tensor([[layout.height, layout.width] for layout in layouts], dtype=self.dtype)
        ids = time_ids(sizes, torch.zeros_like(sizes), (layouts[0].height, layouts[0].width))
        return (torch.cat([ids, ids]) if guided else ids).to(self.device)

    def grounding_inputs(self, layouts: Sequence[Layout], slots: int) -> GroundingInputs:
        """Boxes, masks, phrase embeddings (and reference image embeddings) padded to `slots` entities."""
        boxes, masks = pad_entities(layouts, slots, device=self.device, dtype=self.dtype)
        counts = [len(layout.entities) for layout in layouts]
        phrases = [phrase for layout in layouts for phrase in layout.phrases]
        phrase_embeds = scatter_embeds(self.prompt_encoder.phrases(phrases), counts, slots)
        inputs = GroundingInputs(boxes, masks, phrase_embeds.to(self.dtype))
        if self.adapter.config.feature_type == "text-image-box":
            inputs.image_embeds, inputs.image_masks = self.reference_embeds(layouts, slots, phrase_embeds.shape[-1])
            styles = [open_image(layout.style) for layout in layouts if layout.style]
            if styles:
                embeds = encode_images(self.image_encoder, self.image_processor, self.adapter.image_projection, styles)
                add_style(inputs, [len(layout.entities) if layout.style else None for layout in layouts], embeds)
        if self.adapter.config.feature_type == "keypoint":
            people = [[(e.box, e.keypoints) for e in layout.entities] for layout in layouts]
            inputs.points, inputs.point_masks = keypoint_tensors(people, self.adapter.config.max_persons, self.device,
                                                                 self.dtype)
        return inputs

    def reference_embeds(self, layouts: Sequence[Layout], slots: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference image embeddings (B,slots,D) and their masks (B,slots): 1 where an entity has an image."""
        embeds = torch.zeros(len(layouts), slots, dim, device=self.device, dtype=self.dtype)
        masks = torch.zeros(len(layouts), slots, device=self.device, dtype=self.dtype)
        where = [(b, n) for b, layout in enumerate(layouts) for n, e in enumerate(layout.entities) if e.image]
        if not where:
            return embeds, masks
        images = [open_image(layouts[b].entities[n].image) for b, n in where]
        encoded = encode_images(self.image_encoder, self.image_processor, self.adapter.image_projection, images)
        for (b, n), embed in zip(where, encoded):
            embeds[b, n], masks[b, n] = embed, 1
        return embeds, masks

    def prepare_inpainting(self, layouts, images, generators) -> Inpainting | None:
        """Encode the images to repaint (one sample each from its layout's generator) and their box masks."""
        if images is None:
            return None
        height, width = layouts[0].height, layouts[0].width
        pixels = self.vae_processor.preprocess([_fit(image, width, height) for image in images], height, width)
        posterior = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        latents = posterior.sample(generator=generators) * self.vae.config.scaling_factor
        masks = torch.stack([box_mask(layout.boxes, latents.shape[2:]) for layout in layouts])
        return Inpainting(latents.to(self.dtype), masks[:, None].to(self.device, self.dtype))

    def _step_kwargs(self, generators, eta: float) -> dict:
        """`eta` and `generator` for schedulers whose `step` takes them."""
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs = {"eta": eta} if "eta" in accepted else {}
        if "generator" in accepted:
            kwargs["generator"] = generators
        return kwargs

    @staticmethod
    def _inpaint_images(images, count: int) -> list[Image.Image] | None:
        if images is None or isinstance(images, Image.Image):
            return None if images is None else [images] * count
        images = list(images)
        if len(images) != count:
            raise UserError(f"got {len(images)} images to inpaint for {count} layouts")
        return images


def randn_like(x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Standard normal noise shaped like x (B,...): row i drawn as `torch.randn_like(x[i:i+1])` from generators[i].

    The values of a CPU draw depend on the memory layout (strides) of the tensor it fills, so
    the noise is drawn into tensors laid out like `x`, as diffusers' `randn_like` draws.
    """
    rows = [torch.empty_like(x[i:i + 1], device="cpu").normal_(generator=g) for i, g in enumerate(generators)]
    return torch.cat(rows).to(x.device)


def box_mask(boxes: Sequence[Sequence[float]], size: Sequence[int]) -> torch.Tensor:
    """(h, w) mask: 0 inside the normalized xyxy boxes (cells truncated as diffusers' GLIGEN does), 1 elsewhere."""
    height, width = size
    mask = torch.ones(height, width)
    for x0, y0, x1, y1 in boxes:
        mask[int(y0 * height):int(y1 * height), int(x0 * width):int(x1 * width)] = 0
    return mask


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Centre-crop `image` to the aspect ratio width:height and resize it (LANCZOS), as diffusers' GLIGEN does."""
    if image.size == (width, height):
        return image
    w, h = image.size
    crop_w, crop_h = min(w, h * width / height), min(h, w * height / width)
    box = ((w - crop_w) / 2, (h - crop_h) / 2, (w + crop_w) / 2, (h + crop_h) / 2)
    return image.crop(box).resize((width, height), Image.LANCZOS)
