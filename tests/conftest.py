import os

# Two cores: keep every test single-threaded so parallel test workers do not fight (DESIGN.md section 8).
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import contextlib  # noqa: E402
import queue  # noqa: E402
import threading  # noqa: E402

import pytest  # noqa: E402

from realtime.runtime import Runtime, RuntimeConfig  # noqa: E402


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A 2 s random clip rendered through the CLI (shared, read-only)."""
    from visaudio.cli import main

    out = tmp_path_factory.mktemp("clips") / "seed5"
    assert main(["scene", "--seed", "5", "--duration", "2", "--out", str(out)]) == 0
    return out


TINY_FLOW = {"latent_dim": 24, "width": 32, "heads": 2, "joint_blocks": 1, "branch_blocks": 1,
             "vision_channels": [8, 8, 8, 8]}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A tiny cache (4 scenes of 2 s), a fitted VAE, a teacher, a mono model and a 2-step student.

    The models are untrained to any quality: they exist to exercise the real code paths quickly."""
    import torch

    from engine.flow import FlowConfig
    from engine.vae import VAEConfig
    from training.distill import DistillConfig, distill
    from training.scene_cache import build_cache
    from training.train_flow import TrainFlowConfig, train_flow
    from training.train_vae import TrainVAEConfig, train_vae

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    cache = build_cache(root / "cache", 4, seconds=2.0, progress=False)
    vae = train_vae(TrainVAEConfig(vae=VAEConfig(latent_dim=24), clips=3, cache=str(cache), eval_scenes=1),
                    root / "vae", progress=False)
    paths = {"root": root, "cache": cache, "vae": vae}
    for name, ears in (("teacher", 2), ("mono", 1)):
        cfg = TrainFlowConfig(flow=FlowConfig(**{**TINY_FLOW, "ears": ears, "interaural": ears == 2}), vae=str(vae),
                              cache=str(cache),
                              holdout=1, steps=4, batch=4, warmup=1, eval_every=2, checkpoint_every=2)
        paths[name] = train_flow(cfg, root / name, progress=False)
    paths["student"] = distill(DistillConfig(teacher=str(paths["teacher"]), cache=str(cache), holdout=1, pool=8,
                                             pool_batch=4, teacher_steps=5, steps=3, batch=4),
                               root / "student", progress=False)
    return paths


# every runtime socket on a free loopback port; a generous wait, so a slow test machine never conceals
LOCAL_RUNTIME = RuntimeConfig.loopback(max_wait_ms=150.0)


@contextlib.contextmanager
def running(runtime: Runtime):
    """The runtime's loop in a thread; yields (endpoints, stop event, thread), then stops and closes it."""
    stop = threading.Event()
    thread = threading.Thread(target=runtime.run, args=(stop.is_set,), daemon=True)
    thread.start()
    try:
        yield runtime.endpoints(), stop, thread
    finally:
        stop.set()
        thread.join(timeout=10)
        runtime.close()


@pytest.fixture
def live(tiny_models):
    """A runtime (tiny student, torch backend, 2 stream slots) polling in a thread; yields its endpoints."""
    import torch

    from engine.hop import StreamGenerator
    from engine.model import load_model

    torch.set_num_threads(1)
    model, _ = load_model(tiny_models["student"])
    ready, stop = queue.Queue(), threading.Event()

    def serve():
        runtime = Runtime(StreamGenerator(model, 4, 2), model.vae.cfg.sample_rate, LOCAL_RUNTIME)
        ready.put(runtime.endpoints())
        try:
            runtime.run(stop.is_set)
        finally:
            runtime.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield ready.get(timeout=30), model
    stop.set()
    thread.join(timeout=10)
