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
from dataclasses import dataclass, replace
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
    def from_config(cls, config: dict, source: object = "scheduler_config.json") -> "FlowMatchSchedule":
        """The settings a scheduler config holds; `source` (its path) is named in every refusal."""
        unsupported = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                   "invert_sigmas", "shift_terminal") if config.get(k)]
        if unsupported:
            raise ValueError(f"{source} sets {', '.join(unsupported)}, which this sampler does not implement; "
                             "remove it or use the released scheduler config")
        if config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(f"{source}: only time_shift_type 'exponential' is implemented")
        fields = cls.__dataclass_fields__
        given = {k: v for k, v in config.items() if k in fields and v is not None}
        for key, value in given.items():
            flag = fields[key].type == "bool"
            if isinstance(value, bool) != flag or not (flag or (isinstance(value, (int, float)) and
                                                                 math.isfinite(value) and value > 0)):
                raise ValueError(f"{source}: {key} is {value!r}, not a {'true/false value' if flag else 'positive number'}"
                                 ": download the scheduler config again")
        return cls(**given)

    def with_shift(self, shift: float | None) -> "FlowMatchSchedule":
        """This schedule with a fixed shift in place of its own (None: unchanged); a fixed shift
        replaces the image-size-dependent one too."""
        return self if shift is None else replace(self, shift=shift, use_dynamic_shifting=False)

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


def cfg_negatives(prompts: list[str], negative_prompts: list[str] | None, guided: bool) -> list[str] | None:
    """The negative prompts a guided batch [prompts, negatives] needs: the given ones, "" for each
    prompt when none are given, and none at all without guidance (one branch runs)."""
    if not guided:
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


@dataclass(frozen=True)
class BatchRows:
    """How a pipeline lays out the model batch: the prompt each row serves, and each prompt's
    conditional row. This project stacks [cond, uncond]; diffusers stacks [uncond, cond]: a port
    says which, and the method never guesses."""
    prompt_of_row: tuple[int, ...]
    cond_row: tuple[int, ...]

    @classmethod
    def cond_then_uncond(cls, prompts: int, guided: bool) -> "BatchRows":
        order = tuple(range(prompts))
        return cls(order * 2 if guided else order, order)

    @property
    def guided(self) -> bool:
        """Under CFG each prompt has a conditional and an unconditional row."""
        return len(self.prompt_of_row) > len(self.cond_row)

    def __post_init__(self) -> None:
        prompts = len(self.cond_row)
        if sorted(set(self.prompt_of_row)) != list(range(prompts)) or any(
                self.prompt_of_row[row] != b for b, row in enumerate(self.cond_row)):
            raise ValueError(f"batch rows {self.prompt_of_row} do not serve prompts 0..{prompts - 1} with "
                             f"conditional rows {self.cond_row}")


def classifier_free_guidance(prediction: torch.Tensor, scale: float | torch.Tensor,
                             guided_channels: int | None = None) -> torch.Tensor:
    """uncond + s (cond - uncond) of a model batch [cond rows; uncond rows].

    scale: a number, or a tensor [B, 1, H, W] that guides each latent position with its own
    scale (AccelAes' spatial CFG, paper Eq. 11). guided_channels: guide only the first channels
    and keep the conditional prediction in the rest (Lumina-Next guides channels 0-2 of 4, its
    own sampler's convention, kept by diffusers "for exact reproducibility"); None: all."""
    cond, uncond = prediction.chunk(2)
    if torch.is_tensor(scale):
        scale = scale.to(cond.device, cond.dtype)
    channels = cond.shape[1] if guided_channels is None else guided_channels
    guided = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([guided, cond[:, channels:]], dim=1) if channels < cond.shape[1] else guided


def sample_flow(noise: torch.Tensor, sigmas: torch.Tensor, predict: Callable[..., torch.Tensor],
                guide: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], *,
                num_train_timesteps: int = 1000, solver: str = "euler", accelerator=None,
                progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Integrate d x / d sigma = velocity from sigmas[0] (noise) to sigmas[-1] = 0.

    predict(latents, timestep, **options) runs one model evaluation at timestep = sigma *
    num_train_timesteps in float32 (the value diffusers' schedulers hand to models) and returns
    the unguided predictions d x / d sigma of the whole model batch (under CFG: conditional
    rows, then unconditional ones). guide(prediction, scale) turns them into the velocity of the
    latents: classifier-free guidance at `scale`, or at the pipeline's own scale when scale is
    None (and the prediction itself without CFG). Each Euler step is done as diffusers'
    FlowMatchEulerDiscreteScheduler does it: in float32, the result cast back to the velocity's
    dtype. "midpoint" spends a second evaluation halfway through each step (the official
    Lumina-T2X demo's solver).

    accelerator (AccelAes), if given, decides how each step's prediction is had and which
    guidance is in force: accelerator.prediction(step, sigmas, evaluate), with evaluate(**options)
    the model evaluation, and accelerator.guidance(step).
    """
    if solver not in ("euler", "midpoint"):
        raise ValueError(f"unknown solver {solver!r}: use 'euler' or 'midpoint'")
    timesteps = sigmas * num_train_timesteps
    latents = noise
    steps = len(sigmas) - 1
    for i in range(steps):
        evaluate = partial(predict, latents, timesteps[i])
        if accelerator is None:
            step_velocity = guide(evaluate(), None)
        else:
            step_velocity = guide(accelerator.prediction(i, sigmas, evaluate), accelerator.guidance(i))
        if solver == "midpoint":
            sigma_mid = (sigmas[i] + sigmas[i + 1]) / 2
            midpoint = (latents.float() + (sigma_mid - sigmas[i]) * step_velocity).to(latents.dtype)
            step_velocity = guide(predict(midpoint, sigma_mid * num_train_timesteps), None)
        latents = (latents.float() + (sigmas[i + 1] - sigmas[i]) * step_velocity).to(step_velocity.dtype)
        if progress is not None:
            progress(i + 1, steps)
    return latents
