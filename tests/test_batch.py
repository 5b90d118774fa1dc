"""nbsim.batch.simulate_many: many experiments in one process, grouped by kernel shapes, each image
bit for bit the image nbsim.api.simulate renders alone."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from nbsim import batch
from nbsim.api import simulate
from pipeline.compose import compose_spec

# mixed shapes: two detector sizes, explicit and automatic oversampling, mosaic domains, N
MIXED = [
    ["detector.fpixels=24", "detector.spixels=20", "crystal.N=3", "detector.oversample=1"],
    ["detector.fpixels=32", "detector.spixels=32", "crystal.N=3", "detector.oversample=2"],
    ["detector.fpixels=24", "detector.spixels=20", "crystal.N=3", "detector.oversample=1",
     "detector.distance_mm=80"],
    ["crystal=triclinic", "detector.fpixels=32", "detector.spixels=32", "crystal.N=4",
     "crystal.mosaic_deg=0.5", "crystal.mosaic_domains=3", "crystal.misset_deg=[10,20,30]"],
    ["detector.fpixels=32", "detector.spixels=32", "crystal.N=3", "detector.oversample=2",
     "detector.distance_mm=90"],
]


def _specs(overrides, **device):
    out = [compose_spec(o) for o in overrides]
    specs = [s for s, _ in out]
    dev = dataclasses.replace(out[0][1], **device)
    return specs, dev


def _max_abs_diff(a, b) -> float:
    a, b = a.detach().cpu().numpy(), b.detach().cpu().numpy()
    assert a.shape == b.shape
    return float(np.max(np.abs(a - b)))


def test_groups_follow_kernel_shapes():
    specs, dev = _specs(MIXED)
    groups = batch.plan_groups(specs, dev)
    # 0 and 2 share shapes and constants (only the distance differs), so do 1 and 4; 3 has its own
    # (automatic oversampling resolves per experiment: it depends on N, cell and distance)
    assert sorted(map(sorted, groups)) == [[0, 2], [1, 4], [3]]


@pytest.mark.parametrize("compile_", [False, "auto"])
def test_batched_equals_unbatched_bit_for_bit(compile_):
    specs, dev = _specs(MIXED, compile=compile_)
    order = []
    got = batch.simulate_many(specs, dev, on_result=lambda i, r: order.append(i))
    assert sorted(order) == list(range(len(specs))) and len(got) == len(specs)
    assert order != list(range(len(specs)))          # rendered group by group, not in list order
    for spec, r in zip(specs, got):
        flag = r.info["batch_compile"]
        alone = simulate(spec, dataclasses.replace(dev, compile=flag))
        assert r.info["kernel"] == alone.info["kernel"]
        assert _max_abs_diff(r.image, alone.image) == 0.0
        assert float(alone.image.sum()) > 0
        np.testing.assert_array_equal(r.float32(), alone.float32())


def test_batched_float32_equals_unbatched():
    specs, dev = _specs(MIXED[:3], dtype="float32", compile=False)
    for spec, r in zip(specs, batch.simulate_many(specs, dev)):
        assert _max_abs_diff(r.image, simulate(spec, dev).image) == 0.0


def test_devices_per_spec_are_never_mixed_in_a_group():
    specs, dev = _specs(MIXED[:2] + MIXED[:1])
    devs = [dev, dev, dataclasses.replace(dev, dtype="float32")]
    got = batch.simulate_many(specs, devices=devs)
    assert str(got[2].image.dtype) == "torch.float32" and str(got[0].image.dtype) == "torch.float64"
    with pytest.raises(ValueError, match="3 specs but 2 devices"):
        batch.simulate_many(specs, devices=devs[:2])


@pytest.mark.slow
def test_compile_true_builds_one_kernel_per_group(tmp_path, monkeypatch):
    """device.compile=true: the AOT kernels of a group (the stacked pair) are built once and loaded
    by its later stacks and by other processes; a sweep over distance or N shares one kernel pair
    (both are tensor inputs of the compiled code), a sweep over the detector size needs one pair
    per size. Images equal the unbatched compiled ones bit for bit."""
    monkeypatch.setenv("NBSIM_KERNEL_CACHE", str(tmp_path / "kc"))
    from nbsim import kernel_cache

    def kernels():
        return sorted(json.loads((p / "manifest.json").read_text())["fields"]["kernel"]
                      for p in kernel_cache.cache_dir().iterdir())
    base = ["crystal=triclinic", "detector.fpixels=48", "detector.spixels=48", "device.dtype=float32"]
    dist = [base + ["crystal.N=4", f"detector.distance_mm={d}"] for d in (80, 90, 100)]
    specs, dev = _specs(dist, compile=True)
    got = batch.simulate_many(specs, dev)
    assert all(r.info["kernel"] == "compiled-stacked" for r in got)
    assert kernels() == ["_k_geometry_stack", "_k_sum_stack"]       # once for 3 distances
    n_sweep = [base + [f"crystal.N={n}", "detector.distance_mm=100"] for n in (5, 6)]
    specs2, _ = _specs(n_sweep)
    got2 = batch.simulate_many(specs2, dev)
    assert all(r.info["kernel_cache"] for r in got2)
    assert len(kernels()) == 2                                       # N: the same kernels
    sizes = [[*base[:1], f"detector.fpixels={n}", f"detector.spixels={n}", *base[3:], "crystal.N=4"]
             for n in (40, 56)]
    specs3, _ = _specs(sizes)
    batch.simulate_many(specs3, dev)                  # a group of one renders alone: per-image pair
    assert kernels() == sorted(["_k_geometry_stack", "_k_sum_stack"] + ["_k_geometry", "_k_sum"] * 2)
    for spec, r in zip(specs, got):                                  # alone: one more per-image pair
        assert _max_abs_diff(r.image, simulate(spec, dev).image) == 0.0
    assert kernels().count("_k_sum") == 3


@pytest.mark.slow
def test_compiled_groups_are_stacked_and_equal_unbatched_bit_for_bit():
    """device.compile=true: a group of equal kernel shapes renders STACK_IMAGES images per kernel
    call (kernel "compiled-stacked"; 10 images: a full stack and a padded one), each image bit for
    bit the image the compiled kernel renders alone; the group of other shapes renders apart."""
    from nbsim import engine
    sweep = [["crystal=triclinic", "detector.fpixels=20", "detector.spixels=16", "crystal.N=3",
              "detector.oversample=1", f"detector.distance_mm={80 + 5 * k}", f"crystal.N={3 + k % 3}"]
             for k in range(engine.STACK_IMAGES + 2)]
    other = [["detector.fpixels=24", "detector.spixels=24", "crystal.N=3", "detector.oversample=2"]] * 2
    specs, dev = _specs(sweep + other, compile=True)
    got = batch.simulate_many(specs, dev)
    assert [r.info["kernel"] for r in got] == ["compiled-stacked"] * (len(sweep) + len(other))
    for spec, r in zip(specs, got):
        alone = simulate(spec, dev)
        assert alone.info["kernel"] == "compiled"
        assert _max_abs_diff(r.image, alone.image) == 0.0 and float(alone.image.sum()) > 0
        assert r.info["max_I"] == alone.info["max_I"]


def test_stacking_refuses_what_does_not_stack():
    """simulate_stack returns None (one image at a time then) for unequal shapes."""
    from nbsim.api import simulate_stack
    specs, dev = _specs(MIXED[:2], compile=True)
    assert simulate_stack(specs, dev) is None


@pytest.mark.slow
def test_stacked_float32_with_a_shared_hkl_table_equals_unbatched():
    table = [["crystal=matrix", "detector.fpixels=24", "detector.spixels=20", "detector.oversample=1",
              f"crystal.N={n}", "device.dtype=float32"] for n in (5, 6, 7)]
    specs, dev = _specs(table, compile=True)
    for spec, r in zip(specs, batch.simulate_many(specs, dev)):
        assert r.info["kernel"] == "compiled-stacked"
        assert _max_abs_diff(r.image, simulate(spec, dev).image) == 0.0 and float(r.image.max()) > 0
