"""Sliding-window streaming generation: the hop loop that `visaudio render`, `eval` and the runtime share.

Each hop generates the next H latent frames per ear given the previous W - H generated latents (clean
context), the frames and head poses of the window, and injected noise; then the streaming VAE decoder
turns the H new latents into H * hop samples per ear. All state lives in one preallocated
`StreamState` (moshi style), updated in place and resettable per stream.

Time bookkeeping: latent l is centred at l * hop samples; video frame k (t = k / fps) is latent
k * latents_per_frame. A hop that ends at latent n + H needs the frames with index < (n + H) / 2 and
the poses at latent times < n + H: nothing later (look-ahead 0). The decoder output lags one VAE hop.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.flow import ROLE_CONTEXT, ROLE_HORIZON, ROLE_MISSING
from engine.model import BinauralModel
from engine.sampling import WindowFlow, couple_ears, sample_euler
from engine.vae import DecoderState


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


@dataclass
class StreamState:
    """Per-stream state of the hop loop (batch B of independent streams)."""

    latents: torch.Tensor  # (B, E, W, D) the window's latents; the newest are at the end
    valid: torch.Tensor  # (B,) how many of them are real (generated) latents
    grids: torch.Tensor  # (B, Fw, G, width) encoded frames of the window
    video_present: torch.Tensor  # (B, Fw) bool
    pose: torch.Tensor  # (B, W, 3) degrees
    pose_present: torch.Tensor  # (B, W) bool
    decoder: DecoderState  # (B * E, hop)

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Forget the past of all streams, or of those where mask (B,) is True."""
        keep = torch.zeros_like(self.valid, dtype=torch.bool) if mask is None else ~mask
        self.valid.mul_(keep)
        self.video_present.logical_and_(keep[:, None])
        self.pose_present.logical_and_(keep[:, None])
        ears = self.latents.shape[1]
        self.decoder.tail.mul_(keep.repeat_interleave(ears)[:, None])


class StreamGenerator:
    """Runs hops of H latents for B streams with a model and its sampler (or an override)."""

    def __init__(self, model: BinauralModel, hop_latents: int = 4, batch: int = 1,
                 times: torch.Tensor | None = None, guidance: float | None = None):
        cfg = model.flow.cfg
        if hop_latents % cfg.latents_per_frame or not 0 < hop_latents < cfg.window:
            raise ValueError(f"hop of {hop_latents} latents: must be a multiple of {cfg.latents_per_frame} "
                             f"and shorter than the window ({cfg.window})")
        self.model, self.hop, self.batch = model, hop_latents, batch
        self.times = torch.tensor(model.sampler.times) if times is None else times
        self.guidance = model.sampler.guidance if guidance is None else guidance
        self.frames_per_hop = hop_latents // cfg.latents_per_frame
        self.samples_per_hop = hop_latents * model.vae.cfg.hop

    def init_state(self) -> StreamState:
        cfg, b = self.model.flow.cfg, self.batch
        device = self.model.vae.mean.device
        return StreamState(
            latents=torch.zeros(b, cfg.ears, cfg.window, cfg.latent_dim, device=device),
            valid=torch.zeros(b, dtype=torch.long, device=device),
            grids=torch.zeros(b, cfg.frames, cfg.grid * cfg.grid, cfg.width, device=device),
            video_present=torch.zeros(b, cfg.frames, dtype=torch.bool, device=device),
            pose=torch.zeros(b, cfg.window, 3, device=device),
            pose_present=torch.zeros(b, cfg.window, dtype=torch.bool, device=device),
            decoder=self.model.vae.init_decoder(b * cfg.ears))

    def roles(self, state: StreamState) -> torch.Tensor:
        w, h = self.model.flow.cfg.window, self.hop
        pos = torch.arange(w, device=state.valid.device)[None]
        context_start = (w - h) - state.valid.clamp(max=w - h)[:, None]
        roles = torch.where(pos >= context_start, ROLE_CONTEXT, ROLE_MISSING)
        return torch.where(pos >= w - h, ROLE_HORIZON, roles)

    @torch.no_grad()
    def step(self, state: StreamState, frames: torch.Tensor, frame_present: torch.Tensor, pose: torch.Tensor,
             pose_present: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One hop. frames (B, H / 2, S, S, 3) uint8; frame_present (B, H / 2) bool; pose (B, H, 3);
        pose_present (B, H) bool; noise (B, E, H, D) i.i.d. standard normal (coupled across the ears
        here). Returns audio (B, E, H * vae_hop)."""
        flow, h, fh = self.model.flow, self.hop, self.frames_per_hop
        for ring, new, shift in ((state.latents, None, h), (state.grids, flow.encode_frames(frames), fh),
                                 (state.video_present, frame_present, fh), (state.pose, pose, h),
                                 (state.pose_present, pose_present, h)):
            dim = 2 if ring is state.latents else 1
            ring.copy_(torch.roll(ring, -shift, dims=dim))
            if new is not None:
                ring.narrow(dim, ring.shape[dim] - shift, shift).copy_(new)
        roles = self.roles(state)
        missing = (roles == ROLE_MISSING)
        cond = flow.prepare(state.grids, state.video_present, state.pose, state.pose_present & ~missing, roles)
        null = None
        if self.guidance != 1.0:
            off_v, off_p = torch.zeros_like(state.video_present), torch.zeros_like(state.pose_present)
            null = flow.prepare(state.grids, off_v, state.pose, off_p, roles)
        velocity = WindowFlow(flow, state.latents, roles, cond, null, self.guidance)
        start = torch.zeros_like(state.latents)
        start[:, :, -h:] = couple_ears(noise, flow.cfg.ear_noise_correlation)
        window = sample_euler(velocity, start, self.times.to(noise.device))
        state.latents[:, :, -h:] = window[:, :, -h:]
        state.valid.add_(h).clamp_(max=flow.cfg.window)
        ears = flow.cfg.ears
        new = window[:, :, -h:].transpose(-1, -2).reshape(self.batch * ears, flow.cfg.latent_dim, h)
        return self.model.vae.decode(new, state.decoder).reshape(self.batch, ears, -1)


def generate(model: BinauralModel, frames: np.ndarray, fps: float, pose: np.ndarray | None, seed: int = 0,
             hop_latents: int = 4, times: torch.Tensor | None = None, guidance: float | None = None,
             progress: bool = False) -> np.ndarray:
    """Offline generation for one clip through the streaming hop loop (see generate_batch)."""
    return generate_batch(model, frames[None], fps, [pose], [seed], hop_latents, times, guidance, progress)[0]


def generate_batch(model: BinauralModel, frames: np.ndarray, fps: float, poses: list[np.ndarray | None],
                   seeds: list[int], hop_latents: int = 4, times: torch.Tensor | None = None,
                   guidance: float | None = None, progress: bool = False, latents: list | None = None) -> np.ndarray:
    """Offline generation for B clips of equal length as B independent streams of one hop loop.

    frames (B, F, H, W, 3) uint8 at `fps`; poses[b] (P, 4) rows t, yaw, pitch, roll or None (unknown);
    stream b draws its noise from seeds[b], so a clip gives the same audio alone or in a batch.
    If `latents` is a list, each hop's generated latents (B, E, H, D) are appended to it.
    Returns (B, E, samples) aligned with the video (the decoder's one-hop lag removed)."""
    from tqdm import tqdm

    cfg, vcfg = model.flow.cfg, model.vae.cfg
    if abs(fps * cfg.latents_per_frame - vcfg.latents_per_second) > 1e-6:
        raise ValueError(f"the model wants {vcfg.latents_per_second / cfg.latents_per_frame:g} fps video, got {fps:g}")
    batch, count_frames = frames.shape[:2]
    small = box_downsample(frames, cfg.frame_size)
    gen = StreamGenerator(model, hop_latents, batch, times, guidance)
    hops = int(np.ceil(count_frames / gen.frames_per_hop))
    count = hops * hop_latents
    ypr = torch.stack([torch.from_numpy(latent_pose(p[:, 0], p[:, 1:], count, vcfg.latents_per_second))
                       if p is not None else torch.zeros(count, 3) for p in poses])
    pose_known = torch.tensor([p is not None for p in poses])[:, None].expand(batch, hop_latents)
    pad = hops * gen.frames_per_hop - count_frames
    padded = np.concatenate([small, np.repeat(small[:, -1:], pad, 1)], axis=1)
    present = (torch.arange(hops * gen.frames_per_hop) < count_frames)[None].expand(batch, -1)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    state = gen.init_state()
    device = model.vae.mean.device
    out = []
    for k in tqdm(range(hops), desc="hops", disable=not progress):
        f0, l0, fh = k * gen.frames_per_hop, k * hop_latents, gen.frames_per_hop
        noise = torch.stack([torch.randn(cfg.ears, hop_latents, cfg.latent_dim, generator=g) for g in generators])
        audio = gen.step(state, torch.from_numpy(padded[:, f0:f0 + fh]).to(device), present[:, f0:f0 + fh].to(device),
                         ypr[:, l0:l0 + hop_latents].to(device), pose_known.to(device), noise.to(device))
        out.append(audio.cpu())
        if latents is not None:
            latents.append(state.latents[:, :, -hop_latents:].cpu().clone())
    tail = state.decoder.tail.reshape(batch, cfg.ears, -1).cpu()
    audio = torch.cat(out + [tail], dim=-1)[..., vcfg.hop:]
    return audio[..., :int(round(count_frames / fps * vcfg.sample_rate))].numpy()
