"""Official GLIGEN's PLMS sampler as a diffusers scheduler (`--scheduler plms`).

GLIGEN (after LDM) samples with PLMS: N uniformly spaced timesteps (`range(0, T, T // N) + 1`), a
DDIM step (eta 0) driven by an Adams-Bashforth combination of the current and up to three previous
noise predictions. Its first step is a pseudo improved Euler step: a second UNet call at the next
timestep on the Euler estimate, averaged with the first. There is no Runge-Kutta warm-up (diffusers'
`PNDMScheduler` runs one unless `skip_prk_steps`).

So N steps take N + 1 UNet calls. `timesteps` lists the timestep of every call and `call_steps`
the sampling step each call belongs to (0, 0, 1, 2, ...): the pipeline sets the grounding scale of
a call from its step, as the official sampler sets one scale per step, both calls of the first
step included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput


@dataclass
class _History:
    """What the multistep needs across calls: earlier noise predictions and the first step's start."""

    eps: list[torch.Tensor]
    first_sample: torch.Tensor | None = None
    first_eps: torch.Tensor | None = None


def adams_bashforth(eps: torch.Tensor, previous: list[torch.Tensor]) -> torch.Tensor:
    """The PLMS combination of the current noise prediction and the (up to 3) previous ones, newest last."""
    if len(previous) == 1:
        return (3 * eps - previous[-1]) / 2
    if len(previous) == 2:
        return (23 * eps - 16 * previous[-1] + 5 * previous[-2]) / 12
    return (55 * eps - 59 * previous[-1] + 37 * previous[-2] - 9 * previous[-3]) / 24


class PLMSScheduler(SchedulerMixin, ConfigMixin):
    """Official GLIGEN / LDM PLMS (eta 0). Betas as DDIM's: `scaled_linear` is LDM's "linear" schedule."""

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas: list[float] | None = None):
        if trained_betas is not None:
            betas = torch.tensor(trained_betas, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        else:
            raise NotImplementedError(f"{beta_schedule} is not implemented for {type(self).__name__}")
        # float32, as the official sampler keeps its schedule
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.zeros(0, dtype=torch.long)
        self.call_steps: list[int] = []
        self._steps: list[int] = []
        self._calls = 0
        self._history = _History([])

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Steps `range(0, T, T // N) + 1`, newest first; the first step's timestep pair is called twice."""
        train = self.config.num_train_timesteps
        if not 0 < num_inference_steps <= train:
            raise ValueError(f"num_inference_steps must be in 1 .. {train}, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        steps = [t + 1 for t in range(0, train, train // num_inference_steps)][::-1]
        self._steps = steps
        calls = steps[:1] + steps[1:2] + steps[1:] if len(steps) > 1 else steps
        self.timesteps = torch.tensor(calls, dtype=torch.long, device=device)
        self.call_steps = [0, 0] + list(range(1, len(steps))) if len(steps) > 1 else [0]
        self._calls = 0
        self._history = _History([])

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def _alpha(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_cumprod at step `step`, at the step after it; the last step ends at alphas_cumprod[0])."""
        a_t = self.alphas_cumprod[self._steps[step]]
        a_prev = self.alphas_cumprod[self._steps[step + 1]] if step + 1 < len(self._steps) else self.alphas_cumprod[0]
        return a_t, a_prev

    def _ddim(self, sample: torch.Tensor, eps: torch.Tensor, step: int) -> torch.Tensor:
        a_t, a_prev = (a.to(sample.device) for a in self._alpha(step))
        pred_x0 = (sample - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * eps

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One UNet call's update. Calls 0 and 1 make the first step (Euler estimate, then the averaged step)."""
        call, history = self._calls, self._history
        self._calls += 1
        if len(self._steps) > 1 and call == 0:
            history.first_sample, history.first_eps = sample, model_output
            prev = self._ddim(sample, model_output, 0)
        elif len(self._steps) > 1 and call == 1:
            prev = self._ddim(history.first_sample, (history.first_eps + model_output) / 2, 0)
            history.eps = [history.first_eps]
            history.first_sample = history.first_eps = None
        else:
            step = self.call_steps[call]
            eps = adams_bashforth(model_output, history.eps) if history.eps else model_output
            prev = self._ddim(sample, eps, step)
            history.eps = (history.eps + [model_output])[-3:]
        prev = prev.to(model_output.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(a_t) x_0 + sqrt(1 - a_t) noise."""
        a = self.alphas_cumprod.to(original.device)[timesteps.long().to(original.device)].to(original.dtype)
        while a.ndim < original.ndim:
            a = a[..., None]
        return a.sqrt() * original + (1 - a).sqrt() * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps
