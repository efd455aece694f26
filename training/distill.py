"""`visaudio distill`: a few-step student from the Euler + CFG teacher, guidance folded in.

Method: trajectory distillation (Luhman & Luhman 2021 for one step; the multi-step form of it, as in
reflow-then-distil pipelines such as Frieren for video-to-audio). We chose it over the options in
DESIGN.md section 3 because it needs no JVP (MeanFlow), no adversarial tuning (ARC), and no change of
the network (shortcut models need a step-size input): for a fixed student grid t_0 = 0 < ... < t_K = 1
the teacher's guided ODE (25 Euler steps, CFG 4.5 = 50 evaluations) is integrated once per training
window, its state is read at the student times (Euler paths are piecewise linear, so reading between
teacher steps is exact), and the student, initialised from the teacher, learns the secant velocity
    u(x_{t_i}, t_i | C) = (x_{t_{i+1}} - x_{t_i}) / (t_{i+1} - t_i)
with the conditional inputs only: the guidance lives in its weights. K = 2 evaluations per hop by
default (25x fewer than the teacher).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from engine.config import JsonConfig
from engine.flow import ROLE_CONTEXT, ROLE_HORIZON, FlowNet
from engine.model import BinauralModel, load_model, save_model
from engine.sampling import WindowFlow, couple_ears, sample_euler, uniform_times
from training.train_flow import LatentWindows, _to, split_clips


@dataclass(frozen=True)
class DistillConfig(JsonConfig):
    teacher: str = "out/teacher/model.safetensors"
    cache: str = "cache/train"
    holdout: int = 32  # the teacher's held-out clips are not used here either
    student_times: tuple[float, ...] = (0.0, 0.5, 1.0)
    teacher_steps: int = 25
    guidance: float = 4.5
    guidance_rescale: float = 0.0  # SamplerConfig.guidance_rescale, for the teacher's trajectories
    pool: int = 2048  # teacher trajectories (training windows) generated up front
    pool_batch: int = 32
    steps: int = 2000
    batch: int = 16
    lr: float = 1e-4  # the student starts at the teacher: small steps
    betas: tuple[float, float] = (0.9, 0.95)
    ema: float = 0.995
    seed: int = 0
    # Modules kept at the teacher's weights. The transfer head reads the frame encoder's grid: when
    # distillation moved the encoder, the student's head read features it was not trained on and its
    # ITD error on direct frames rose 20% above the teacher's (30 scenes, measured).
    frozen: tuple[str, ...] = ("frame_encoder", "transfer_head")


def points_on_path(path: list[torch.Tensor], grid: torch.Tensor, times: torch.Tensor) -> list[torch.Tensor]:
    """States of a piecewise-linear (Euler) path with vertices `path` at `grid`, read at `times`."""
    out = []
    for t in times.tolist():
        i = min(int(torch.searchsorted(grid, torch.tensor(t), right=True)) - 1, len(grid) - 2)
        a = (t - float(grid[i])) / float(grid[i + 1] - grid[i])
        out.append(path[i] * (1 - a) + path[i + 1] * a)
    return out


@torch.no_grad()
def teacher_pool(teacher: FlowNet, windows: LatentWindows, cfg: DistillConfig, device, progress: bool = True) -> dict:
    """Teacher trajectories for `cfg.pool` windows: inputs + states at the student times (on the CPU)."""
    from tqdm import tqdm

    rng = np.random.default_rng([cfg.seed, 77])
    noise_rng = torch.Generator().manual_seed(cfg.seed)
    grid = uniform_times(cfg.teacher_steps)
    times = torch.tensor(cfg.student_times)
    chunks = []
    for _ in tqdm(range(0, cfg.pool, cfg.pool_batch), desc="teacher", disable=not progress):
        batch = windows.batch(rng, cfg.pool_batch, short_context=0.15)
        dev = _to(batch, device)
        grids = teacher.encode_frames(dev["frames"])
        cond = teacher.prepare(grids, dev["video_present"], dev["pose"], dev["pose_present"], dev["roles"])
        null = teacher.prepare(grids, torch.zeros_like(dev["video_present"]), dev["pose"],
                               torch.zeros_like(dev["pose_present"]), dev["roles"])
        velocity = WindowFlow(teacher, dev["x1"], dev["roles"], cond, null, cfg.guidance, cfg.guidance_rescale)
        horizon = (dev["roles"] == ROLE_HORIZON)[:, None, :, None]
        noise = couple_ears(torch.randn(dev["x1"].shape, generator=noise_rng), teacher.cfg.ear_noise_correlation)
        x0 = torch.where(horizon, noise.to(device), 0.0)
        path = [x0]
        sample_euler(velocity, x0, grid.to(device), callback=lambda i, t, x: path.append(x))
        batch["trajectory"] = torch.stack([p.cpu() for p in points_on_path(path, grid, times)], dim=1)
        chunks.append(batch)
    return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}


def distill(cfg: DistillConfig, out_dir: Path | str, device: str | None = None, progress: bool = True) -> Path:
    """Generate the teacher pool, train the student, write OUT/model.safetensors."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    teacher_model, teacher_info = load_model(cfg.teacher, device)
    if teacher_model.role != "teacher":
        raise ValueError(f"{cfg.teacher}: a {teacher_model.role!r} model; distil from a teacher")
    teacher = teacher_model.flow
    unknown = [name for name in cfg.frozen if not hasattr(teacher, name)]
    if unknown:
        raise ValueError(f"distill: frozen names no module of the flow network: {unknown}")
    windows = LatentWindows(cfg.cache, teacher_model.vae, teacher.cfg, split_clips(cfg.cache, cfg.holdout)[0], progress)
    start = time.time()
    pool = teacher_pool(teacher, windows, cfg, device, progress)
    pool_seconds = time.time() - start
    student = FlowNet(teacher.cfg, pretrained_vision=False).to(device)
    student.load_state_dict(teacher.state_dict())
    for name in cfg.frozen:
        if getattr(student, name) is not None:  # None: not in this configuration (e.g. no interaural head)
            getattr(student, name).requires_grad_(False)
    ema = {k: v.detach().clone() for k, v in student.state_dict().items()}
    trained = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=cfg.lr, betas=cfg.betas, weight_decay=0.0)
    times = torch.tensor(cfg.student_times)
    rng = np.random.default_rng([cfg.seed, 78])
    log = (out_dir / "log.jsonl").open("w")
    for step in tqdm(range(1, cfg.steps + 1), desc="distill", disable=not progress):
        pick = torch.from_numpy(rng.integers(0, len(pool["x1"]), cfg.batch))
        b = _to({k: v[pick] for k, v in pool.items()}, device)
        k = torch.from_numpy(rng.integers(0, len(times) - 1, cfg.batch)).to(device)  # which student step
        traj = b["trajectory"]  # (B, K + 1, E, W, D)
        rows = torch.arange(cfg.batch, device=device)
        x_start, x_end = traj[rows, k], traj[rows, k + 1]
        t0, t1 = times.to(device)[k], times.to(device)[k + 1]
        horizon = (b["roles"] == ROLE_HORIZON)[:, None, :, None]
        context = (b["roles"] == ROLE_CONTEXT)[:, None, :, None]
        x = torch.where(horizon, x_start, torch.where(context, b["x1"], 0.0))
        v, _ = student(x, t0, b["frames"], b["video_present"], b["pose"], b["pose_present"], b["roles"])
        target = (x_end - x_start) / (t1 - t0)[:, None, None, None]
        loss = (((v - target) ** 2).mean(-1) * horizon[..., 0]).sum() / horizon[..., 0].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        with torch.no_grad():
            for name, value in student.state_dict().items():
                ema[name].lerp_(value.detach(), 1 - cfg.ema)
        log.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
    log.close()
    bundle = BinauralModel(teacher_model.vae, student, replace(teacher_model.sampler, times=cfg.student_times, guidance=1.0), "student")
    info = {"distill": {"config": cfg.to_json(), "teacher": str(cfg.teacher), "teacher_train": teacher_info.get("train"),
                        "pool_seconds": pool_seconds, "wall_seconds": time.time() - start, "device": str(device)}}
    return save_model(out_dir / "model.safetensors", bundle, info, flow_state=ema)
