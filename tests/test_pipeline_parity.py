"""GligenPipeline against diffusers' deprecated GLIGEN pipelines: same weights, scheduler and seed -> same image.

The reference pipelines are built from tiny components with non-zero gates, saved, and our
pipeline loads the saved directory as a user would (its GLIGEN UNet split into base + adapter).
"""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionGLIGENTextImagePipeline,
)
from diffusers.pipelines.stable_diffusion import CLIPImageProjection
from PIL import Image
from transformers import CLIPProcessor

from gligen.adapter import GroundingAdapter
from gligen.errors import UserError
from gligen.layout import Entity, Layout
from gligen.masks import box_mask
from gligen.pipeline import GligenPipeline
from tests.tiny import HIDDEN, randomize_grounding, save_tiny_gligen, tiny_components, tiny_image_encoder, tiny_unet

SIZE = 16  # pixels; the tiny VAE's sample_size, which diffusers resizes inpainting images to
STEPS = 10
PROMPT = "a cat and a dog"
ENTITIES = (Entity("a cat", (0.1, 0.2, 0.5, 0.9)), Entity("a dog", (0.55, 0.25, 0.95, 0.8)))
TOLERANCE = 1e-4


def _layout(seed=0, entities=ENTITIES, prompt=PROMPT):
    return Layout(prompt, entities, width=SIZE, height=SIZE, seed=seed)


def _reference_call(pipe, layout, **kwargs):
    return pipe(
        prompt=layout.prompt, gligen_phrases=layout.phrases, gligen_boxes=[list(b) for b in layout.boxes],
        num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE, output_type="np",
        generator=torch.Generator("cpu").manual_seed(layout.seed), **kwargs,
    ).images[0]


def _ours(pipe, layout, **kwargs):
    return pipe(layout, num_inference_steps=STEPS, guidance_scale=7.5, output_type="np", **kwargs).images[0]


def _saved_gligen(tmp_path_factory, in_channels=4):
    return save_tiny_gligen(tmp_path_factory.mktemp(f"gligen{in_channels}"), in_channels)


@pytest.fixture(scope="module")
def text_box(tmp_path_factory):
    reference, directory = _saved_gligen(tmp_path_factory)
    return reference, directory, GligenPipeline.from_pretrained(str(directory))


@pytest.mark.parametrize("beta", [0.3, 1.0])
def test_text_box_matches_diffusers(text_box, beta):
    reference, _, ours = text_box
    layout = _layout(seed=7)
    expected = _reference_call(reference, layout, gligen_scheduled_sampling_beta=beta)
    got = _ours(ours, layout, schedule=(beta, 0.0, 1.0 - beta))
    assert np.abs(got - expected).max() <= TOLERANCE

    # grounding changes the image: other boxes give another image, and so does the base alone
    moved = _layout(seed=7, entities=(Entity("a cat", (0.6, 0.1, 0.9, 0.5)), ENTITIES[1]))
    assert np.abs(_ours(ours, moved, schedule=(beta, 0.0, 1.0 - beta)) - got).max() > 1e-3
    ours.adapter.detach(ours.unet)
    try:
        base = GligenPipeline(ours.vae, ours.text_encoder, ours.tokenizer, ours.unet, ours.scheduler)
        assert np.abs(_ours(base, layout) - got).max() > 1e-3
    finally:
        ours.adapter.attach(ours.unet)


def test_other_scheduler_draws_as_diffusers(text_box):
    """An ancestral sampler's step noise comes from the layout's generator, as in diffusers at batch 1."""
    reference, directory, _ = text_box
    ours = GligenPipeline.from_pretrained(str(directory), scheduler="euler_a")
    assert isinstance(ours.scheduler, EulerAncestralDiscreteScheduler)
    # as a diffusers user swaps the scheduler of a loaded pipeline
    loaded = DDIMScheduler.from_pretrained(directory, subfolder="scheduler")
    reference.scheduler = EulerAncestralDiscreteScheduler.from_config(loaded.config)
    layout = _layout(seed=3)
    expected = _reference_call(reference, layout, gligen_scheduled_sampling_beta=0.3)
    assert np.abs(_ours(ours, layout) - expected).max() <= TOLERANCE


def test_batch_equals_one_by_one(text_box):
    _, _, ours = text_box
    layouts = [_layout(seed=1), _layout(seed=2, entities=ENTITIES[:1], prompt="a cat"),
               Layout("a dog", ENTITIES[1:], width=2 * SIZE, height=SIZE, seed=4)]
    batch = ours(layouts, num_inference_steps=4, output_type="np").images
    for layout, image in zip(layouts, batch):
        alone = ours(layout, num_inference_steps=4, output_type="np").images[0]
        assert image.shape == (layout.height, layout.width, 3)
        assert np.abs(image - alone).max() <= 1e-5
    assert np.abs(batch[0] - batch[1]).max() > 1e-3


def test_more_entities_than_slots_keeps_the_largest(text_box):
    _, _, ours = text_box
    small = Entity("a bird", (0.0, 0.0, 0.05, 0.05))
    crowded = _layout(entities=(small,) + ENTITIES)
    with pytest.warns(UserWarning, match="keeping the 2 largest"):
        got = ours(crowded, num_inference_steps=2, output_type="np", max_entities=2).images[0]
    expected = ours(_layout(), num_inference_steps=2, output_type="np", max_entities=2).images[0]
    assert np.abs(got - expected).max() == 0


def test_inpainting_matches_diffusers(tmp_path_factory):
    reference, directory = _saved_gligen(tmp_path_factory, in_channels=9)
    ours = GligenPipeline.from_pretrained(str(directory))
    assert ours.inpaints
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE + 4, 3), dtype=np.uint8))
    layout = _layout(seed=5)
    # diffusers draws the inpainting noise from the global RNG (ours from the layout's generator, after the
    # initial latents): give it our initial latents and the generator's state after drawing them
    generator = torch.Generator("cpu").manual_seed(layout.seed)
    latents = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=generator)
    torch.random.set_rng_state(generator.get_state())
    expected = _reference_call(reference, layout, gligen_scheduled_sampling_beta=1.0, gligen_inpaint_image=image,
                               latents=latents)
    got = _ours(ours, layout, schedule=(1.0, 0.0, 0.0), inpaint_image=image)
    assert np.abs(got - expected).max() <= TOLERANCE
    with pytest.raises(UserError, match="give an image to repaint"):
        ours(layout, num_inference_steps=1)


def test_inpainting_adapter_on_a_plain_base(tmp_path_factory):
    """Extra input channels of an inpainting adapter on a 4-channel base: the mask keeps the image outside the boxes."""
    directory = tmp_path_factory.mktemp("plain")
    components = tiny_components(directory / "_build")
    adapter = GroundingAdapter.for_unet(components["unet"], inpaint=True)
    randomize_grounding(adapter)
    with torch.no_grad():
        adapter.conv_in_extra.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    ours = GligenPipeline(**components, adapter=adapter)
    assert ours.inpaints and ours.unet.config.in_channels == 4
    image = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    layout = _layout(seed=2)
    got = ours(layout, num_inference_steps=4, schedule=(1.0, 0.0, 0.0), inpaint_image=image, output_type="latent").images[0]
    again = ours(layout, num_inference_steps=4, schedule=(1.0, 0.0, 0.0), inpaint_image=image, output_type="latent").images[0]
    assert torch.equal(got, again)
    assert box_mask(layout.boxes, (8, 8)).sum() < 64  # some cells are repainted
    with pytest.raises(UserError, match="images to inpaint for 1 layouts"):
        ours(layout, num_inference_steps=1, inpaint_image=[image, image])


def test_plain_base_repaints_by_latent_blending(text_box):
    """A 4-channel UNet repaints the boxes by latent blending: outside them the result follows the image."""
    _, _, ours = text_box
    assert not ours.inpaints
    image = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    layout = _layout(seed=3)
    pixels = ours.vae_processor.preprocess(image, SIZE, SIZE)
    target = ours.vae.encode(pixels).latent_dist.mean[0] * ours.vae.config.scaling_factor
    repainted = ours(layout, num_inference_steps=STEPS, inpaint_image=image, output_type="latent").images[0]
    free = ours(layout, num_inference_steps=STEPS, output_type="latent").images[0]
    outside = box_mask(layout.boxes, target.shape[1:]).bool()
    assert 0 < outside.sum() < outside.numel()
    near = (repainted - target)[:, outside].abs().mean()
    assert near < 0.25 * (free - target)[:, outside].abs().mean()
    assert not torch.allclose(repainted[:, ~outside], free[:, ~outside])


@pytest.fixture(scope="module")
def text_image(tmp_path_factory):
    """diffusers' text-image GLIGEN pipeline on tiny components, ours loaded from its directory, a reference image."""
    directory = tmp_path_factory.mktemp("text_image")
    unet = tiny_unet(attention_type="gated-text-image")
    randomize_grounding(unet)
    components = tiny_components(directory / "_build", unet)
    image_encoder, image_processor = tiny_image_encoder()
    torch.manual_seed(0)
    projection = CLIPImageProjection(hidden_size=HIDDEN)
    reference = StableDiffusionGLIGENTextImagePipeline(
        **components, processor=CLIPProcessor(image_processor=image_processor, tokenizer=components["tokenizer"]),
        image_encoder=image_encoder, image_project=projection, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.save_pretrained(directory / "pipe")
    ours = GligenPipeline.from_pretrained(str(directory / "pipe"))
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(directory / "dog.png")
    return reference, ours, directory / "dog.png"


def test_text_image_matches_diffusers_two_pass_pipeline(text_image):
    """diffusers runs the UNet twice per step (grounded, then null grounding); ours once, batched."""
    reference, ours, dog = text_image
    assert ours.adapter.config.feature_type == "text-image-box"
    reference_image = Image.open(dog).convert("RGB")
    layout = _layout(seed=9, entities=(ENTITIES[0], Entity("a dog", ENTITIES[1].box, image=str(dog))))
    expected = _reference_call(reference, layout, gligen_scheduled_sampling_beta=1.0,
                               gligen_images=[None, reference_image])
    got = _ours(ours, layout, schedule=(1.0, 0.0, 0.0))
    assert np.abs(got - expected).max() <= TOLERANCE
    # the reference image matters
    no_image = _ours(ours, _layout(seed=9), schedule=(1.0, 0.0, 0.0))
    assert np.abs(got - no_image).max() > 1e-3
    # an image in memory is the same reference as its file
    in_memory = _layout(seed=9, entities=(ENTITIES[0], Entity("a dog", ENTITIES[1].box, image=reference_image)))
    assert np.array_equal(_ours(ours, in_memory, schedule=(1.0, 0.0, 0.0)), got)


def test_image_only_entity_matches_diffusers_phraseless_image(text_image):
    """An entity with a reference image and no phrase grounds the image alone, as diffusers' phrase None does."""
    reference, ours, dog = text_image
    reference_image = Image.open(dog).convert("RGB")
    layout = _layout(seed=4, entities=(ENTITIES[0], Entity("", ENTITIES[1].box, image=reference_image)))
    expected = reference(
        prompt=layout.prompt, gligen_phrases=["a cat", None], gligen_images=[None, reference_image],
        gligen_boxes=[list(b) for b in layout.boxes], gligen_scheduled_sampling_beta=1.0, num_inference_steps=STEPS,
        guidance_scale=7.5, height=SIZE, width=SIZE, output_type="np",
        generator=torch.Generator("cpu").manual_seed(layout.seed)).images[0]
    got = _ours(ours, layout, schedule=(1.0, 0.0, 0.0))
    assert np.abs(got - expected).max() <= TOLERANCE
    with_phrase = _layout(seed=4, entities=(ENTITIES[0], Entity("a dog", ENTITIES[1].box, image=reference_image)))
    assert np.abs(got - _ours(ours, with_phrase, schedule=(1.0, 0.0, 0.0))).max() > 3 * TOLERANCE  # the phrase counts


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_close_to_fp32(text_box, dtype):
    _, directory, ours = text_box
    half = GligenPipeline.from_pretrained(str(directory), dtype=dtype)
    assert half.unet.dtype == dtype and all(p.dtype == dtype for p in half.adapter.parameters())
    layout = _layout(seed=1)
    got = half(layout, num_inference_steps=3, output_type="np").images[0]
    assert np.abs(got - ours(layout, num_inference_steps=3, output_type="np").images[0]).max() < 0.05


def test_xformers_without_a_gpu_is_a_user_error(text_box):
    with pytest.raises(UserError, match="xformers attention is not available"):
        text_box[2].set_attention("xformers")
    text_box[2].set_attention("sdpa")
