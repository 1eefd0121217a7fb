"""The flow-matching schedule equals diffusers' FlowMatchEulerDiscreteScheduler exactly."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from pipelines.sampling import FlowMatchSchedule, timesteps_of


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
@pytest.mark.parametrize("steps", [1, 4, 28, 30])
def test_static_shift_matches_diffusers(shift, steps):
    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    reference.set_timesteps(steps)
    ours = FlowMatchSchedule.from_config(dict(reference.config)).sigmas(steps)
    assert torch.equal(ours, reference.sigmas)
    assert torch.equal(timesteps_of(ours), reference.timesteps)
    # The smallest sigma before the final 0 is the smallest training sigma shifted twice.
    once = shift * 0.001 / (1 + (shift - 1) * 0.001)
    if steps > 1:
        assert ours[-2].item() == pytest.approx(shift * once / (1 + (shift - 1) * once), rel=1e-5)


@pytest.mark.parametrize("height, width", [(512, 512), (1024, 1024), (768, 1360)])
def test_dynamic_shift_with_custom_grid_matches_diffusers(height, width):
    config = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                  max_image_seq_len=4096, shift=3.0)
    reference = FlowMatchEulerDiscreteScheduler(**config)
    schedule = FlowMatchSchedule.from_config(dict(reference.config))
    steps = 28
    grid = np.linspace(1.0, 1 / steps, steps)
    mu = schedule.mu((height // 16) * (width // 16))
    reference.set_timesteps(sigmas=grid, mu=mu)
    assert torch.equal(schedule.sigmas(steps, mu=mu, sigmas=grid), reference.sigmas)
    assert schedule.mu(4096) == pytest.approx(1.15) and schedule.mu(256) == pytest.approx(0.5)


def test_unsupported_settings_are_refused():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowMatchSchedule.from_config({"use_karras_sigmas": True})
    with pytest.raises(ValueError, match="pass mu"):
        FlowMatchSchedule(use_dynamic_shifting=True).sigmas(4)


def test_cfg_negatives():
    from pipelines.sampling import cfg_negatives
    assert cfg_negatives(["a", "b"], None, True) == ["", ""]
    assert cfg_negatives(["a"], ["blurry"], True) == ["blurry"]
    assert cfg_negatives(["a"], ["blurry"], False) is None
