"""Per-ear waveform VAE with a causal, streaming decoder.

ViSAudio encodes each ear with one shared mono VAE (a stereo VAE blurs spatial cues). MMAudio's VAE
works on mel spectrograms and needs a vocoder per ear, which cannot guarantee the sub-millisecond
time difference between the ears; this one encodes and decodes waveforms, so each ear's timing is
reconstructed directly and the ITD survives (measured by `visaudio train vae`'s evaluation).

Everything is causal: the decoder upsamples with sub-pixel (reshape) layers after causal
convolutions, so one latent frame decodes to exactly `hop` samples given the decoder state, and
decoding chunk by chunk equals decoding the whole clip.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from engine.streaming import CausalConv1d, ConvState, Pointwise


@dataclass(frozen=True)
class VAEConfig:
    sample_rate: int = 16000
    # 4 * 4 * 5 * 4 = 320 samples per latent: 50 latents/s, two per 25 fps video frame, and a 20 ms
    # decode granularity, well inside the 120 ms video-to-sound budget.
    strides: tuple[int, ...] = (4, 4, 5, 4)
    # channels at each resolution, waveform end first; the decoder mirrors them.
    channels: tuple[int, ...] = (16, 32, 64, 128, 192)
    latent_dim: int = 32  # 32 x 50/s = 1600 numbers per second per ear: 10x fewer than samples
    residual_dilations: tuple[int, ...] = (1, 3, 9)

    @property
    def hop(self) -> int:
        out = 1
        for s in self.strides:
            out *= s
        return out

    @property
    def latent_rate(self) -> float:
        return self.sample_rate / self.hop

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "VAEConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(obj) - known)
        if unknown:
            raise ValueError(f"unknown VAE config field(s): {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in obj.items()})


INITIAL_LOGVAR = -10.0


class ResidualUnit(nn.Module):
    """ELU -> causal dilated conv (k=3) -> ELU -> 1x1 conv, added to the input."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.conv = CausalConv1d(channels, channels, 3, dilation=dilation)
        self.mix = nn.Conv1d(channels, channels, 1)
        self.act = nn.ELU()

    def forward(self, x):
        return x + self.mix(self.act(self.conv(self.act(x))))

    def init_state(self, batch, device=None, dtype=torch.float32) -> list[ConvState]:
        return self.conv.init_state(batch, device, dtype)

    def step(self, x, state: list[ConvState]):
        return x + self.mix(self.act(self.conv.step(self.act(x), state)))


class SubpixelUpsample(nn.Module):
    """Causal conv to `factor` x channels, then interleave: each input frame yields `factor` frames."""

    def __init__(self, c_in: int, c_out: int, factor: int):
        super().__init__()
        self.conv = CausalConv1d(c_in, c_out * factor, 3)
        self.factor, self.c_out = factor, c_out

    def _shuffle(self, y):
        b, _, t = y.shape
        return y.view(b, self.c_out, self.factor, t).permute(0, 1, 3, 2).reshape(b, self.c_out, t * self.factor)

    def forward(self, x):
        return self._shuffle(self.conv(x))

    def init_state(self, batch, device=None, dtype=torch.float32) -> list[ConvState]:
        return self.conv.init_state(batch, device, dtype)

    def step(self, x, state: list[ConvState]):
        return self._shuffle(self.conv.step(x, state))


class Encoder(nn.Module):
    """Waveform (B, 1, T) -> latent mean and log-variance (B, D, T / hop); causal."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        layers: list[nn.Module] = [CausalConv1d(1, cfg.channels[0], 7)]
        for c_in, c_out, stride in zip(cfg.channels[:-1], cfg.channels[1:], cfg.strides):
            layers += [ResidualUnit(c_in, d) for d in cfg.residual_dilations]
            layers += [nn.ELU(), CausalConv1d(c_in, c_out, 2 * stride, stride=stride)]
        head = CausalConv1d(cfg.channels[-1], 2 * cfg.latent_dim, 3)
        with torch.no_grad():  # start nearly deterministic: the decoder first sees the mean, not noise
            head.conv.weight[cfg.latent_dim:].mul_(0.01)
            head.conv.bias[cfg.latent_dim:].fill_(INITIAL_LOGVAR)
        layers += [nn.ELU(), head]
        self.net = nn.Sequential(*layers)

    def forward(self, wave):
        mean, logvar = self.net(wave).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 10.0)


class Decoder(nn.Module):
    """Latent (B, D, L) -> waveform (B, 1, L * hop); causal, with a streaming `step`."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = list(reversed(cfg.channels))
        layers: list[nn.Module] = [CausalConv1d(cfg.latent_dim, chans[0], 3)]
        for c_in, c_out, factor in zip(chans[:-1], chans[1:], reversed(cfg.strides)):
            layers += [ResidualUnit(c_in, d) for d in cfg.residual_dilations]
            layers += [Pointwise(nn.ELU()), SubpixelUpsample(c_in, c_out, factor)]
        layers += [ResidualUnit(chans[-1], d) for d in cfg.residual_dilations]
        layers += [Pointwise(nn.ELU()), CausalConv1d(chans[-1], 1, 7)]
        self.layers = nn.ModuleList(layers)

    def forward(self, z):
        for layer in self.layers:
            z = layer(z)
        return z

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> "DecoderState":
        return DecoderState([layer.init_state(batch, device, dtype) for layer in self.layers])

    def step(self, z, state: "DecoderState"):
        """Decode the next latent frames (B, D, n) -> (B, 1, n * hop), updating state in place."""
        for layer, layer_state in zip(self.layers, state.layers):
            z = layer.step(z, layer_state)
        return z


@dataclass
class DecoderState:
    """Streaming state of a Decoder: the conv buffers of each layer."""

    layers: list[list[ConvState]] = field(default_factory=list)

    def reset(self, mask: torch.Tensor | None = None) -> None:
        for states in self.layers:
            for s in states:
                s.reset(mask)


class WaveVAE(nn.Module):
    """Mono VAE shared by both ears: ears are folded into the batch."""

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, audio: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Binaural (B, 2, T) -> latents (B, 2, D, T / hop): one latent sequence per ear."""
        b, ears, t = audio.shape
        if t % self.cfg.hop:
            raise ValueError(f"audio length {t} is not a multiple of the VAE hop {self.cfg.hop}")
        mean, logvar = self.encoder(audio.reshape(b * ears, 1, t))
        z = mean + torch.randn(mean.shape, generator=generator, device=mean.device) * (0.5 * logvar).exp() \
            if sample else mean
        return z.reshape(b, ears, *z.shape[1:])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 2, D, L) -> binaural (B, 2, L * hop)."""
        b, ears, d, n = latents.shape
        return self.decoder(latents.reshape(b * ears, d, n)).reshape(b, ears, -1)

    def forward(self, audio: torch.Tensor):
        """(reconstruction, mean, logvar) for training; ears folded into the batch."""
        b, ears, t = audio.shape
        mean, logvar = self.encoder(audio.reshape(b * ears, 1, t))
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        return self.decoder(z).reshape(b, ears, t), mean, logvar
