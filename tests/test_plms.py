"""`--scheduler plms`: official GLIGEN's PLMS sampler, written out here after GLIGEN's `ldm/models/diffusion/plms.py`
(no Runge-Kutta warm-up; the first step averages a second UNet call at the next timestep; one grounding
scale per step, the first step's two calls included), against our pipeline with `gligen.plms`."""

import torch

from gligen.layout import Entity, Layout
from gligen.pipeline import GligenPipeline
from tests.tiny import save_tiny_gligen

GUIDANCE = 7.5


def _official_alphas(length, kind):
    """GLIGEN's alpha_generator."""
    full, decay = int(kind[0] * length), int(kind[1] * length)
    decays = [k / decay for k in range(decay)][::-1]  # np.arange(0, 1, 1 / decay)[::-1]
    return [1.0] * full + decays + [0.0] * (length - full - decay)


def _official_plms(pipe, layout, steps, kind):
    """The official sampler's loop on our UNet, prompt embeddings and grounding tokens. -> (latents, grounded t's)"""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0).float()
    timesteps = torch.arange(0, 1000, 1000 // steps) + 1  # make_ddim_timesteps, uniform
    alphas = alphas_cumprod[timesteps]
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[timesteps[:-1]]])
    text = pipe.encode_prompts([layout], guided=True).hidden
    grounding = pipe.grounding_inputs([layout], slots=30)
    tokens = pipe.adapter.tokens(grounding.with_null_half())
    scales = _official_alphas(steps, kind)
    grounded = []

    def model(x, t, scale):
        kwargs = None
        if scale > 0:
            for fuser in pipe.adapter.fusers:
                fuser.set_scale(scale)
            kwargs = {"gligen": {"objs": tokens}}
            grounded.append(int(t))
        out = pipe.unet(torch.cat([x, x]), torch.tensor(int(t)), text, cross_attention_kwargs=kwargs).sample
        uncond, cond = out.chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    def x_prev(x, e_t, index):
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e_t

    x = torch.randn((1, 4, layout.height // 2, layout.width // 2), generator=torch.Generator().manual_seed(layout.seed))
    time_range = timesteps.flip(0)
    old_eps = []
    for i, step in enumerate(time_range):
        index = steps - i - 1
        step_next = time_range[min(i + 1, len(time_range) - 1)]
        e_t = model(x, step, scales[i])
        if not old_eps:
            e_t_next = model(x_prev(x, e_t, index), step_next, scales[i])
            e_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x_prev(x, e_prime, index)
        old_eps = (old_eps + [e_t])[-3:]
    return x, grounded


def test_plms_reproduces_the_official_sampler_and_its_grounded_calls(tmp_path):
    pipe = GligenPipeline.from_pretrained(str(save_tiny_gligen(tmp_path)[1]), scheduler="plms")
    layout = Layout("a cat and a dog", (Entity("a cat", (0.1, 0.2, 0.5, 0.9)), Entity("a dog", (0.55, 0.25, 0.95, 0.8))),
                    width=16, height=16, seed=5)
    calls = []

    def spy(pipeline, call, timestep, tensors):
        calls.append(int(timestep))
        return {}

    schedule = (0.3, 0.0, 0.7)
    with torch.no_grad():
        expected, grounded = _official_plms(pipe, layout, 50, schedule)
    got = pipe(layout, num_inference_steps=50, guidance_scale=GUIDANCE, schedule=schedule, output_type="latent",
               callback_on_step_end=spy).images[0]
    assert len(calls) == 51 and calls[:3] == [981, 961, 961]  # the first step's two calls, then one per step
    assert grounded[-1] == 701 and len(grounded) == 16  # steps 981 ... 701, the first one twice
    torch.testing.assert_close(got, expected[0], rtol=0, atol=1e-5)
