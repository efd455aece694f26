"""Acceptance-scale checks of the scene engine (slow; CI runs them)."""
import pytest

from training.benchmarks import bench_render


@pytest.mark.slow
def test_direction_estimate_agrees_with_metadata_over_100_scenes():
    result = bench_render(count=100, seed=10_000, sources=1, progress=False)
    d = result["direction_error_deg"]
    print("direction agreement over 100 single-source scenes:", d)
    assert d["median_over_frames"] <= 10.0
    assert d["median_of_scene_medians"] <= 10.0
