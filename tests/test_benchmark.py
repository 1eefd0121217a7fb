"""benchmark.py beyond its table: diffusers' rows beside ours (--peers), strict JSON, the peak
memory of a run, and the full-size path (--layers full) on a tiny configuration.

The peer rows are checked against something independent: diffusers' own dense transformer, run
through our loop with our weights, must land on our dense latents (fp32, 1e-5), and the cache
hooks must be the ones diffusers 0.42.1 can run on each backbone.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time

import pytest
import torch

import benchmark
from benchmarking import floor
from benchmarking.measure import PeakMemory, TimedRow, flop_counter, measure_interleaved
from models.lumina_next import NextDiT, NextDiTParams
from pipelines import REGISTRY

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
TINY = ["--tiny", "--size", "64", "--steps", "8", "--repeats", "1"]
HOOKS_RUN = {"lumina-next": [], "sd3": ["TaylorSeerCache", "FasterCache"],
             "flux": ["FirstBlockCache", "TaylorSeerCache", "FasterCache"]}


def strict_json(path) -> dict:
    """json.loads that refuses NaN and Infinity (Python's json accepts both by default)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: small runs on one core


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed (pip install -r requirements-test.txt)")
@pytest.mark.parametrize("model", sorted(HOOKS_RUN))
def test_peer_rows_run_the_same_weights(model, tmp_path, capsys):
    path = tmp_path / "table.json"
    assert benchmark.main(["--model", model, *TINY, "--peers", "--json", str(path)]) == 0
    report = strict_json(path)
    rows = {row["row"]: row for row in report["rows"]}
    assert report["rows"][0]["row"] == "dense" and report["rows"][0]["kind"] == "ours"
    # diffusers' own transformer, given our weights and run through our loop, lands on our latents.
    twin = rows["diffusers dense"]
    assert twin["kind"] == "diffusers" and twin["latent_rel_l2"] < 1e-5
    assert twin["model_calls"] == report["steps"] and twin["linear_flop_share"] == 1.0
    assert [name.removeprefix("diffusers ") for name in rows if name.startswith("diffusers ")][1:] == HOOKS_RUN[model]
    for name in HOOKS_RUN[model]:
        row = rows[f"diffusers {name}"]
        assert row["model_calls"] == report["steps"] and 0 < row["linear_flop_share"] <= 1
        assert row["theoretical"] == pytest.approx(1 / row["linear_flop_share"]) and row["hook"].startswith(name)
    # With 8 steps TaylorSeer predicts steps 3, 5, 6 and 7 instead of running the attention.
    if "TaylorSeerCache" in HOOKS_RUN[model]:
        assert rows["diffusers TaylorSeerCache"]["linear_flop_share"] < 1
        assert rows["diffusers TaylorSeerCache"]["latent_rel_l2"] > 1e-5
    not_run = {entry["row"] for entry in report["peers_not_run"]}
    assert not_run == {"FirstBlockCache", "TaylorSeerCache", "FasterCache"} - set(HOOKS_RUN[model])
    out = capsys.readouterr().out
    assert all(f"diffusers {name}: not run: " in out for name in not_run)


def test_peers_without_diffusers_say_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)      # import diffusers now fails
    assert benchmark.main(["--model", "sd3", *TINY, "--peers"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "pip install diffusers==0.42.1" in error


def test_json_is_strict_and_psnr_of_identical_images_is_null(tmp_path):
    path = tmp_path / "table.json"
    assert benchmark.main(["--model", "lumina-next", *TINY, "--json", str(path)]) == 0
    report = strict_json(path)
    dense = report["rows"][0]
    assert dense["psnr_db"] is None and "infinite" in dense["psnr_note"] and dense["latent_rel_l2"] == 0
    assert all(row["psnr_db"] is None or math.isfinite(row["psnr_db"]) for row in report["rows"])
    assert all(row["peak_memory_mb"] >= row["peak_growth_mb"] >= 0 for row in report["rows"])
    with pytest.raises(ValueError):        # a NaN cannot slip into the file
        benchmark.write_json(tmp_path / "bad.json", {"psnr_db": float("inf")})


def test_peak_memory_is_the_peak_of_the_run_not_its_growth():
    with PeakMemory("cpu") as memory:
        block = torch.ones(64 * 2 ** 20 // 4)          # 64 MB, touched
        time.sleep(0.05)                               # held long enough for the sampler to see it
        del block
    after = PeakMemory.rss_anon()
    assert memory.growth >= 60 * 2 ** 20                # the 64 MB the block held, freed since
    assert memory.start > 50 * 2 ** 20                  # the peak counts what the process held before,
    assert memory.bytes == memory.start + memory.growth > after + 50 * 2 ** 20   # torch's libraries at least


def test_layers_argument():
    assert benchmark.parse_args(["--layers", "full"]).layers == "full"
    assert benchmark.parse_args(["--layers", "3"]).layers == 3
    for bad in (["--layers", "0"], ["--layers", "two"], ["--tiny", "--layers", "full"], ["--batch", "2", "--peers"]):
        with pytest.raises(SystemExit):
            benchmark.parse_args(bad)


def test_full_size_path_on_a_tiny_configuration():
    """--layers full's builder: built on meta, storage and random weights on the target device in
    the target dtype; the model it gives runs."""
    params = NextDiTParams(dim=64, layers=2, heads=4, kv_heads=2, ffn_dim=128, caption_dim=32, adaln_dim=64)
    model = benchmark.materialise(lambda: NextDiT(params), "cpu", torch.bfloat16, seed=0)
    weights = dict(model.named_parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in weights.values())
    assert weights["layers.0.attention_norm1.weight"].float().mean() == pytest.approx(1, abs=0.05)
    assert weights["layers.0.attention.wq.weight"].float().std() == pytest.approx(0.02, rel=0.1)
    again = benchmark.materialise(lambda: NextDiT(params), "cpu", torch.bfloat16, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    with torch.no_grad():
        out = model(torch.randn(1, 4, 16, 16, dtype=torch.bfloat16), torch.tensor([0.5]),
                    torch.randn(1, 5, 32, dtype=torch.bfloat16), torch.ones(1, 5, dtype=torch.bool))
    assert out.shape == (1, 8, 16, 16) and torch.isfinite(out.float()).all()


def test_rows_take_turns():
    """Every row warmed up, then the timed runs round-robin; each row summarized right after its
    last run, in the rows' order (the first row, our dense one, is the others' reference), from
    the seconds and memory of every run and the whole of the last."""
    calls, summaries = [], {}

    def row(name):
        runs = iter(range(1, 10))

        def run():
            calls.append(f"run {name}")
            n = next(runs)
            return (float(n), f"latents {name}{n}", f"memory {name}{n}")

        def summarize(done):
            calls.append(f"summary {name}")
            summaries[name] = done
            return {"row": name}
        return TimedRow(name, lambda: calls.append(f"warm {name}"), run, summarize)

    results = measure_interleaved([row("a"), row("b"), row("c")], repeats=3)
    assert [r["row"] for r in results] == ["a", "b", "c"]
    assert calls == ["warm a", "warm b", "warm c", "run a", "run b", "run c", "run a", "run b", "run c",
                     "run a", "summary a", "run b", "summary b", "run c", "summary c"]
    assert summaries["b"] == [(1.0, None, "memory b1"), (2.0, None, "memory b2"), (3.0, "latents b3", "memory b3")]


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="this torch build has no torch.compile")
def test_compiled_rows_give_the_eager_results(tmp_path):
    """--compile: the compiled rows (inductor, on this CPU) land on the eager rows' latents and
    evaluation counts."""
    path = tmp_path / "table.json"
    assert benchmark.main(["--model", "lumina-next", *TINY, "--compile", "--json", str(path)]) == 0
    rows = {row["row"]: row for row in strict_json(path)["rows"]}
    assert rows["dense (compiled)"]["latent_rel_l2"] < 1e-5
    full, compiled = rows["AccelAes (full)"], rows["AccelAes (compiled)"]
    assert compiled["evaluations"] == full["evaluations"]
    assert abs(compiled["latent_rel_l2"] - full["latent_rel_l2"]) < 1e-5


@pytest.mark.parametrize("model", sorted(HOOKS_RUN))
def test_floor_replays_every_matmul_and_attention_of_a_dense_forward(model):
    """--floor's recording holds every matrix product and attention kernel of our dense forward,
    as torch's profiler lists them, and its replay does exactly the forward's matmul FLOPs."""
    pipeline = REGISTRY[model].pipeline.random(seed=0)
    settings = pipeline.resolve(REGISTRY[model].pipeline.Settings())
    generation = pipeline.prepare(["a red fox"], seed=0, height=64, width=64, settings=settings)

    def forward():
        with torch.no_grad():
            benchmark.one_evaluation(pipeline, generation)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiled:
        forward()
    names = [event.name for event in profiled.events()]
    products = {name.replace(".", "::") for name in floor.MATRIX_PRODUCTS}     # the profiler's spelling
    kernels = [name for name in names if name in products or name.startswith("aten::_scaled_dot_product")]
    calls = floor.record(forward)
    assert [str(op.overloadpacket).replace(".", "::", 1) for op, _, _ in calls.calls] == kernels
    assert any(name.startswith("aten::_scaled_dot_product") for name in kernels)
    with flop_counter() as forward_flops:
        forward()
    with flop_counter() as replay_flops:
        calls.replay()
    assert replay_flops.get_total_flops() == forward_flops.get_total_flops() > 0


def test_floor_row(tmp_path):
    path = tmp_path / "table.json"
    assert benchmark.main(["--model", "sd3", *TINY, "--floor", "--json", str(path)]) == 0
    report = strict_json(path)
    row = report["rows"][-1]
    assert row["kind"] == "floor" and row["seconds"] > 0 and row["kernel_calls"] > 0
    assert row["evaluations"] == f"{report['steps']} x {row['kernel_calls']} calls"


def test_flop_counter_counts_in_place_products_and_the_cpu_attention_kernel():
    """What torch's FlopCounterMode leaves out by default, counted as a hand computation says, and
    as torch itself counts the same attention on meta tensors (where it runs as two bmm)."""
    out, a, b = torch.zeros(6, 5), torch.randn(6, 4), torch.randn(4, 5)
    with flop_counter() as counted:
        out.addmm_(a, b)
    assert counted.get_total_flops() == 2 * 6 * 4 * 5
    flops = {}
    for device in ("cpu", "meta"):
        q, kv = torch.randn(2, 8, 64, 32, device=device), torch.randn(2, 2, 80, 32, device=device)
        with flop_counter() as counted:
            torch.nn.functional.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
        flops[device] = counted.get_total_flops()
    multiply_adds = 2 * 8 * 64 * 80 * 32           # of q k^T, and as many of the weights times v
    assert flops["cpu"] == flops["meta"] == 2 * 2 * multiply_adds
