"""One streaming hop as three fixed-shape steps with explicit state: what every backend runs.

    conditions  new frames + poses, state rings  -> next rings, the window's conditions (per hop)
    denoise     latent ring, noise, conditions   -> next latent ring, the hop's latents (steps unrolled)
    decode      the hop's latents, transfer, gate gain, decoder tail (+ gate) -> audio, next tail (+ gate)

Each step is a pure function of named tensors (`HopGeometry.signature`), so the torch backend runs the
modules, `visaudio export` traces the very same modules to ONNX, and `HopRunner` (the host loop:
feed inputs and state, keep the outputs, swap state) is shared by all backends. State lives in
preallocated buffers (moshi style) and is reset per stream by zeroing its presence masks.

Time bookkeeping: latent l is centred at l * vae_hop samples; video frame k is latent
k * latents_per_frame. A hop of H latents brings H / latents_per_frame new frames and H poses (at
the new latent times); nothing later is read (look-ahead 0). The decoder output lags one VAE hop.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from engine import gate
from engine.flow import ROLE_CONTEXT, ROLE_HORIZON, ROLE_MISSING, Conditions, FlowNet
from engine.interaural import (OCTAVE_ILD_BANDS_HZ, band_matrix, hold_offscreen, mix_ears, spectral_factors,
                               transfer_params)
from engine.model import BinauralModel
from engine.sampling import WindowFlow, couple_ears, sample_euler

CONDITION_FIELDS = ("video_tokens", "audio_cond", "video_cond", "latent_keep")


@dataclass(frozen=True)
class HopGeometry:
    """Every shape of one hop for B streams (MMAudio's sequence-config idea, for a sliding window)."""

    batch: int
    ears: int
    window: int  # latents per window = context + hop
    hop: int  # latents per hop
    latent_dim: int
    latents_per_frame: int
    frame_size: int
    grid_tokens: int
    width: int
    vae_hop: int  # samples per latent
    transfer: bool  # the interaural head's output goes to the decoder
    guidance: float
    times: tuple[float, ...] = field(default=(0.0, 1.0))
    hold: bool = False  # the last seen source is held in the world off screen (interaural.hold_offscreen)
    side: float = 1.0  # share of the centred ears' difference that is decoded (interaural.mix_ears)
    gate: bool = False  # the silence gate's gain goes to the decoder (engine/gate.py)
    sample_rate: int = 16000
    guidance_rescale: float = 0.0  # SamplerConfig.guidance_rescale
    # the transfer's ILD band centres (FlowConfig.ild_bands_hz; the default: engines exported before it)
    ild_bands_hz: tuple[float, ...] = OCTAVE_ILD_BANDS_HZ

    @classmethod
    def of(cls, model: BinauralModel, hop: int = 4, batch: int = 1, context: int | None = None,
           times=None, guidance: float | None = None) -> "HopGeometry":
        cfg = model.flow.cfg
        if context is None:  # the model's own context, capped by the trained window
            context = cfg.window - hop if model.sampler.context is None else min(model.sampler.context, cfg.window - hop)
        window = context + hop
        if hop % cfg.latents_per_frame or context % cfg.latents_per_frame:
            raise ValueError(f"hop and context must be multiples of {cfg.latents_per_frame} latents (one video frame)")
        if not 0 < hop < window or window > cfg.window:
            raise ValueError(f"hop of {hop} latents with {window - hop} of context: need 0 < hop < window <= "
                             f"{cfg.window} (the trained window)")
        return cls(batch, cfg.ears, window, hop, cfg.latent_dim, cfg.latents_per_frame, cfg.frame_size,
                   cfg.grid * cfg.grid, cfg.width, model.vae.cfg.hop, cfg.interaural,
                   model.sampler.guidance if guidance is None else float(guidance),
                   tuple(float(t) for t in (model.sampler.times if times is None else times)), cfg.offscreen_hold,
                   model.sampler.interaural_side if cfg.interaural else 1.0, cfg.silence_gate,
                   model.vae.cfg.sample_rate, model.sampler.guidance_rescale, cfg.ild_bands_hz)

    @property
    def frames(self) -> int:
        return self.window // self.latents_per_frame

    @property
    def hop_frames(self) -> int:
        return self.hop // self.latents_per_frame

    @property
    def samples(self) -> int:
        return self.hop * self.vae_hop

    @property
    def evaluations(self) -> int:
        return (len(self.times) - 1) * (1 if self.guidance == 1.0 else 2)

    def conditions(self, prefix: str = "") -> list[tuple[str, tuple[int, ...], str]]:
        b, e, w, d = self.batch, self.ears, self.window, self.width
        out = [(prefix + "video_tokens", (b, self.frames, d), "float32"),
               (prefix + "audio_cond", (b, e, w, d), "float32"),
               (prefix + "video_cond", (b, self.frames, d), "float32"),
               (prefix + "latent_keep", (b, 1, w, 1), "float32")]
        return out

    def signature(self) -> dict[str, tuple[list, list]]:
        """Per step: (inputs, outputs) as (name, shape, dtype). A state X is read as X, written as X_next."""
        b, e, w, h, f = self.batch, self.ears, self.window, self.hop, self.frames
        state_rings = [("grids", (b, f, self.grid_tokens, self.width), "float32"),
                       ("video_present", (b, f), "float32"), ("pose", (b, w, 3), "float32"),
                       ("pose_present", (b, w), "float32"), ("latent_present", (b, w), "float32")]
        if self.hold:  # world azimuth of the last source seen, and whether there is one
            state_rings += [("held_azimuth", (b,), "float32"), ("held_present", (b,), "float32")]
        if self.gate:  # the last frame, which the silence head compares the next one with
            state_rings += [("gate_frame", (b, self.frame_size, self.frame_size, 3), "uint8"),
                            ("gate_frame_present", (b,), "float32")]
        conditions = self.conditions() + (self.conditions("null_") if self.guidance != 1.0 else [])
        params = transfer_params(self.ild_bands_hz)
        per_latent = [("transfer", (b, w, params), "float32")] if self.transfer else []  # to the decoder
        per_latent += [("gate_db", (b, h), "float32")] if self.gate else []  # per new latent
        latents = ("latents", (b, e, w, self.latent_dim), "float32")
        new = ("new_latents", (b, e, h, self.latent_dim), "float32")
        tails = [("decoder_tail", (b, e, self.vae_hop), "float32")]
        # the gate's gains of the two latents before the hop: output block l eases from latent l - 2's to l - 1's
        tails += [("decoder_gate", (b, 2), "float32")] if self.gate else []
        return {
            "conditions": ([("frames", (b, self.hop_frames, self.frame_size, self.frame_size, 3), "uint8"),
                            ("frame_present", (b, self.hop_frames), "float32"), ("new_pose", (b, h, 3), "float32"),
                            ("new_pose_present", (b, h), "float32"), *state_rings],
                           [*[(n + "_next", s, t) for n, s, t in state_rings], *conditions, *per_latent]),
            "denoise": ([latents, ("noise", (b, e, h, self.latent_dim), "float32"), *conditions],
                        [("latents_next", latents[1], "float32"), new]),
            "decode": ([new, *per_latent, *tails], [("audio", (b, e, self.samples), "float32"),
                                                   *[(n + "_next", s, t) for n, s, t in tails]]),
        }

    def state(self) -> list[tuple[str, tuple[int, ...], str]]:
        """The state buffers: every step input that some step also writes as NAME_next."""
        sig = self.signature()
        written = {n for _, outs in sig.values() for n, _, _ in outs}
        return [(n, s, t) for ins, _ in sig.values() for n, s, t in ins if n + "_next" in written]


def _shift_in(ring: torch.Tensor, new: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The ring with its oldest entries dropped and `new` appended along `dim`."""
    return torch.cat([ring.narrow(dim, new.shape[dim], ring.shape[dim] - new.shape[dim]), new], dim=dim)


def window_flow(model: BinauralModel, window: int) -> FlowNet:
    """The model's flow network for a shorter window (same weights: RoPE and masks are relative)."""
    if window == model.flow.cfg.window:
        return model.flow
    net = FlowNet(replace(model.flow.cfg, window=window), pretrained_vision=False)
    net.load_state_dict(model.flow.state_dict())
    return net.to(model.vae.mean.device).eval()


class ConditionStep(nn.Module):
    """Encode the hop's new frames, advance the rings, compute the window's conditions (once per hop)."""

    def __init__(self, flow: FlowNet, geometry: HopGeometry):
        super().__init__()
        self.flow, self.g = flow, geometry
        horizon = torch.arange(geometry.window) >= geometry.window - geometry.hop
        self.register_buffer("horizon", horizon[None], persistent=False)
        self.register_buffer("new_frame_of_latent", torch.arange(geometry.hop) // geometry.latents_per_frame,
                             persistent=False)

    def forward(self, frames, frame_present, new_pose, new_pose_present, grids, video_present, pose, pose_present,
                latent_present, *rest):
        g, flow = self.g, self.flow
        held, last_frame = (rest[:2] if g.hold else ()), (rest[-2:] if g.gate else ())
        grids = _shift_in(grids, flow.encode_frames(frames))
        video_present = _shift_in(video_present, frame_present)
        pose = _shift_in(pose, new_pose)
        pose_present = _shift_in(pose_present, new_pose_present)
        context_present = _shift_in(latent_present, torch.zeros_like(new_pose_present))
        roles = torch.where(self.horizon, ROLE_HORIZON, torch.where(context_present > 0.5, ROLE_CONTEXT, ROLE_MISSING))
        seen = roles != ROLE_MISSING
        cond = flow.prepare(grids, video_present > 0.5, pose, (pose_present > 0.5) & seen, roles)
        transfer = cond.transfer
        if g.hold:
            presence = flow.presence_head(grids[:, -g.hop_frames:].flatten(2))[..., 0]  # (B, new frames) logits
            presence = torch.where(frame_present > 0.5, presence, -1.0)[:, self.new_frame_of_latent]
            now, *held = hold_offscreen(transfer[:, -g.hop:], presence, new_pose[..., 0], *held, flow.direction_table)
            transfer = torch.cat([transfer[:, :-g.hop], now], dim=1)
        outs = [grids, video_present, pose, pose_present, _shift_in(latent_present, torch.ones_like(new_pose_present)),
                *held, *((frames[:, -1], frame_present[:, -1]) if g.gate else ()),
                *(getattr(cond, n) for n in CONDITION_FIELDS)]
        if g.guidance != 1.0:
            null = flow.prepare(grids, torch.zeros_like(video_present, dtype=torch.bool), pose,
                                torch.zeros_like(pose_present, dtype=torch.bool), roles)
            outs += [getattr(null, n) for n in CONDITION_FIELDS]
        if g.transfer:
            outs.append(transfer)
        if g.gate:
            pairs = gate.frame_pairs(frames, frame_present, *last_frame)
            outs.append(gate.gain_db(flow.silence_head(pairs), frame_present)[:, self.new_frame_of_latent])
        return tuple(outs)


class DenoiseStep(nn.Module):
    """The sampler over one hop's horizon, its steps unrolled; noise is an input (reproducible). The
    window ring keeps the latents as generated; the new latents go to the decoder with the centred
    ears' difference scaled by the sampler's interaural_side (interaural.mix_ears)."""

    def __init__(self, flow: FlowNet, geometry: HopGeometry):
        super().__init__()
        self.flow, self.g = flow, geometry
        roles = torch.where(torch.arange(geometry.window) >= geometry.window - geometry.hop, ROLE_HORIZON, ROLE_CONTEXT)
        self.register_buffer("roles", roles[None], persistent=False)
        self.register_buffer("times", torch.tensor(geometry.times), persistent=False)

    def forward(self, latents, noise, *conditions):
        g, h = self.g, self.g.hop
        count = len(CONDITION_FIELDS)
        empty = latents.new_zeros(latents.shape[0], g.window, 0)
        cond = Conditions(*conditions[:count], transfer=empty)
        null = Conditions(*conditions[count:], transfer=empty) if g.guidance != 1.0 else None
        shifted = _shift_in(latents, torch.zeros_like(noise), dim=2)
        roles = self.roles.expand(latents.shape[0], -1)
        velocity = WindowFlow(self.flow, shifted, roles, cond, null, g.guidance, g.guidance_rescale)
        start = torch.cat([torch.zeros_like(shifted[:, :, :-h]), couple_ears(noise, self.flow.cfg.ear_noise_correlation)], 2)
        new = sample_euler(velocity, start, self.times)[:, :, -h:]
        return torch.cat([shifted[:, :, :-h], new], dim=2), mix_ears(new, g.side)


class DecodeStep(nn.Module):
    """The streaming VAE decoder on the hop's latents with the predicted interaural transfer (per
    latent frame, on the compressed spectrum), then the silence gate's gain on the waveform: each
    decoded block takes its latent's video frame's gain from that frame's first sample on, eased in
    over gate.RAMP_SECONDS, so a visible onset is as sharp as the truth's."""

    def __init__(self, model: BinauralModel, geometry: HopGeometry):
        super().__init__()
        self.vae, self.g = model.vae, geometry
        self.register_buffer("bands", band_matrix(model.vae.cfg, geometry.ild_bands_hz), persistent=False)
        self.register_buffer("ease", gate.ease(geometry.vae_hop, geometry.sample_rate), persistent=False)

    def factors(self, transfer: torch.Tensor | None) -> torch.Tensor | None:
        """The hop's per-ear spectral factors (B, 2, H, 2 bins) from the window's transfer (B, W, P);
        None for a model without the interaural head."""
        if transfer is None:
            return None
        return spectral_factors(transfer[:, -self.g.hop:], self.vae.cfg, self.bands)

    def gated(self, audio: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
        """Decoded audio (B, E, L * hop) times the gate's waveform gain; gains (B, L + 2) dB per latent,
        from two latents before the first block (the decoder lags one latent; block l eases from
        latent l - 2's gain to l - 1's)."""
        return audio * gate.waveform_gain(gains[:, :-1], self.ease)[:, None]

    def forward(self, new_latents, *rest):
        g = self.g
        rest = list(rest)
        transfer = rest.pop(0) if g.transfer else None
        gain = rest.pop(0) if g.gate else None
        audio, tail = self.vae.decode_step(new_latents.transpose(-1, -2), rest[0], self.factors(transfer))
        if gain is None:
            return audio, tail
        gains = torch.cat([rest[1], gain], dim=1)
        return self.gated(audio, gains), tail, gains[:, -2:]


def decoder_flush(geometry: HopGeometry, state: "StreamState") -> torch.Tensor:
    """The last decoded block of a finished stream (B, E, vae_hop): the decoder tail, gated like the
    blocks before it (its gain eases from the second-last latent's to the last one's)."""
    tail = state["decoder_tail"]
    if not geometry.gate:
        return tail
    weights = gate.ease(geometry.vae_hop, geometry.sample_rate).to(tail.device)
    return tail * gate.waveform_gain(state["decoder_gate"], weights)[:, None]


def hop_steps(model: BinauralModel, geometry: HopGeometry) -> dict[str, nn.Module]:
    flow = window_flow(model, geometry.window)
    steps = {"conditions": ConditionStep(flow, geometry), "denoise": DenoiseStep(flow, geometry),
             "decode": DecodeStep(model, geometry)}
    return {name: step.to(model.vae.mean.device) for name, step in steps.items()}  # their buffers too


Step = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def module_step(module: nn.Module, inputs: list, outputs: list) -> Step:
    """A step module as a function of named tensors (the torch backend)."""
    in_names, out_names = [n for n, _, _ in inputs], [n for n, _, _ in outputs]

    def run(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return dict(zip(out_names, module(*(values[n] for n in in_names))))

    return run


@dataclass
class StreamState:
    """Every state buffer of a batch of streams, by name (HopGeometry.state), preallocated."""

    buffers: dict[str, torch.Tensor]

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Forget the past of all streams, or of those where mask (B,) is True: presence masks and the
        decoder's state go to zero (silence; gate gains of 0 dB). The rest is unread until overwritten."""
        for name, buf in self.buffers.items():
            if name.endswith("_present") or name.startswith("decoder_"):
                if mask is None:
                    buf.zero_()
                else:
                    buf[mask.to(buf.device)] = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.buffers[name]


class HopRunner:
    """The host loop of every backend: run the three steps on named tensors, keep the state."""

    def __init__(self, geometry: HopGeometry, steps: dict[str, Step], device="cpu"):
        self.g, self.steps, self.device = geometry, steps, torch.device(device)
        self.signature = geometry.signature()
        self.values: dict[str, torch.Tensor] = {}  # every tensor of the last hop, by name

    def init_state(self) -> StreamState:
        dtypes = {"float32": torch.float32, "uint8": torch.uint8}
        return StreamState({n: torch.zeros(s, dtype=dtypes[t], device=self.device) for n, s, t in self.g.state()})

    def hop(self, state: StreamState, frames: torch.Tensor, frame_present: torch.Tensor, pose: torch.Tensor,
            pose_present: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One hop for B streams. frames (B, H / lpf, S, S, 3) uint8; frame_present (B, H / lpf) and
        pose_present (B, H) 0/1 (or bool); pose (B, H, 3) yaw/pitch/roll degrees at the new latent times;
        noise (B, E, H, D) i.i.d. standard normal. Returns audio (B, E, H * vae_hop)."""
        values = dict(state.buffers)
        values.update(frames=frames, frame_present=frame_present.float(), new_pose=pose.float(),
                      new_pose_present=pose_present.float(), noise=noise.float())
        for name in ("conditions", "denoise", "decode"):
            inputs, _ = self.signature[name]
            values.update(self.steps[name]({n: values[n] for n, _, _ in inputs}))
        for name, buf in state.buffers.items():
            buf.copy_(values[name + "_next"])
        self.values = values
        return values["audio"]


class StreamGenerator(HopRunner):
    """The torch backend: the hop steps as eager modules (what render, eval and the tests run)."""

    def __init__(self, model: BinauralModel, hop_latents: int = 4, batch: int = 1, times=None,
                 guidance: float | None = None, context: int | None = None):
        geometry = HopGeometry.of(model, hop_latents, batch, context, times, guidance)
        sig = geometry.signature()
        self.modules = hop_steps(model, geometry)
        super().__init__(geometry, {n: module_step(m, *sig[n]) for n, m in self.modules.items()},
                         model.vae.mean.device)
        self.model = model

    @property
    def frames_per_hop(self) -> int:
        return self.g.hop_frames

    step = HopRunner.hop
