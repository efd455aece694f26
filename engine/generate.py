"""Offline generation through the streaming hop loop (engine/hop.py) that the runtime runs too.

Each hop generates the next H latent frames per ear given the previous W - H generated latents (clean
context), the frames and head poses of the window, and injected noise; then the streaming VAE decoder
turns the H new latents into H * hop samples per ear. A hop that ends at latent n + H reads the
frames with index < (n + H) / 2 and the poses at latent times < n + H: nothing later (look-ahead 0).
"""
from __future__ import annotations

import numpy as np
import torch

from engine.hop import HopRunner, StreamGenerator, decoder_flush
from engine.model import BinauralModel


def box_downsample(frames: np.ndarray, size: int) -> np.ndarray:
    """Box-filter (..., H, W, 3) uint8 frames to (..., size, size, 3); H and W must be multiples of size."""
    *lead, h, w, c = frames.shape
    if h % size or w % size:
        raise ValueError(f"frames of {w}x{h} cannot be box-filtered to {size}x{size} (need multiples)")
    blocks = frames.reshape(*lead, size, h // size, size, w // size, c).astype(np.float32)
    return np.clip(np.rint(blocks.mean(axis=(-4, -2))), 0, 255).astype(np.uint8)


def latent_pose(frame_times: np.ndarray, frame_ypr: np.ndarray, count: int, latents_per_second: float) -> np.ndarray:
    """Head yaw/pitch/roll (count, 3) at latent times l / latents_per_second (held past the ends)."""
    from engine.geometry import interpolate_ypr

    return interpolate_ypr(frame_times, frame_ypr, np.arange(count) / latents_per_second).astype(np.float32)


def generate(model: BinauralModel, frames: np.ndarray, fps: float, pose: np.ndarray | None, seed: int = 0,
             hop_latents: int = 4, times: torch.Tensor | None = None, guidance: float | None = None,
             progress: bool = False) -> np.ndarray:
    """Offline generation for one clip through the streaming hop loop (see generate_batch)."""
    return generate_batch(model, frames[None], fps, [pose], [seed], hop_latents, times, guidance, progress)[0]


def generate_batch(model: BinauralModel, frames: np.ndarray, fps: float, poses: list[np.ndarray | None],
                   seeds: list[int], hop_latents: int = 4, times: torch.Tensor | None = None,
                   guidance: float | None = None, progress: bool = False, record: list | None = None) -> np.ndarray:
    """Offline generation for B clips of equal length as B independent streams of one hop loop.

    frames (B, F, H, W, 3) uint8 at `fps`; poses[b] (P, 4) rows t, yaw, pitch, roll or None (unknown);
    stream b draws its noise from seeds[b], so a clip gives the same audio alone or in a batch.
    If `record` is a list, each hop's (latents (B, E, H, D), transfer (B, W, P) or None, gate gain (B, H) dB or
    None) are appended to it.
    Returns (B, E, samples) aligned with the video (the decoder's one-hop lag removed)."""
    runner = StreamGenerator(model, hop_latents, frames.shape[0], times, guidance)
    return run_streams(runner, frames, fps, poses, seeds, model.vae.cfg.sample_rate, progress, record)


def run_streams(runner: HopRunner, frames: np.ndarray, fps: float, poses: list[np.ndarray | None],
                seeds: list[int], sample_rate: int, progress: bool = False, record: list | None = None) -> np.ndarray:
    """generate_batch on any engine (engine/backends.py), B = the runner's batch: each clip becomes a
    StreamInputs fed with all its frames and poses up front, then read hop by hop as the runtime does."""
    from tqdm import tqdm

    from engine.inputs import StreamInputs

    g = runner.g
    latents_per_second = sample_rate / g.vae_hop
    if abs(fps * g.latents_per_frame - latents_per_second) > 1e-6:
        raise ValueError(f"the model wants {latents_per_second / g.latents_per_frame:g} fps video, got {fps:g}")
    batch, count_frames = frames.shape[:2]
    if batch != g.batch:
        raise ValueError(f"{batch} clips for an engine of batch {g.batch}")
    streams = []
    for b, pose in enumerate(poses):
        inputs = StreamInputs(fps, latents_per_second, g.frame_size, g.hop_frames, g.hop, origin_ns=0,
                              end_frame=count_frames, pose_history=max(512, 0 if pose is None else len(pose)))
        for i in range(count_frames):
            inputs.add_frame(int(round(i * 1e9 / fps)), frames[b, i])
        for row in () if pose is None else pose:
            inputs.add_pose(int(round(row[0] * 1e9)), row[1:])
        streams.append(inputs)
    hops = int(np.ceil(count_frames / g.hop_frames))
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    state = runner.init_state()
    device = runner.device
    out = []
    for _ in tqdm(range(hops), desc="hops", disable=not progress):
        f, fp, p, pp = (torch.from_numpy(np.stack(x)).to(device) for x in zip(*(s.take_hop() for s in streams)))
        noise = torch.stack([torch.randn(g.ears, g.hop, g.latent_dim, generator=gen) for gen in generators])
        out.append(runner.hop(state, f, fp, p, pp, noise.to(device)).cpu())
        if record is not None:
            values = runner.values
            record.append(tuple(values[n].cpu() if n in values else None for n in ("new_latents", "transfer", "gate_db")))
    tail = decoder_flush(g, state).cpu()
    audio = torch.cat(out + [tail], dim=-1)[..., g.vae_hop:]
    return audio[..., :int(round(count_frames / fps * sample_rate))].numpy()
