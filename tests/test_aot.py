"""The train step compiled for accelerators that are not here (polyjax.aot): target
names, the collectives and the per-layer extrapolation against closed forms, and the
tiny dense and MoE steps built by XLA:TPU and XLA:GPU with the Pallas PolyNorm kernel
and the flash attention, whose custom calls the compiled programs must hold (and no
attention scores). Needs the aot extra (libtpu, the CUDA plugin); without it the
compiling tests skip, unless POLYJAX_REQUIRE_AOT=1 (CI) makes that a failure."""

import dataclasses
import importlib.util
import os
import re

import pytest

from polyjax import aot
from polyjax.config import Spec

HAVE = {
    "tpu": importlib.util.find_spec("libtpu") is not None,
    "gpu": importlib.util.find_spec("jax_plugins.xla_cuda13") is not None,
}


def need(platform: str) -> None:
    if HAVE[platform]:
        return
    why = f"no {platform.upper()} compiler (pip install -e '.[aot]')"
    if os.environ.get("POLYJAX_REQUIRE_AOT") == "1":
        pytest.fail(why)
    pytest.skip(why)


@pytest.mark.parametrize(
    "name,platform,topology",
    [
        ("v5p-8", "tpu", "v5p:2x2x1"),  # TensorCores: 4 chips
        ("v5p-16", "tpu", "v5p:2x2x2"),
        ("v5p-64", "tpu", "v5p:2x4x4"),
        ("v5p-128", "tpu", "v5p:4x4x4"),
        ("v5e-8", "tpu", "v5e:2x4"),  # chips
        ("v6e-16", "tpu", "v6e:4x4"),
        ("v5p:4x4x8", "tpu", "v5p:4x4x8"),
        ("h100x8", "gpu", "1x1x8"),
        ("h200x16", "gpu", "1x2x8"),
        ("h100x2", "gpu", "1x1x2"),
    ],
)
def test_target_names(name, platform, topology):
    assert aot.parse(name)[0::2] == (platform, topology)


@pytest.mark.parametrize("name", ["v5p-6", "v5p-2", "v4-8", "h100x12", "tpu", "v5e:2x2x2"])
def test_bad_target_names_say_what_is_valid(name):
    with pytest.raises(ValueError, match=rf"--target={re.escape(name)}: .*"):
        aot.parse(name)


HLO = """
  %ag = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(bf16[4,8]{1,0} %p), dims={0}
  %agd = bf16[16,8]{1,0} all-gather-done(%ag)
  %rs = f32[256]{0} reduce-scatter(f32[1024]{0} %g), dimensions={0}
  %ar = f32[10]{0} all-reduce(f32[10]{0} %x), to_apply=%add
  %ar2 = (f32[2]{0}, s32[]) all-reduce-start(f32[2]{0} %y, s32[] %z)
  %a2a = bf16[8,128]{1,0} all-to-all(bf16[8,128]{1,0} %t), dimensions={0}
"""


def test_collectives_are_counted_once_with_their_result_bytes():
    got = aot.collectives(HLO)
    assert got["all-gather"] == (1, 16 * 8 * 2)  # the start, by its result
    assert got["reduce-scatter"] == (1, 256 * 4)
    assert got["all-reduce"] == (2, 10 * 4 + 2 * 4)
    assert got["all-to-all"] == (1, 8 * 128 * 2)
    assert got["collective-permute"] == (0, 0)


def test_figures_combine_linearly():
    coll = lambda n: {op: (n, 10 * n) for op in aot.COLLECTIVES}
    one = aot.Figures(flops=5.0, bytes=7.0, seconds=1.0, collectives=coll(1))
    two = aot.Figures(flops=8.0, bytes=9.0, seconds=1.5, collectives=coll(3))
    got = aot.Figures.combine([(1.0, one), (23.0, two), (-23.0, one)])  # a + 23 (b - a)
    assert (got.flops, got.bytes, got.seconds) == (5 + 23 * 3, 7 + 23 * 2, 1 + 23 * 0.5)
    assert got.collectives["all-gather"] == (1 + 23 * 2, 10 + 23 * 20)
    untimed = dataclasses.replace(two, seconds=None)
    assert aot.Figures.combine([(1.0, one), (1.0, untimed)]).seconds is None


def tiny_config(tiny, family="dense", **overrides):
    """A tiny step long enough for the flash kernels (256 tokens: two of their
    128-wide tiles) with the Pallas PolyNorm kernel and attention "auto" (the
    platform's flash attention)."""
    base = {"data.seq_len": 256, "model.max_seq_len": 256, "model.activation.kernel": "pallas"}
    base["model.attention"] = "auto"
    return tiny.config(family, **{**base, **overrides})


SCORES = re.compile(r"\[(?:\d+,)*256,256\]")  # B x H x L x L at L = 256


def compiled_text(config, target):
    spec = Spec.from_config(config, target.devices)
    return aot.compile_step(spec, target)[0].as_text()


def test_tpu_dense_step_uses_splash_and_the_pallas_kernel(tiny):
    need("tpu")
    target = aot.get_target("v5p-8")
    config = tiny_config(tiny, **{"mesh.data": 1, "mesh.fsdp": 4})
    text = compiled_text(config, target)
    assert "splash" in text and "polynorm" in text.lower()  # the Mosaic kernels' names
    assert not SCORES.search(text)
    xla = compiled_text(tiny_config(tiny, **{"model.attention": "xla"}), target)
    assert SCORES.search(xla)  # the control: XLA's attention materialises the scores


def test_tpu_report_of_scanned_layers_and_microbatches_equals_the_unrolled_step(tiny):
    """The per-step figures of a model with scanned layers and two microbatches (both
    loops: from one- and two-layer, one- and two-microbatch programs) against the same
    model and batch compiled with its four layers unrolled and one microbatch."""
    need("tpu")
    target = aot.get_target("v5p-8")
    layers = {"model.n_layers": 4}
    looped = {"model.scan_layers": True, "optim.grad_accum": 2}
    scanned = Spec.from_config(tiny_config(tiny, **layers, **looped), target.devices)
    report = aot.compile_report(scanned, target)
    unrolled = Spec.from_config(tiny_config(tiny, **layers), target.devices)
    direct = aot.compile_report(unrolled, target)
    assert report.per_layer and not direct.per_layer
    for field in ("flops", "bytes", "seconds"):
        got, want = getattr(report.figures, field), getattr(direct.figures, field)
        assert got == pytest.approx(want, rel=0.05), field
    assert report.plan.fits and report.seconds[0] > 0 and 0 < report.mfu < 1
    assert "XLA:TPU's cost model" in report.describe()


def test_tpu_moe_step_on_an_expert_mesh(tiny):
    need("tpu")
    target = aot.get_target("v5p-8")
    config = tiny_config(tiny, "moe", **{"mesh.data": 1, "mesh.expert": 4})
    report = aot.compile_report(Spec.from_config(config, target.devices), target)
    assert report.plan.fits and report.figures.flops > 0
    moved = report.figures.collectives
    assert moved["all-to-all"][0] + moved["all-gather"][0] > 0  # tokens or experts move


def test_gpu_dense_step_uses_cudnn_and_the_triton_kernel(tiny):
    need("gpu")
    target = aot.get_target("h100x8")
    config = tiny_config(tiny, **{"model.dtype": "bfloat16"})
    text = compiled_text(config, target)
    assert "__cudnn$fmha" in text and "triton" in text
    assert not SCORES.search(text)
    report = aot.compile_report(Spec.from_config(config, target.devices), target)
    assert report.figures.seconds is None and "roofline" in report.seconds[1]


def test_gpu_moe_step_on_an_expert_mesh(tiny):
    need("gpu")
    target = aot.get_target("h100x8")
    config = tiny_config(tiny, "moe", **{"model.dtype": "bfloat16", "mesh.data": 1,
                                          "mesh.expert": 8})  # fmt: skip
    text = compiled_text(config, target)
    assert "__cudnn$fmha" in text and "triton" in text


def test_dry_run_of_a_step_that_does_not_fit_is_one_line(launch_py, tiny, tmp_path):
    need("tpu")
    huge = {"data.global_batch": 65536, "data.seq_len": 128}  # logits alone: 8.7 GB
    result = launch_py(
        *tiny.argv(**huge), "--dry_run", "--target=v5e-1", "--nosuggest",
        f"--workdir={tmp_path / 'run'}",
    )  # fmt: skip
    assert result.code == 1
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "temporaries" in lines[0] and "HBM" in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_unknown_target_is_a_usage_error(launch_py, tiny):
    result = launch_py(*tiny.argv(), "--dry_run", "--target=v7x-8")
    assert result.code == 2
    assert result.err.strip().splitlines() == [
        "launch.py: error: " + result.err.split("launch.py: error: ")[1].strip()
    ]
    assert "--target=v7x-8: unknown; valid targets" in result.err
