"""`visaudio bench render`: scene-engine speed on one core, and the renderer/metric agreement check.

For each random scene it times render + clip writing, then estimates the source direction from the
rendered audio (metrics.direction_error) and compares it with the metadata: a wrong ITD sign, a bad
HRTF interpolation or a miscalibrated estimator shows up as a large median error.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from engine.bench import percentiles


def bench_render(count: int = 20, seed: int = 10_000, sources: int | None = 1, duration: float = 8.0,
                 progress: bool = True) -> dict:
    """Render `count` random scenes; time each and score the audio's direction against the metadata."""
    from tqdm import tqdm

    from training.metrics import direction_error
    from training.render import render_scene
    from training.sampler import random_scene
    from training.scene_spec import parse_scene

    times, scene_medians, errors = [], [], []
    front, back, coverage = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in tqdm(range(count), desc="rendering scenes", unit="scene", disable=not progress):
            spec = parse_scene(random_scene(seed + i, duration=duration, num_sources=sources))
            start = time.perf_counter()
            r = render_scene(spec)
            r.write(Path(tmp) / "clip")
            times.append(time.perf_counter() - start)
            d = direction_error(r.audio, spec.sample_rate, r.meta)
            coverage.append(d["coverage"])
            s = d["series"]
            err = np.abs(s["estimate"] - s["truth"])[s["scored"]]
            if len(err):
                scene_medians.append(float(np.median(err)))
                errors.append(err)
            for name, bucket in (("front", front), ("back", back)):
                if d[name]["median_deg"] is not None:
                    bucket.append(d[name]["median_deg"])
    pooled = np.concatenate(errors) if errors else np.array([np.nan])
    return {
        "scenes": count, "sources_per_scene": sources, "duration_s": duration,
        "render_seconds": percentiles(times),
        "direction_error_deg": {
            "median_over_frames": float(np.median(pooled)),
            "median_of_scene_medians": float(np.median(scene_medians)) if scene_medians else None,
            "p90_of_scene_medians": float(np.percentile(scene_medians, 90)) if scene_medians else None,
            "front_median_of_scene_medians": float(np.median(front)) if front else None,
            "back_median_of_scene_medians": float(np.median(back)) if back else None,
            "scored_frames": int(len(pooled)),
            "mean_coverage": float(np.mean(coverage)),
        },
    }
