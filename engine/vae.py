"""The per-ear audio autoencoder: probabilistic PCA of compressed complex STFT frames.

Why this and not a mel VAE + vocoder (MMAudio, ViSAudio): a vocoder per ear invents each ear's phase
on its own, so the sub-millisecond interaural time difference is not guaranteed to survive. Here each
latent frame is a linear code of one ear's *complex* spectrum (phase included), so decoding both ears
with the same decoder reproduces the interaural phase up to the code's truncation error.

    frame l = samples [(l - 1) hop, (l + 1) hop) x sqrt-Hann   (latent l is centred at l * hop)
    X = DFT(frame)                          (matmuls with a fixed basis: ONNX/TensorRT friendly)
    C = |X|^p e^{i angle X}                 (power-law compression evens out the spectrum, p = 0.5)
    z = W^T (w (C - mean)) / scale          (top-D principal directions of the band-weighted spectra;
                                             w favours the ITD band below 1.5 kHz; whitened latents)

The decoder inverts each step and overlap-adds (sqrt-Hann analysis x synthesis sums to one at 50%
overlap). It is causal and streams: its state is the half frame still waiting for the next latent's
overlap, so decoding chunk by chunk equals decoding the whole clip. Output lags the input by one hop.

Fitting (training/train_vae.py) is closed-form probabilistic PCA (Tipping & Bishop 1999), the maximum-
likelihood linear-Gaussian VAE: W and the posterior noise variance come from one eigendecomposition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from engine.config import JsonConfig


@dataclass(frozen=True)
class VAEConfig(JsonConfig):
    sample_rate: int = 16000
    hop: int = 320  # 50 latents/s: two per 25 fps video frame; 20 ms of decoder look-behind
    latent_dim: int = 160  # re-encoded held-out scenes: ITD error ~40 us, ILD error ~1.1 dB (docs/MEASUREMENTS.md)
    compress: float = 0.5  # |X|^p before PCA, so quiet high bands (the ILD carriers) get dimensions
    itd_band_hz: float = 1500.0  # the band whose phase carries the ITD (GCC-PHAT band, DESIGN.md 5)...
    itd_band_weight: float = 4.0  # ...weighted up in the PCA metric: mean ITD error 170 -> 41 us at D=160

    @property
    def frame(self) -> int:
        return 2 * self.hop

    @property
    def bins(self) -> int:
        return self.hop + 1

    @property
    def latents_per_second(self) -> float:
        return self.sample_rate / self.hop


@dataclass
class EncoderState:
    """The previous hop of input samples, (B, hop)."""

    history: torch.Tensor

    def reset(self) -> None:
        self.history.zero_()


@dataclass
class DecoderState:
    """The second half of the last synthesised frame, waiting for the next frame's overlap, (B, hop)."""

    tail: torch.Tensor

    def reset(self) -> None:
        self.tail.zero_()


def complex_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-bin complex product of spectra stored as [re, im] on the last axis."""
    are, aim = a.chunk(2, dim=-1)
    bre, bim = b.chunk(2, dim=-1)
    return torch.cat([are * bre - aim * bim, are * bim + aim * bre], dim=-1)


def _dft_bases(frame: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sqrt-periodic-Hann window, windowed forward DFT basis (frame, 2 bins) and inverse (2 bins, frame)."""
    n = torch.arange(frame, dtype=torch.float64)
    window = torch.sin(math.pi * n / frame)  # sqrt of the periodic Hann window
    bins = frame // 2 + 1
    k = torch.arange(bins, dtype=torch.float64)
    angle = 2 * math.pi * n[:, None] * k[None, :] / frame
    forward = torch.cat([torch.cos(angle), -torch.sin(angle)], dim=1) * window[:, None]
    # inverse real DFT: weight 1 for DC and Nyquist, 2 for the others
    weight = torch.full((bins,), 2.0, dtype=torch.float64)
    weight[0] = weight[-1] = 1.0
    inverse = torch.cat([torch.cos(angle).T * weight[:, None], -torch.sin(angle).T * weight[:, None]], 0) / frame
    return window.float(), forward.float(), (inverse * window[None, :]).float()


class SpectralVAE(nn.Module):
    """Mono encoder/decoder shared by both ears: audio (B, E, T) <-> latents (B, E, D, T / hop)."""

    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VAEConfig()
        _, forward, inverse = _dft_bases(cfg.frame)
        self.register_buffer("analysis", forward, persistent=False)
        self.register_buffer("synthesis", inverse, persistent=False)
        freqs = torch.arange(cfg.bins) * cfg.sample_rate / cfg.frame
        band = torch.where(freqs < cfg.itd_band_hz, cfg.itd_band_weight, 1.0)
        self.register_buffer("band_weight", torch.cat([band, band]), persistent=False)
        feat = 2 * cfg.bins
        # fitted by training/train_vae.py; the identity-like defaults only make an unfitted model run
        self.mean = nn.Parameter(torch.zeros(feat), requires_grad=False)
        self.basis = nn.Parameter(torch.eye(feat, cfg.latent_dim), requires_grad=False)  # (feat, D) orthonormal
        self.scale = nn.Parameter(torch.ones(cfg.latent_dim), requires_grad=False)  # sqrt of the PCA eigenvalues
        self.posterior_logvar = nn.Parameter(torch.full((cfg.latent_dim,), -10.0), requires_grad=False)

    # ------------------------------------------------------------------------ per-frame maps
    def _compress(self, spec: torch.Tensor) -> torch.Tensor:
        re, im = spec.chunk(2, dim=-1)
        mag2 = re * re + im * im
        gain = (mag2 + 1e-12) ** ((self.cfg.compress - 1) / 2)
        return spec * torch.cat([gain, gain], dim=-1)

    def _expand(self, comp: torch.Tensor) -> torch.Tensor:
        re, im = comp.chunk(2, dim=-1)
        mag2 = re * re + im * im
        gain = (mag2 + 1e-12) ** ((1 / self.cfg.compress - 1) / 2)
        return comp * torch.cat([gain, gain], dim=-1)


    def code(self, feats: torch.Tensor) -> torch.Tensor:
        return (((feats - self.mean) * self.band_weight) @ self.basis) / self.scale

    def uncode(self, z: torch.Tensor) -> torch.Tensor:
        return ((z * self.scale) @ self.basis.T) / self.band_weight + self.mean

    # ------------------------------------------------------------------------ whole signals
    def _frames(self, audio: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        hop = self.cfg.hop
        if audio.shape[-1] % hop:
            raise ValueError(f"audio length {audio.shape[-1]} is not a multiple of the VAE hop ({hop})")
        return torch.cat([history, audio], dim=-1).unfold(-1, 2 * hop, hop)

    def init_encoder(self, batch: int) -> EncoderState:
        return EncoderState(torch.zeros(batch, self.cfg.hop, device=self.mean.device))

    def init_decoder(self, batch: int) -> DecoderState:
        return DecoderState(torch.zeros(batch, self.cfg.hop, device=self.mean.device))

    def spectra(self, audio: torch.Tensor, state: EncoderState | None = None) -> torch.Tensor:
        """(..., T) audio -> raw complex spectra of the latent frames, [re, im] (..., T / hop, 2 bins).

        With a state, the next chunk of a stream (the state holds the previous hop)."""
        lead = audio.shape[:-1]
        flat = audio.reshape(-1, audio.shape[-1])
        history = state.history if state is not None else flat.new_zeros(flat.shape[0], self.cfg.hop)
        spec = self._frames(flat, history) @ self.analysis
        if state is not None:
            state.history.copy_(flat[:, -self.cfg.hop:])
        return spec.reshape(*lead, *spec.shape[-2:])

    def features(self, audio: torch.Tensor, state: EncoderState | None = None) -> torch.Tensor:
        """(..., T) audio -> compressed complex spectra (..., T / hop, 2 bins): what the PCA codes."""
        return self._compress(self.spectra(audio, state))

    def encode(self, audio: torch.Tensor, state: EncoderState | None = None,
               factors: torch.Tensor | None = None) -> torch.Tensor:
        """(B, E, T) or (B, T) audio -> posterior means (B, E, D, T / hop) or (B, D, T / hop).

        With a state, encodes the next chunk of a stream. `factors` (..., T / hop, 2 bins) multiply the
        compressed spectra before coding (engine/interaural.py: an inverse interaural transfer)."""
        feats = self.features(audio, state)
        if factors is not None:
            feats = complex_multiply(feats, factors)
        return self.code(feats).transpose(-1, -2)

    def decode(self, z: torch.Tensor, state: DecoderState | None = None,
               factors: torch.Tensor | None = None) -> torch.Tensor:
        """(..., D, L) latents -> (..., L * hop) samples, one hop behind (sample n is signal time n - hop).

        With a state, decodes the next chunk of a stream; chunked decoding equals whole decoding.
        `factors` (..., L, 2 bins) multiply the compressed spectra before synthesis (an interaural
        transfer, engine/interaural.py)."""
        tail = state.tail if state is not None else z.new_zeros(*z.shape[:-2], self.cfg.hop)
        out, next_tail = self.decode_step(z, tail.reshape(*z.shape[:-2], -1), factors)
        if state is not None:
            state.tail.copy_(next_tail.reshape(state.tail.shape))
        return out

    def decode_step(self, z: torch.Tensor, tail: torch.Tensor,
                    factors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder as a pure function of its state: (z (..., D, L), tail (..., hop)) ->
        (samples (..., L * hop), the next tail). What `decode` and the exported graph run."""
        lead = z.shape[:-2]
        flat = z.reshape(-1, *z.shape[-2:]).transpose(-1, -2)  # (B', L, D)
        feats = self.uncode(flat)
        if factors is not None:
            feats = complex_multiply(feats, factors.reshape(feats.shape))
        frames = self._expand(feats) @ self.synthesis  # (B', L, frame)
        hop, count = self.cfg.hop, flat.shape[1]
        first, second = frames[..., :hop], frames[..., hop:]
        # output hop l = second half of frame l - 1 (or the carried tail) + first half of frame l
        previous = torch.cat([tail.reshape(-1, 1, hop), second[:, :-1]], dim=1)
        out = (previous + first).reshape(*lead, count * hop)
        return out, second[:, -1].reshape(*lead, hop)

    def reconstruct(self, audio: torch.Tensor) -> torch.Tensor:
        """Encode and decode a whole signal, time-aligned with the input (the last hop is incomplete)."""
        hop = self.cfg.hop
        z = self.encode(audio)
        state = self.init_decoder(audio.reshape(-1, audio.shape[-1]).shape[0])
        out = self.decode(z, state).reshape(-1, audio.shape[-1])
        out = torch.cat([out[:, hop:], state.tail], dim=-1)
        return out.reshape(audio.shape)
