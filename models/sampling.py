"""Flow-matching noise schedules, shared by the Lumina-Next, SD3 and FLUX pipelines.

Convention: sigma runs from 1 (pure noise) to 0 (data), x_sigma = sigma * noise + (1 - sigma) * x0,
and a model's velocity v = d x / d sigma = noise - x0, so one Euler step is
x <- x + (sigma_next - sigma) * v. Lumina-Next counts time the other way (t = 1 - sigma) and
predicts x0 - noise; its pipeline converts at the call.

The schedule reproduces diffusers' FlowMatchEulerDiscreteScheduler bit for bit (so the same
seed gives the same image), including its quirk: the lowest training sigma is shifted once
when the scheduler is built and once more when the schedule is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import torch


@dataclass
class FlowMatchSchedule:
    """The settings of a `scheduler/scheduler_config.json` that shape the sigmas."""
    shift: float = 1.0                   # sigma' = shift*sigma / (1 + (shift-1)*sigma)
    num_train_timesteps: int = 1000
    use_dynamic_shifting: bool = False   # FLUX-dev: the shift follows the image size (mu)
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    @classmethod
    def from_config(cls, config: dict) -> "FlowMatchSchedule":
        unsupported = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                   "invert_sigmas", "shift_terminal") if config.get(k)]
        if unsupported:
            raise ValueError(f"scheduler_config.json sets {', '.join(unsupported)}, which this sampler does not "
                             "implement; remove it or use the released scheduler config")
        if config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError("scheduler_config.json: only time_shift_type 'exponential' is implemented")
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in config.items() if k in fields and v is not None})

    def _shifted(self, sigmas: np.ndarray, mu: float | None) -> np.ndarray:
        if self.use_dynamic_shifting:
            # time_shift(mu) = e^mu / (e^mu + (1/sigma - 1)): FLUX's resolution-dependent shift.
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)

    def mu(self, image_seq_len: int) -> float:
        """FLUX's shift exponent, linear in the number of image tokens."""
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * slope + (self.base_shift - slope * self.base_image_seq_len)

    def sigmas(self, steps: int, mu: float | None = None, sigmas: list[float] | None = None) -> torch.Tensor:
        """steps + 1 float32 sigmas, from about 1 down to a final 0.

        Without `sigmas`, the grid is evenly spaced between the largest and the smallest
        training sigma; FLUX passes its own grid linspace(1, 1/steps, steps) instead.
        """
        if self.use_dynamic_shifting and mu is None:
            raise ValueError("this schedule shifts with the image size: pass mu")
        if sigmas is None:
            train = np.linspace(1, self.num_train_timesteps, self.num_train_timesteps, dtype=np.float32)[::-1]
            train = torch.from_numpy(train / self.num_train_timesteps)
            if not self.use_dynamic_shifting:  # diffusers shifts the training sigmas when it is built
                train = self.shift * train / (1 + (self.shift - 1) * train)
            sigma_max, sigma_min = train[0].item(), train[-1].item()
            grid = np.linspace(sigma_max * self.num_train_timesteps, sigma_min * self.num_train_timesteps, steps)
            grid = grid / self.num_train_timesteps
        else:
            grid = np.array(sigmas).astype(np.float32)
        grid = torch.from_numpy(self._shifted(grid, mu)).to(torch.float32)
        return torch.cat([grid, torch.zeros(1)])


def cfg_negatives(prompts: list[str], negative_prompts: list[str] | None, guidance: float) -> list[str] | None:
    """The negative prompts a guided batch [prompts, negatives] needs: the given ones, "" for each
    prompt when none are given, and none at all without guidance (scale <= 1 runs one branch)."""
    if guidance <= 1:
        return None
    return negative_prompts if negative_prompts is not None else [""] * len(prompts)


def check_size(height: int, width: int, model: str) -> None:
    """Every backbone here patches 2x2 latents of 8x8 pixels: each side must be a multiple of 16."""
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % 16:
            raise ValueError(f"{name} {value} is not a positive multiple of 16, which {model} needs "
                             f"(try {max(16, round(value / 16) * 16)})")


def timesteps_of(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The scheduler's timesteps (sigma * 1000 in float32), which some models take as input."""
    return sigmas[:-1] * num_train_timesteps


def sample_flow(noise: torch.Tensor, sigmas: torch.Tensor, velocity: Callable[..., torch.Tensor], *,
                num_train_timesteps: int = 1000, solver: str = "euler", accelerator=None,
                progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Integrate d x / d sigma = velocity from sigmas[0] (noise) to sigmas[-1] = 0.

    velocity(latents, timestep, **options) runs one (guided) model evaluation at timestep =
    sigma * num_train_timesteps in float32, the value diffusers' schedulers hand to models.
    Each Euler step is done as diffusers' FlowMatchEulerDiscreteScheduler does it: in float32,
    the result cast back to the velocity's dtype. "midpoint" spends a second evaluation halfway
    through each step (the official Lumina-T2X demo's solver).

    accelerator (AccelAes), if given, decides how each step's velocity is had:
    accelerator.velocity(step, sigmas, evaluate), with evaluate(**options) the model evaluation.
    """
    if solver not in ("euler", "midpoint"):
        raise ValueError(f"unknown solver {solver!r}: use 'euler' or 'midpoint'")
    timesteps = sigmas * num_train_timesteps
    latents = noise
    steps = len(sigmas) - 1
    for i in range(steps):
        evaluate = partial(velocity, latents, timesteps[i])
        step_velocity = accelerator.velocity(i, sigmas, evaluate) if accelerator else evaluate()
        if solver == "midpoint":
            sigma_mid = (sigmas[i] + sigmas[i + 1]) / 2
            midpoint = (latents.float() + (sigma_mid - sigmas[i]) * step_velocity).to(latents.dtype)
            step_velocity = velocity(midpoint, sigma_mid * num_train_timesteps)
        latents = (latents.float() + (sigmas[i + 1] - sigmas[i]) * step_velocity).to(step_velocity.dtype)
        if progress is not None:
            progress(i + 1, steps)
    return latents
