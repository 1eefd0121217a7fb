"""Prompt to image, one pipeline per backbone behind one interface (base.py), and the registry
that maps the command line's --model names to them.

Adding a backbone: its network in models/, its Pipeline subclass here, and one registry line.
"""

from dataclasses import dataclass, field

from .base import Pipeline
from .flux import FluxPipeline
from .lumina_next import LuminaNextPipeline
from .sd3 import SD3Pipeline


@dataclass(frozen=True)
class Backbone:
    """A registered backbone: its pipeline, and AccelAes' settings on it where they differ from
    the method's defaults (accelaes.AccelAesConfig, tuned on Lumina-Next)."""
    pipeline: type[Pipeline]
    accelaes: dict = field(default_factory=dict)


REGISTRY = {
    "lumina-next": Backbone(LuminaNextPipeline),
    # The paper keeps SD3 on StepCache: the spatial path and spatial CFG are options
    # (docs/method.md); the public code's spatial scales at SD3's base 7 are 9 / 2.
    "sd3": Backbone(SD3Pipeline, dict(sparse=False, spatial_cfg=False, guidance_fg=9.0, guidance_bg=2.0)),
    # FLUX-dev is guidance-distilled: no CFG, so no spatial CFG; the spatial path is an option.
    "flux": Backbone(FluxPipeline, dict(sparse=False, spatial_cfg=False)),
}
