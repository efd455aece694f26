"""`visaudio export`: checkpoint -> few-step settings -> traced ONNX -> checked/optimised -> saved engine.

Each step is a function usable on its own (Polygraphy's composable loaders):

    model = load(checkpoint)                               # safetensors checkpoint -> BinauralModel
    geometry = configure(model, hop=4, batch=1, ...)       # the few-step hop: shapes, steps, guidance
    graphs = trace(model, geometry, out_dir)               # three static-shape ONNX graphs (engine/hop.py)
    quantize(graphs, calibration_inputs(model, geometry))  # only for int8: int8 MatMul weights (onnxruntime)
    check(graphs, geometry)                                # onnx.checker + shape inference vs the geometry
    write_manifest(out_dir, ...)                           # rates, shapes, options, hashes, versions

`export_engine` chains them. Graphs are fp32 ONNX, opset 17, static shapes, only ops in TensorRT's
ONNX support list; `precision` = fp16 asks the TensorRT builder for an FP16 engine (engine/backends.py);
int8 quantizes the MatMul weights of the conditions and denoise graphs (onnxruntime only).
Exports are deterministic: the same checkpoint and options give byte-identical files.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from engine.hop import HopGeometry, hop_steps
from engine.model import BinauralModel, load_model

MANIFEST_FORMAT = "visaudio-engine/1"
OPSET = 17
STEPS = ("conditions", "denoise", "decode")
PRECISIONS = ("fp32", "fp16", "int8")
# int8: the graphs whose weights dominate a hop (denoise reads 19.4 MB of fp32 weights per call for the
# shipped student); decode (2 MB, mostly convolutions) stays fp32
QUANTIZED = ("conditions", "denoise")
# int8: onnxruntime quantizes each MatMul's activations per tensor to uint8 on the fly, so a few huge
# channels set a step that rounds the rest to zero. A MatMul whose activations lose more than this share
# of their nonzero entries so, on CALIBRATION_HOPS hops of a fresh stream, stays fp32. The retrained
# student's joint.1.mlp.down sees channels at 300-1150 against ~5 rms while the context fills (77% lost),
# and quantized it held every stream's first 7 hops to ~8 dB SNR against fp32 (41 dB after); over its
# denoise graph's activations and hops the share lost is p50 5% / p90 17% / p99 90%, and with those over
# 20% kept the first hops hold 43-47 dB.
ZEROED_LIMIT = 0.2
CALIBRATION_HOPS = 12


class ExportError(ValueError):
    pass


def sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load(checkpoint: Path | str | None = None) -> tuple[BinauralModel, dict]:
    """The model (default: the shipped student) on the CPU, in eval mode."""
    return load_model(checkpoint)


def configure(model: BinauralModel, hop: int = 4, batch: int = 1, context: int | None = None,
              steps: int | None = None, guidance: float | None = None) -> HopGeometry:
    """The hop to export: the model's own sampler (a student's distilled times) unless `steps` asks for
    a uniform Euler grid of that many steps."""
    times = None if steps is None else [i / steps for i in range(steps + 1)]
    geometry = HopGeometry.of(model, hop, batch, context, times, guidance)
    if geometry.evaluations > 4:
        warnings.warn(f"{geometry.evaluations} network evaluations per hop: a teacher, not a few-step engine")
    return geometry


def _example(spec: list) -> tuple[torch.Tensor, ...]:
    dtypes = {"float32": torch.float32, "uint8": torch.uint8}
    return tuple(torch.zeros(shape, dtype=dtypes[dtype]) for _, shape, dtype in spec)


def trace(model: BinauralModel, geometry: HopGeometry, out_dir: Path | str) -> dict[str, Path]:
    """Trace the three hop steps to OUT/NAME.onnx (legacy TorchScript exporter: deterministic, no
    onnxscript dependency)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = hop_steps(model.cpu().eval(), geometry)
    paths = {}
    for name, (inputs, outputs) in geometry.signature().items():
        path = out_dir / f"{name}.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(modules[name].eval(), _example(inputs), str(path), dynamo=False, opset_version=OPSET,
                              input_names=[n for n, _, _ in inputs], output_names=[n for n, _, _ in outputs],
                              do_constant_folding=True)
        paths[name] = path
    return paths


def zeroed_share(x: torch.Tensor) -> float:
    """The share of x's nonzero entries that per-tensor asymmetric uint8 quantization (onnxruntime's
    DynamicQuantizeLinear: the range spans 0, so zeros stay exact) rounds to zero."""
    scale = (x.max().clamp(min=0) - x.min().clamp(max=0)) / 255
    nonzero = x != 0
    return float((x[nonzero].abs() < scale / 2).float().mean()) if nonzero.any() else 0.0


def calibration_inputs(model: BinauralModel, geometry: HopGeometry, hops: int = CALIBRATION_HOPS) -> dict[str, list]:
    """Each step's inputs on `hops` hops of a fresh stream (random frames, poses and noise; the
    start-up hops, while the context fills, included), by step name."""
    from engine.backends import example_inputs
    from engine.hop import HopRunner, module_step

    modules, seen = hop_steps(model.cpu().eval(), geometry), {name: [] for name in QUANTIZED}

    def recorded(name):
        run = module_step(modules[name], *geometry.signature()[name])

        def step(values):
            if name in seen:
                seen[name].append({n: v.clone() for n, v in values.items()})
            return run(values)
        return step

    runner = HopRunner(geometry, {name: recorded(name) for name in STEPS})
    state = runner.init_state()
    for i in range(hops):
        runner.hop(state, **example_inputs(geometry, i))
    return seen


def quantize(paths: dict[str, Path], calibration: dict[str, list] | None = None) -> dict[str, list[str]]:
    """int8 engines: onnxruntime's dynamic quantization of the MatMul weights (int8 weights, each call's
    activations quantized on the fly; MatMulInteger runs on VNNI), in place. A hop then reads a quarter
    of the weight bytes; on the 2-core Xeon a live hop, which runs after an idle wait, cost ~1.35x the
    same hop back to back, most likely re-reading them. The TorchScript exporter routes weights shared
    by the unrolled flow steps through Identity nodes, which the quantizer skips; their consumers are
    pointed at the weight first. With `calibration` (calibration_inputs), MatMuls whose activations
    quantization would mostly zero (ZEROED_LIMIT) stay fp32; returns their names by graph."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    kept = {}
    for name in QUANTIZED:
        model = onnx.load(str(paths[name]))
        weights = {w.name for w in model.graph.initializer}
        alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity" and n.input[0] in weights}
        if alias.keys() & {o.name for o in model.graph.output}:
            raise ExportError(f"{paths[name].name}: a graph output is a weight")
        nodes = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
        for node in nodes:
            node.input[:] = [alias.get(x, x) for x in node.input]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        onnx.save(model, str(paths[name]))
        kept[name] = [] if calibration is None else _outlier_matmuls(model, calibration[name])
        logging.disable(logging.WARNING)  # its advice to run a shape pre-processing pass (ours are static)
        try:
            quantize_dynamic(str(paths[name]), str(paths[name]), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul"], nodes_to_exclude=kept[name])
        finally:
            logging.disable(logging.NOTSET)
    return kept


def _outlier_matmuls(model, inputs: list[dict]) -> list[str]:
    """The MatMul nodes with a weight (those the quantizer takes) of an fp32 graph whose activation
    input loses more than ZEROED_LIMIT of its nonzero entries to uint8 quantization on any of the
    recorded inputs (run in onnxruntime, every activation exposed as an output)."""
    import onnx
    import onnxruntime as ort

    weights = {w.name for w in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and weights & set(n.input)]
    activations = sorted({x for n in matmuls for x in n.input if x not in weights})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(x) for x in activations if x not in known)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = [i.name for i in session.get_inputs()]
    worst = dict.fromkeys(activations, 0.0)
    for values in inputs:
        out = session.run(activations, {n: values[n].numpy() for n in feeds})
        for x, value in zip(activations, out):
            worst[x] = max(worst[x], zeroed_share(torch.from_numpy(value)))
    return [n.name for n in matmuls if any(worst.get(x, 0.0) > ZEROED_LIMIT for x in n.input)]


def check(paths: dict[str, Path], geometry: HopGeometry) -> None:
    """onnx.checker, full shape inference, and every graph input/output against the geometry; the files
    are rewritten with the inferred shapes (value_info) and without doc strings (stable bytes)."""
    import onnx
    from onnx import shape_inference

    elem = {"float32": onnx.TensorProto.FLOAT, "uint8": onnx.TensorProto.UINT8}
    for name, (inputs, outputs) in geometry.signature().items():
        model = onnx.load(str(paths[name]))
        onnx.checker.check_model(model, full_check=True)
        model = shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        for want, have in ((inputs, model.graph.input), (outputs, model.graph.output)):
            got = [(v.name, tuple(d.dim_value for d in v.type.tensor_type.shape.dim), v.type.tensor_type.elem_type)
                   for v in have]
            expected = [(n, tuple(s), elem[t]) for n, s, t in want]
            if got != expected:
                raise ExportError(f"{paths[name].name}: graph I/O {got} != expected {expected}")
        for node in model.graph.node:
            node.doc_string = ""
        model.doc_string = ""
        onnx.save(model, str(paths[name]))


def versions() -> dict[str, str]:
    import onnx

    from importlib.metadata import version

    return {"visaudio-rt": version("visaudio-rt"), "torch": torch.__version__, "onnx": onnx.__version__}


def write_manifest(out_dir: Path | str, geometry: HopGeometry, model: BinauralModel, checkpoint: Path | str,
                   paths: dict[str, Path], precision: str, fp32_matmuls: dict | None = None) -> Path:
    vae = model.vae.cfg
    manifest = {
        "format": MANIFEST_FORMAT,
        "checkpoint": {"file": str(checkpoint), "sha256": sha256(checkpoint), "role": model.role},
        "rates": {"sample_rate": vae.sample_rate, "latents_per_second": vae.latents_per_second,
                  "fps": vae.latents_per_second / geometry.latents_per_frame},
        "hop": {"latents": geometry.hop, "samples": geometry.samples,
                "seconds": geometry.samples / vae.sample_rate, "context": geometry.window - geometry.hop},
        "steps": len(geometry.times) - 1, "evaluations": geometry.evaluations, "batch": geometry.batch,
        "precision": precision, "opset": OPSET,
        "fp32_matmuls": fp32_matmuls or {},  # int8: the MatMuls calibration kept fp32 (ZEROED_LIMIT), by graph
        "geometry": asdict(geometry),
        "graphs": {name: {"file": paths[name].name, "sha256": sha256(paths[name]),
                          "inputs": [[n, list(s), t] for n, s, t in ins],
                          "outputs": [[n, list(s), t] for n, s, t in outs]}
                   for name, (ins, outs) in geometry.signature().items()},
        "state": [[n, list(s), t] for n, s, t in geometry.state()],
        "versions": versions(),
    }
    path = Path(out_dir) / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def export_engine(out_dir: Path | str, checkpoint: Path | str | None = None, hop: int = 4, batch: int = 1,
                  context: int | None = None, steps: int | None = None, precision: str = "fp32") -> Path:
    """The whole chain; returns OUT/manifest.json."""
    from engine.model import DEFAULT_CHECKPOINT

    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    checkpoint = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    model, _ = load(checkpoint)
    geometry = configure(model, hop, batch, context, steps)
    paths = trace(model, geometry, out_dir)
    kept = quantize(paths, calibration_inputs(model, geometry)) if precision == "int8" else {}
    check(paths, geometry)
    return write_manifest(out_dir, geometry, model, checkpoint, paths, precision, kept)
