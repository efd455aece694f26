"""Inference engines: one interface (`HopRunner`: init_state / hop), several backends.

    torch        the hop modules; on CUDA each step is captured once in a CUDA graph with static
                 buffers allocated once (replay = one launch per step); `torch-eager` never captures
    onnxruntime  the exported ONNX graphs (CPU; CUDA / TensorRT execution providers if onnxruntime-gpu)
    tensorrt     native TensorRT plans built from the same ONNX (min == opt == max profile, FP16 when
                 the engine was exported with precision fp16), preallocated device buffers, one stream

`open_engine(dir, backend)` ("auto": the fastest available, timed on the spot) validates the manifest (format, file hashes, graph I/O against the
geometry, TensorRT/GPU versions of a plan) and refuses anything that does not match, naming it.
TensorRT cannot be installed on our machines: that backend follows the documented tensorrt Python API
(10.x) and its tests run only where tensorrt and a GPU exist.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from engine.hop import HopGeometry, HopRunner, Step, StreamGenerator
from engine.model import load_model

BACKENDS = ("auto", "torch", "torch-eager", "onnxruntime", "tensorrt")  # torch = CUDA graphs on a GPU, else eager
STEP_NAMES = ("conditions", "denoise", "decode")


class EngineError(ValueError):
    pass


# ------------------------------------------------------------------------------------------- manifest


def read_manifest(engine_dir: Path | str) -> dict:
    from export.steps import MANIFEST_FORMAT, sha256

    engine_dir = Path(engine_dir)
    path = engine_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(f"{engine_dir}: no manifest.json (run `visaudio export --out {engine_dir}`)") from None
    except json.JSONDecodeError as exc:
        raise EngineError(f"{path}: not JSON ({exc})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise EngineError(f"{path}: format {manifest.get('format')!r}, this build reads {MANIFEST_FORMAT!r}")
    try:
        geometry = HopGeometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in manifest["geometry"].items()})
    except (KeyError, TypeError) as exc:
        raise EngineError(f"{path}: bad geometry ({exc})") from None
    for name, (ins, outs) in geometry.signature().items():
        entry = manifest["graphs"].get(name)
        if entry is None:
            raise EngineError(f"{path}: graph {name!r} missing")
        if [[n, list(s), t] for n, s, t in ins] != entry["inputs"] or \
                [[n, list(s), t] for n, s, t in outs] != entry["outputs"]:
            raise EngineError(f"{path}: graph {name!r} I/O does not match its geometry")
        onnx_path = engine_dir / entry["file"]
        if not onnx_path.exists():
            raise EngineError(f"{onnx_path}: missing")
        if sha256(onnx_path) != entry["sha256"]:
            raise EngineError(f"{onnx_path}: sha256 differs from the manifest (changed or corrupt file)")
    manifest["_geometry"], manifest["_dir"] = geometry, engine_dir
    return manifest


# ------------------------------------------------------------------------------------------- backends


def onnxruntime_steps(manifest: dict, threads: int | None = None, providers: list[str] | None = None) -> dict[str, Step]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # idle worker threads sleep instead of spinning: the runtime shares its cores with I/O threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                              if p in ort.get_available_providers()]
    steps = {}
    for name in STEP_NAMES:
        entry = manifest["graphs"][name]
        session = ort.InferenceSession(str(manifest["_dir"] / entry["file"]), opts, providers=providers)
        in_names, out_names = [n for n, _, _ in entry["inputs"]], [n for n, _, _ in entry["outputs"]]

        def run(values, session=session, in_names=in_names, out_names=out_names):
            feed = {n: values[n].cpu().numpy() for n in in_names}
            return {n: torch.from_numpy(v) for n, v in zip(out_names, session.run(out_names, feed))}

        steps[name] = run
    return steps


def cuda_graph_steps(runner: StreamGenerator) -> dict[str, Step]:
    """Each torch step captured once in a CUDA graph over static input/output buffers (allocated once);
    a call copies its inputs into the static buffers and replays the graph."""
    steps = {}
    stream = torch.cuda.Stream()
    for name, module in runner.modules.items():
        inputs, outputs = runner.signature[name]
        static_in = [torch.zeros(s, dtype=torch.uint8 if t == "uint8" else torch.float32, device="cuda")
                     for _, s, t in inputs]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(3):  # warm up (allocator, cuBLAS handles) before capture
                module(*static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            static_out = module(*static_in)
        in_names, out_names = [n for n, _, _ in inputs], [n for n, _, _ in outputs]

        def run(values, graph=graph, static_in=static_in, static_out=static_out, in_names=in_names,
                out_names=out_names):
            for buf, n in zip(static_in, in_names):
                buf.copy_(values[n])
            graph.replay()
            return dict(zip(out_names, static_out))

        steps[name] = run
    return steps


def tensorrt_plan_path(manifest: dict, name: str) -> Path:
    return manifest["_dir"] / f"{name}.{manifest['precision']}.plan"


def build_tensorrt(manifest: dict) -> dict:
    """Build (or reuse) one TensorRT plan per graph from the engine's ONNX; record versions in the manifest."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    gpu = torch.cuda.get_device_name()
    plans = manifest.get("tensorrt", {})
    for name in STEP_NAMES:
        path = tensorrt_plan_path(manifest, name)
        if path.exists() and plans.get(name, {}).get("tensorrt") == trt.__version__ and plans[name].get("gpu") == gpu:
            continue
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, logger)
        onnx_path = manifest["_dir"] / manifest["graphs"][name]["file"]
        if not parser.parse(onnx_path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"{onnx_path}: TensorRT cannot parse it: {errors}")
        config = builder.create_builder_config()
        if manifest["precision"] == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for n, shape, _ in manifest["graphs"][name]["inputs"]:
            profile.set_shape(n, shape, shape, shape)  # static: min == opt == max
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineError(f"{onnx_path}: TensorRT build failed")
        path.write_bytes(bytes(plan))
        plans[name] = {"file": path.name, "tensorrt": trt.__version__, "gpu": gpu}
    manifest["tensorrt"] = plans
    on_disk = {k: v for k, v in manifest.items() if not k.startswith("_")}
    (manifest["_dir"] / "manifest.json").write_text(json.dumps(on_disk, indent=1) + "\n")
    return plans


def tensorrt_steps(manifest: dict) -> dict[str, Step]:
    """TensorRT plans run with preallocated torch CUDA buffers as I/O on one CUDA stream."""
    import tensorrt as trt

    plans = build_tensorrt(manifest)
    gpu = torch.cuda.get_device_name()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    stream = torch.cuda.Stream()
    steps = {}
    for name in STEP_NAMES:
        if plans[name]["tensorrt"] != trt.__version__ or plans[name]["gpu"] != gpu:
            raise EngineError(f"{name} plan was built with TensorRT {plans[name]['tensorrt']} on {plans[name]['gpu']}, "
                              f"this is TensorRT {trt.__version__} on {gpu}: rebuild it")
        engine = runtime.deserialize_cuda_engine(tensorrt_plan_path(manifest, name).read_bytes())
        if engine is None:
            raise EngineError(f"{tensorrt_plan_path(manifest, name)}: not a valid plan for this TensorRT")
        context = engine.create_execution_context()
        entry = manifest["graphs"][name]
        buffers = {}
        for n, shape, dtype in entry["inputs"] + entry["outputs"]:
            buffers[n] = torch.zeros(shape, dtype=torch.uint8 if dtype == "uint8" else torch.float32, device="cuda")
            context.set_tensor_address(n, buffers[n].data_ptr())
        in_names, out_names = [n for n, _, _ in entry["inputs"]], [n for n, _, _ in entry["outputs"]]

        def run(values, context=context, buffers=buffers, in_names=in_names, out_names=out_names):
            with torch.cuda.stream(stream):
                for n in in_names:
                    buffers[n].copy_(values[n])
                context.execute_async_v3(stream.cuda_stream)
            stream.synchronize()
            return {n: buffers[n] for n in out_names}

        steps[name] = run
    return steps


# ------------------------------------------------------------------------------------------- opening


def available_backends() -> list[str]:
    """Backends this machine can run, the eager reference first."""
    out = ["torch-eager", "torch"] if torch.cuda.is_available() else ["torch"]
    try:
        import onnxruntime  # noqa: F401

        out.append("onnxruntime")
    except ImportError:
        pass
    try:
        import tensorrt  # noqa: F401

        if torch.cuda.is_available():
            out.append("tensorrt")
    except ImportError:
        pass
    return out


def open_engine(engine_dir: Path | str, backend: str = "onnxruntime", threads: int | None = None,
                device: str | None = None, reference: bool = False) -> HopRunner:
    """A warmed-up engine for the exported hop in `engine_dir`. torch loads the checkpoint the manifest
    names (and checks its hash); the others run the ONNX/plan files; "auto" takes the fastest. An int8
    engine runs on onnxruntime only; `reference` opens its checkpoint in fp32 torch-eager instead (what
    the comparator holds it to)."""
    from export.steps import sha256

    if backend == "auto":
        return best_backend(engine_dir, threads)

    manifest = read_manifest(engine_dir)
    geometry: HopGeometry = manifest["_geometry"]
    held_to_fp32 = reference and backend == "torch-eager"
    if manifest["precision"] == "int8" and backend != "onnxruntime" and not held_to_fp32:
        raise EngineError(f"{engine_dir}: an int8 engine runs on onnxruntime only (its graphs are dynamically "
                          f"quantized); export fp32 or fp16 for the {backend} backend")
    if threads:
        torch.set_num_threads(threads)
    if backend in ("torch", "torch-eager"):
        checkpoint = Path(manifest["checkpoint"]["file"])
        if not checkpoint.is_absolute() and not checkpoint.exists():
            checkpoint = Path(engine_dir) / checkpoint
        if not checkpoint.exists() or sha256(checkpoint) != manifest["checkpoint"]["sha256"]:
            raise EngineError(f"{checkpoint}: missing or not the checkpoint this engine was exported from")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, _ = load_model(checkpoint, device)
        runner = StreamGenerator(model, geometry.hop, geometry.batch, geometry.times, geometry.guidance,
                                 geometry.window - geometry.hop)
        if runner.device.type == "cuda" and backend == "torch":
            runner.steps = cuda_graph_steps(runner)
    elif backend == "onnxruntime":
        runner = HopRunner(geometry, onnxruntime_steps(manifest, threads))
    elif backend == "tensorrt":
        if not torch.cuda.is_available():
            raise EngineError("the tensorrt backend needs an NVIDIA GPU")
        runner = HopRunner(geometry, tensorrt_steps(manifest), "cuda")
    else:
        raise EngineError(f"backend must be one of {BACKENDS}, got {backend!r}")
    runner.backend, runner.manifest = backend, manifest
    warm_up(runner)
    return runner


def example_inputs(geometry: HopGeometry, seed: int = 0, device="cpu") -> dict[str, torch.Tensor]:
    """Random hop inputs of the geometry (for warm-up, parity checks and benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    b, h = geometry.batch, geometry.hop
    return {"frames": torch.randint(0, 256, (b, geometry.hop_frames, geometry.frame_size, geometry.frame_size, 3),
                                    generator=g, dtype=torch.uint8).to(device),
            "frame_present": torch.ones(b, geometry.hop_frames, device=device),
            "pose": (torch.rand(b, h, 3, generator=g) * 60 - 30).to(device),
            "pose_present": torch.ones(b, h, device=device),
            "noise": torch.randn(b, geometry.ears, h, geometry.latent_dim, generator=g).to(device)}


def warm_up(runner: HopRunner, hops: int = 3) -> None:
    state = runner.init_state()
    for i in range(hops):
        runner.hop(state, **example_inputs(runner.g, i, runner.device))


def best_backend(engine_dir: Path | str, threads: int | None = None, hops: int = 20) -> HopRunner:
    """`--backend auto`: open every available backend on this engine, time it, keep the fastest
    (its `timings` attribute holds everyone's seconds per hop)."""
    import time

    timings, runners = {}, {}
    for backend in available_backends():
        try:
            runner = open_engine(engine_dir, backend, threads)
        except EngineError:
            continue
        state, inputs = runner.init_state(), example_inputs(runner.g, 0, runner.device)
        start = time.perf_counter()
        for _ in range(hops):
            runner.hop(state, **inputs)
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        timings[backend], runners[backend] = (time.perf_counter() - start) / hops, runner
    if not runners:
        raise EngineError(f"{engine_dir}: no backend could open it")
    best = runners[min(timings, key=timings.get)]
    best.timings = timings
    return best


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

