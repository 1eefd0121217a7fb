"""The AccelAes configurations evaluate.py compares with dense: the full method and the paper's
ablations, each a named set of AccelAesConfig overrides on the backbone's defaults
(pipelines.REGISTRY), so that Tables 7 and 8 are one command:

    Table 7 (SkipSparse):      --configs step-cache-only,attn-only,spatial-only,full
    Table 8 (token weighting): --configs uniform-weights,non-aesthetic-weights,full

Each configuration's images go to OUT/<name>/, dense's to OUT/dense/.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType

from accelaes import AccelAesConfig


@dataclass(frozen=True)
class Configuration:
    name: str                  # the --configs name, and the folder of its images
    title: str                 # its row in the tables, as the paper names it
    overrides: dict = field(default_factory=dict)   # AccelAesConfig fields set over the backbone's defaults

    def accelaes(self, backbone_defaults: dict) -> AccelAesConfig:
        return replace(AccelAesConfig(**backbone_defaults), **self.overrides)

    def weighs_tokens(self) -> bool:
        """An ablation of AesMask's token weighting: it means something only where a mask is built."""
        return "token_weighting" in self.overrides


CONFIGURATIONS = MappingProxyType({c.name: c for c in (
    Configuration("full", "AccelAes (full)"),
    Configuration("step-cache-only", "StepCache only", dict(sparse=False, spatial_cfg=False)),
    # Table 7's spatial rows run without StepCache: their speedups (1.42x, 1.43x) are the spatial path's alone.
    Configuration("spatial-only", "spatial only (attn + FFN)", dict(step_cache=False, sparse=True)),
    Configuration("attn-only", "spatial only (attn)", dict(step_cache=False, sparse=True, sparse_ffn=False)),
    Configuration("uniform-weights", "uniform token weights", dict(token_weighting="uniform")),
    Configuration("non-aesthetic-weights", "non-aesthetic token weights", dict(token_weighting="non-aesthetic")),
)})

DENSE = "dense"   # the baseline's folder and row; no configuration may take the name


def parse_configs(text: str) -> list[Configuration]:
    """`--configs a,b,c` as configurations, in the order given (ValueError naming the fix)."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise ValueError(f"--configs {text!r} has an empty name: give names separated by commas, e.g. "
                         "full,step-cache-only")
    for name in names:
        if name not in CONFIGURATIONS:
            raise ValueError(f"--configs: unknown configuration {name!r}; known: {', '.join(CONFIGURATIONS)}")
    twice = next((name for index, name in enumerate(names) if name in names[:index]), None)
    if twice is not None:
        raise ValueError(f"--configs names {twice} twice: give each configuration once")
    return [CONFIGURATIONS[name] for name in names]


def builds_mask(config: AccelAesConfig, guided: bool) -> bool:
    """Whether a generation with `config` builds AesMask's focus mask (SkipSparse or spatial CFG)."""
    return config.sparse or (config.spatial_cfg and guided)


def check_configuration(configuration: Configuration, backbone_defaults: dict, model: str, guided: bool,
                        steps: int | None) -> None:
    """Refuse a configuration that cannot run here, or would be the full method under another name."""
    config = configuration.accelaes(backbone_defaults)
    if configuration.weighs_tokens() and not builds_mask(config, guided):
        raise ValueError(f"--configs {configuration.name}: --model {model} builds no focus mask in its full "
                         "configuration (StepCache alone), so the token weighting changes nothing: drop it")
    if steps is not None:   # FLUX's default depends on the variant: checked again once it is loaded
        try:
            config.check(steps)
        except ValueError as error:
            raise ValueError(f"--configs {configuration.name}: {error}") from None
