"""Cross-backend comparator (Polygraphy's `run --onnxrt --trt` idea): the same inputs and noise through
every backend, hop after hop from the same start state; max abs error and SNR of every output."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from engine.backends import available_backends, example_inputs, open_engine, read_manifest


def snr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    noise = (reference.double() - other.double()).pow(2).sum().item()
    signal = reference.double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def compare_backends(engine_dir: Path | str, backends: list[str] | None = None, hops: int = 8, seed: int = 0,
                     threads: int | None = None) -> dict:
    """{"reference": backend, "hops": n, "pairs": {"other vs reference": {output: {max_abs, snr_db}}}}.

    Default backends: every available one (on a GPU: torch eager first, as the reference, then the
    CUDA-graph torch backend, onnxruntime, TensorRT); for an int8 engine, onnxruntime against the fp32
    checkpoint in torch eager."""
    int8 = read_manifest(engine_dir)["precision"] == "int8"
    backends = backends or (["torch-eager", "onnxruntime"] if int8 else available_backends())
    runners = {b: open_engine(engine_dir, b, threads, reference=True) for b in backends}
    reference = backends[0]
    states = {b: r.init_state() for b, r in runners.items()}
    worst: dict[str, dict[str, dict]] = {b: {} for b in backends[1:]}
    for i in range(hops):
        g = runners[reference].g
        inputs = example_inputs(g, seed + i)
        values = {}
        for b, runner in runners.items():
            runner.hop(states[b], **{k: v.to(runner.device) for k, v in inputs.items()})
            values[b] = {k: v.detach().float().cpu() for k, v in runner.values.items()}
        for b in backends[1:]:
            for name, ref in values[reference].items():  # (state inputs: read after the hop, the _next rows)
                if name not in values[b] or ref.dtype == torch.uint8 or name in states[reference].buffers:
                    continue
                err = (values[b][name] - ref).abs().max().item()
                snr = snr_db(ref, values[b][name])
                entry = worst[b].setdefault(name, {"max_abs": 0.0, "snr_db": math.inf})
                entry["max_abs"], entry["snr_db"] = max(entry["max_abs"], err), min(entry["snr_db"], snr)
    return {"reference": reference, "hops": hops,
            "pairs": {f"{b} vs {reference}": worst[b] for b in backends[1:]}}


def format_comparison(report: dict) -> str:
    lines = [f"parity over {report['hops']} hops (same inputs and noise), reference {report['reference']}:"]
    for pair, outputs in report["pairs"].items():
        lines.append(f"  {pair}")
        for name, e in outputs.items():
            lines.append(f"    {name:<18} max abs {e['max_abs']:.3g}   SNR {e['snr_db']:.1f} dB")
    return "\n".join(lines)
