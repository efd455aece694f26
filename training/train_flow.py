"""`visaudio train flow`: conditional flow matching of the dual-branch network on sliding windows.

Loss (ViSAudio eq. 1, per ear, summed): E || v(x_t, t | C) - (x1 - x0) ||^2 on the horizon positions,
plus, with the interaural head, its supervised loss against the transfer measured on the audio,
x_t = t x1 + (1 - t) x0, t logit-normal (MMAudio), x0 normal with the ears coupled (FlowConfig). Each training window draws its own context/horizon
split (half the time one of the runtime splits, otherwise any), and sometimes a shorter real context
(the start of a stream), so one model serves every hop the runtime uses. Video and pose are dropped
to their learned null conditions 10% of the time each, for classifier-free guidance and for missing
inputs. AdamW (0.9, 0.95), warm-up, EMA weights, bf16 autocast on CUDA, DDP under torchrun.
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.checkpoint import load_checkpoint, optimizer_tensors, restore_optimizer, save_checkpoint
from engine.config import JsonConfig
from engine.interaural import band_matrix, labels as interaural_labels, spectral_factors
from engine.flow import ROLE_CONTEXT, ROLE_HORIZON, ROLE_MISSING, FlowConfig, FlowNet
from engine.model import BinauralModel, SamplerConfig, save_model
from engine.sampling import couple_ears
from training.train_vae import load_vae

RUNTIME_HOPS = (4, 8)  # latent hops the runtime uses (80 / 160 ms); half the windows train these splits


@dataclass(frozen=True)
class TrainFlowConfig(JsonConfig):
    flow: FlowConfig = field(default_factory=FlowConfig)
    vae: str = "checkpoints/vae.safetensors"
    cache: str = "cache/train"  # training/scene_cache.py folder
    holdout: int = 32  # last clips of the cache, for the validation loss
    steps: int = 4000
    batch: int = 16  # windows per step (per process under DDP)
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.95)  # MMAudio
    weight_decay: float = 0.01
    warmup: int = 200
    ema: float = 0.998  # short horizon: CPU runs are a few thousand steps
    transfer_weight: float = 1.0  # interaural head loss (unit-scale targets) added to the flow loss
    video_dropout: float = 0.1
    pose_dropout: float = 0.1
    short_context: float = 0.15  # windows whose real context is shorter than their split (stream start)
    eval_every: int = 250
    checkpoint_every: int = 500
    seed: int = 0


# ------------------------------------------------------------------------------------------------ data


def seen_transfer_labels(vae, audio: torch.Tensor, seen: np.ndarray, latents_per_frame: int,
                         bands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The transfer head's labels for one clip (engine/interaural.labels on its audio (2, samples), in
    whole VAE hops): params (L, PARAMS) and weights (L, 2), the weights zero wherever the frame mask
    `seen` (F,) bool (the cache's visible_dominant) is off: the head learns only where the direction
    heard can be seen."""
    params, weight = interaural_labels(vae.spectra(audio), vae.cfg, bands)
    latent_seen = seen[np.minimum(np.arange(len(params)) // latents_per_frame, len(seen) - 1)]
    return params, weight * torch.from_numpy(latent_seen).float()[:, None]


def transfer_loss(predicted: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted Huber loss of predicted interaural transfers (..., PARAMS) against labels, weights
    (..., 2): the ITD and the mean over the band ILDs, each normalised by its weights' sum."""
    huber = torch.nn.functional.huber_loss(predicted.float(), target, reduction="none")
    itd, ild = huber[..., 0] * weight[..., 0], huber[..., 1:].mean(-1) * weight[..., 1]
    return itd.sum() / weight[..., 0].sum().clamp(min=1) + ild.sum() / weight[..., 1].sum().clamp(min=1)


class LatentWindows:
    """Random training windows: latents of both ears (or the mono mix), frames, latent-rate poses."""

    def __init__(self, cache_dir: str, vae, flow_cfg: FlowConfig, clips: slice, progress: bool = True):
        from tqdm import tqdm

        from engine.generate import latent_pose
        from training.scene_cache import load_cache

        cache = load_cache(cache_dir)
        idx = range(len(cache))[clips]
        if not idx:
            raise ValueError(f"{cache_dir}: no clips in {clips}")
        if cache.frames.shape[2] != flow_cfg.frame_size:
            raise ValueError(f"{cache_dir}: frames are {cache.frames.shape[2]} px, the model wants {flow_cfg.frame_size}")
        self.cfg, self.cache, self.idx = flow_cfg, cache, list(idx)
        vae = copy.deepcopy(vae).cpu()  # the windows live in host memory; batches go to the device
        rate = vae.cfg.latents_per_second
        bands = band_matrix(vae.cfg, flow_cfg.ild_bands_hz)
        latents, poses, transfers, weights = [], [], [], []
        with torch.no_grad():
            for i in tqdm(self.idx, desc="encoding", disable=not progress):
                audio = torch.from_numpy(np.array(cache.audio[i]))
                if flow_cfg.ears == 1:
                    audio = audio.mean(0, keepdim=True)
                audio = audio[:, :audio.shape[-1] // vae.cfg.hop * vae.cfg.hop]
                factors = None
                if flow_cfg.interaural:  # centred ears: the measured transfer divided out
                    params, weight = seen_transfer_labels(vae, audio, np.asarray(cache.visible_dominant[i]),
                                                          flow_cfg.latents_per_frame, bands)
                    factors = spectral_factors(-params, vae.cfg, bands)
                    transfers.append(params)
                    weights.append(weight)
                latents.append(vae.encode(audio, factors=factors).transpose(-1, -2).half())  # (E, L, D)
                times = np.arange(cache.pose.shape[1]) / cache.fps
                poses.append(latent_pose(times, np.asarray(cache.pose[i]), latents[-1].shape[1], rate))
        self.latents = torch.stack(latents)  # (N, E, L, D)
        self.poses = torch.from_numpy(np.stack(poses))  # (N, L, 3)
        # interaural transfer labels (N, L, PARAMS) and their weights (N, L, 2: ITD, ILD)
        self.transfer = torch.stack(transfers) if transfers else None
        self.transfer_weight = torch.stack(weights) if weights else None
        self.pose_known = torch.from_numpy(np.asarray(cache.pose_known)[self.idx])

    def batch(self, rng: np.random.Generator, size: int, video_dropout: float = 0.0, pose_dropout: float = 0.0,
              short_context: float = 0.0) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        w, lpf = cfg.window, cfg.latents_per_frame
        n, _, length, _ = self.latents.shape
        clip = rng.integers(0, n, size)
        start = rng.integers(0, (length - w) // lpf + 1, size) * lpf
        pos = np.arange(w)
        # context/horizon split: the runtime hops half the time, any split (even) otherwise
        split = np.where(rng.random(size) < 0.5, w - rng.choice(RUNTIME_HOPS, size),
                         rng.integers(0, w // lpf, size) * lpf)
        valid = np.where(rng.random(size) < short_context, (rng.random(size) * (split + 1)).astype(int), split)
        roles = np.where(pos[None] >= split[:, None], ROLE_HORIZON,
                         np.where(pos[None] >= (split - valid)[:, None], ROLE_CONTEXT, ROLE_MISSING))
        x1 = torch.stack([self.latents[c, :, s:s + w] for c, s in zip(clip, start)]).float()
        frames = np.stack([self.cache.frames[self.idx[c], s // lpf:(s + w) // lpf] for c, s in zip(clip, start)])
        pose = torch.stack([self.poses[c, s:s + w] for c, s in zip(clip, start)])
        missing = torch.from_numpy(roles == ROLE_MISSING)
        pose_present = (~missing) & self.pose_known[clip][:, None] & torch.from_numpy(rng.random(size) >= pose_dropout)[:, None]
        frame_missing = missing.reshape(size, -1, lpf).all(-1)
        video_present = (~frame_missing) & torch.from_numpy(rng.random(size) >= video_dropout)[:, None]
        batch = {"x1": x1, "frames": torch.from_numpy(frames), "video_present": video_present, "pose": pose,
                 "pose_present": pose_present, "roles": torch.from_numpy(roles)}
        if self.transfer is not None:
            batch["transfer"] = torch.stack([self.transfer[c, s:s + w] for c, s in zip(clip, start)])
            batch["transfer_weight"] = torch.stack([self.transfer_weight[c, s:s + w] for c, s in zip(clip, start)])
        return batch


def split_clips(cache_dir: str, holdout: int) -> tuple[slice, slice]:
    """(training clips, the last `holdout` clips) of a cache."""
    count = len(np.load(Path(cache_dir) / "pose_known.npy", mmap_mode="r"))
    if count <= holdout:
        raise ValueError(f"{cache_dir}: {count} clips, need more than the {holdout} held out")
    return slice(0, count - holdout), slice(count - holdout, count)


def training_losses(net, batch: dict, ear_correlation: float,
                    rng_torch: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """flow: velocity MSE on the horizon positions (mean over horizon latents, summed over ears);
    transfer (interaural head only): weighted Huber loss of the predicted transfer against the labels
    at every position with a latent (engine/interaural.py)."""
    x1, roles = batch["x1"], batch["roles"]
    b = x1.shape[0]
    x0 = couple_ears(torch.randn(x1.shape, generator=rng_torch, device=x1.device), ear_correlation)
    t = torch.sigmoid(torch.randn(b, generator=rng_torch, device=x1.device))  # logit-normal
    horizon = (roles == ROLE_HORIZON)[:, None, :, None]
    xt = torch.where(horizon, t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0,
                     torch.where((roles == ROLE_CONTEXT)[:, None, :, None], x1, torch.zeros_like(x1)))
    v, transfer = net(xt, t, batch["frames"], batch["video_present"], batch["pose"], batch["pose_present"], roles)
    err = ((v - (x1 - x0)) ** 2).mean(-1) * horizon[..., 0]  # (B, E, W)
    losses = {"flow": err.sum() / horizon[..., 0].sum().clamp(min=1)}
    if "transfer" in batch:
        weight = batch["transfer_weight"] * (roles != ROLE_MISSING)[..., None]  # (B, W, 2)
        losses["transfer"] = transfer_loss(transfer, batch["transfer"], weight)
    return losses


# ------------------------------------------------------------------------------------------------ loop


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return (torch.distributed.get_rank() if world > 1 else 0), world


def train_flow(cfg: TrainFlowConfig, out_dir: Path | str, resume: bool = False, device: str | None = None,
               progress: bool = True) -> Path:
    """Train; write OUT/model.safetensors (EMA weights + the VAE) and OUT/state.safetensors (resume).

    A two-ear network is a teacher (sampled with Euler + CFG); a one-ear network is the mono baseline."""
    role = "teacher" if cfg.flow.ears == 2 else "mono"
    from tqdm import tqdm

    rank, world = _distributed()
    out_dir = Path(out_dir)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    vae, _ = load_vae(cfg.vae)
    if vae.cfg.latent_dim != cfg.flow.latent_dim:
        raise ValueError(f"{cfg.vae}: latent_dim {vae.cfg.latent_dim}, the flow config says {cfg.flow.latent_dim}")
    net = FlowNet(cfg.flow).to(device)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    step, log_path, state_path = 0, out_dir / "log.jsonl", out_dir / "state.safetensors"
    if resume and state_path.exists():
        tensors, info = load_checkpoint(state_path, "flow-train-state")
        if FlowConfig.from_json(info["flow_config"]) != cfg.flow:
            raise ValueError(f"{state_path}: trained with another flow config; cannot resume")
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        ema = {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("ema.")}
        restore_optimizer(opt, {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}, info["optimizer"])
        step = int(info["step"])
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    train_clips, held_clips = split_clips(cfg.cache, cfg.holdout)
    train = LatentWindows(cfg.cache, vae, cfg.flow, train_clips, progress and rank == 0)
    held = LatentWindows(cfg.cache, vae, cfg.flow, held_clips, False)
    rng = np.random.default_rng([cfg.seed, rank, step])
    noise_rng = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank + step)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out_dir / "config.json").write_text(json.dumps(cfg.to_json(), indent=1))
    start_time = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="train flow", disable=not progress or rank != 0)
    while step < cfg.steps:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = _to(train.batch(rng, cfg.batch, cfg.video_dropout, cfg.pose_dropout, cfg.short_context), device)
        with autocast:
            losses = training_losses(model, batch, cfg.flow.ear_noise_correlation, noise_rng)
            loss = losses["flow"] + cfg.transfer_weight * losses.get("transfer", 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        with torch.no_grad():
            for k, v in net.state_dict().items():
                ema[k].lerp_(v.detach(), 1 - cfg.ema)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        record = {"step": step, "loss": loss.item(), **{f"{k}_loss": v.item() for k, v in losses.items()},
                  "grad_norm": float(grad), "lr": lr, "seconds": time.time() - start_time}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val = validation_losses(net, ema, held, cfg, device)
            record.update({f"val_{k}_loss": v for k, v in val.items()})
            record["val_loss"] = val["flow"]
            bar.write(f"step {step}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
        if rank == 0:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                bundle = BinauralModel(vae, net, SamplerConfig(), role)
                info = {"train": {"step": step, "config": cfg.to_json(), "world_size": world,
                                  "device": str(device), "wall_seconds": time.time() - start_time}}
                save_model(out_dir / "model.safetensors", bundle, info, flow_state=ema)
                opt_t, opt_info = optimizer_tensors(opt)
                tensors = {**{f"net.{k}": v for k, v in net.state_dict().items()},
                           **{f"ema.{k}": v for k, v in ema.items()}, **{f"opt.{k}": v for k, v in opt_t.items()}}
                save_checkpoint(state_path, tensors, "flow-train-state",
                                {"step": step, "flow_config": cfg.flow.to_json(), "optimizer": opt_info})
    bar.close()
    if world > 1:
        torch.distributed.barrier()
    return out_dir / "model.safetensors"


@torch.no_grad()
def validation_losses(net: FlowNet, ema: dict, held: LatentWindows, cfg: TrainFlowConfig, device,
                      batches: int = 4) -> dict[str, float]:
    """Losses of the EMA weights on held-out clips (fixed windows and noise)."""
    probe = FlowNet(cfg.flow, pretrained_vision=False).to(device)
    probe.load_state_dict(ema)
    rng, noise = np.random.default_rng(1234), torch.Generator(device=device).manual_seed(1234)
    losses = [training_losses(probe, _to(held.batch(rng, cfg.batch), device), cfg.flow.ear_noise_correlation, noise)
              for _ in range(batches)]
    return {k: float(np.mean([l[k].item() for l in losses])) for k in losses[0]}
