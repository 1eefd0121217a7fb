"""torch.compile: every backbone's transformer traces as one graph, with no graph break, on the
paths a generation runs every step: dense, AccelAes' dense evaluation that keeps the increments,
and its sparse evaluation over the focus rows. A break there would mean Python deciding from a
tensor's value (an .item(), a branch on data) in the hot path.

Tiny random models, one or two layers; torch._dynamo.explain traces without compiling, and one
fullgraph compile per backbone (backend "eager": no code generation) must give the eager result.
"""

from __future__ import annotations

import pytest
import torch

from accelaes import SkipSparse, build_focus_mask
from pipelines import REGISTRY

dynamo = pytest.importorskip("torch._dynamo", reason="this torch build has no torch.compile")
if not dynamo.is_dynamo_supported():
    pytest.skip("torch.compile is not supported on this Python / platform", allow_module_level=True)

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: small traces on one core


def model_call(name: str):
    """The backbone's tiny random pipeline, a generation, and the (args, kwargs) of one dense
    evaluation of its transformer, recorded as the pipeline makes the call."""
    backbone = REGISTRY[name]
    pipeline = backbone.pipeline.random(seed=0)
    settings = pipeline.resolve(backbone.pipeline.Settings())
    generation = pipeline.prepare(["a cinematic photo"], seed=0, height=SIZE, width=SIZE, settings=settings)
    seen = []
    hook = pipeline.transformer.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
    pipeline.predict(generation.noise, torch.tensor(500.0), generation.text, settings, generation.size)
    hook.remove()
    args, kwargs = seen[0]
    return pipeline, generation, args, kwargs


def runners(pipeline, generation, args, kwargs) -> dict[str, SkipSparse | None]:
    """No runner (dense), SkipSparse keeping increments (dense), SkipSparse over half the image (sparse)."""
    grid = pipeline.token_grid(SIZE, SIZE)
    keeping = SkipSparse(pipeline.text_tokens(generation.text), grid[0] * grid[1])
    sparse = SkipSparse(pipeline.text_tokens(generation.text), grid[0] * grid[1])
    with torch.no_grad():
        pipeline.transformer(*args, **{**kwargs, "block_runner": sparse})       # keeps every block's increments
    mask = build_focus_mask(torch.arange(grid[0] * grid[1], dtype=torch.float32)[None], grid, 0.5)
    batch = args[0].shape[0]
    sparse.set_focus(mask.focus.expand(batch, -1), mask.background.expand(batch, -1))
    sparse.dense = False
    return {"dense": None, "dense, keeping increments": keeping, "sparse": sparse}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_hot_path_has_no_graph_break(name):
    pipeline, generation, args, kwargs = model_call(name)
    model = pipeline.transformer
    for path, runner in runners(pipeline, generation, args, kwargs).items():
        dynamo.reset()
        with torch.no_grad():
            explained = dynamo.explain(model)(*args, **{**kwargs, "block_runner": runner})
        assert explained.graph_break_count == 0, (path, [str(r.reason) for r in explained.break_reasons])
        assert explained.graph_count == 1, path


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_fullgraph_compile_gives_the_eager_result(name):
    pipeline, generation, args, kwargs = model_call(name)
    dynamo.reset()
    compiled = torch.compile(pipeline.transformer, fullgraph=True, backend="eager")
    with torch.no_grad():
        eager = pipeline.transformer(*args, **kwargs)
        assert torch.allclose(compiled(*args, **kwargs), eager, rtol=1e-5, atol=1e-6)
