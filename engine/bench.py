"""`visaudio bench engine`: per-hop latency, real-time factor and streams per device, every backend
side by side in one run (hops interleaved round-robin, so drift and thermal state hit all alike)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from engine.backends import EngineError, available_backends, example_inputs, open_engine


def pin_to_one_core() -> int:
    """Run this process on one CPU core; returns the core used."""
    core = sorted(os.sched_getaffinity(0))[0]
    os.sched_setaffinity(0, {core})
    return core


def percentiles(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.median(v)), "p95": float(np.percentile(v, 95)),
            "p99": float(np.percentile(v, 99)), "max": float(v.max()), "n": int(len(v))}


def engine_dirs(path: Path | str) -> list[Path]:
    """An engine folder, or a folder of them (one per exported batch size)."""
    path = Path(path)
    if (path / "manifest.json").exists():
        return [path]
    found = sorted((p.parent for p in path.glob("*/manifest.json")), key=lambda p: p.name)
    if not found:
        raise EngineError(f"{path}: no manifest.json here or in its subfolders (run `visaudio export`)")
    return found


def bench_engine(path: Path | str, backends: list[str] | None = None, hops: int = 200, warmup: int = 10,
                 threads: int | None = None, progress: bool = True) -> dict:
    """Time `hops` hops per backend for each engine under `path` (all at the same geometry per engine)."""
    from tqdm import tqdm

    results = []
    for engine_dir in engine_dirs(path):
        runners = {}
        for b in backends or available_backends():
            runners[b] = open_engine(engine_dir, b, threads)
        g = next(iter(runners.values())).g
        hop_seconds = g.samples / runners[next(iter(runners))].manifest["rates"]["sample_rate"]
        states = {b: r.init_state() for b, r in runners.items()}
        inputs = {b: example_inputs(g, 0, r.device) for b, r in runners.items()}
        times = {b: [] for b in runners}
        for i in tqdm(range(warmup + hops), desc=f"{engine_dir.name} (batch {g.batch})", disable=not progress):
            for b, runner in runners.items():
                if runner.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                runner.hop(states[b], **inputs[b])
                if runner.device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= warmup:
                    times[b].append(time.perf_counter() - start)
        for b, t in times.items():
            ms = percentiles(np.array(t) * 1e3)
            results.append({"engine": str(engine_dir), "backend": b, "batch": g.batch, "hop_latents": g.hop,
                            "hop_seconds": hop_seconds, "evaluations": g.evaluations, "hop_ms": ms,
                            # compute seconds per second of audio, per stream and for the whole batch
                            "rtf": ms["p50"] / 1e3 / hop_seconds,
                            "rtf_per_stream": ms["p50"] / 1e3 / hop_seconds / g.batch,
                            # streams one device keeps real time with, if every hop took the p99 time
                            "realtime_streams": int(g.batch * hop_seconds // (ms["p99"] / 1e3)),
                            "device": runners[b].device.type})
    return {"threads": torch.get_num_threads(), "device": _device_name(), "results": results}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()


def format_bench(report: dict) -> str:
    lines = [f"{report['device']}, {report['threads']} thread(s)",
             f"{'batch':>5} {'backend':<12} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'RTF':>6} {'RTF/stream':>10} "
             f"{'streams':>8}"]
    for r in report["results"]:
        h = r["hop_ms"]
        lines.append(f"{r['batch']:>5} {r['backend']:<12} {h['p50']:>8.2f} {h['p95']:>8.2f} {h['p99']:>8.2f} "
                     f"{r['rtf']:>6.3f} {r['rtf_per_stream']:>10.4f} {r['realtime_streams']:>8}")
    by_batch: dict[int, dict[str, float]] = {}
    for r in report["results"]:
        by_batch.setdefault(r["batch"], {})[r["backend"]] = r["hop_ms"]["p50"]
    for batch, t in by_batch.items():
        ref_name = "torch-eager" if "torch-eager" in t else "torch"
        if ref_name not in t:
            continue
        others = ", ".join(f"{b} {t[ref_name] / v:.2f}x" for b, v in t.items() if b != ref_name)
        if others:
            lines.append(f"batch {batch}: speed-up over torch eager (p50): {others}")
    return "\n".join(lines)
