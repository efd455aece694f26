"""The interaural transfer: where a sound is, as an ITD and band ILDs per latent frame.

Why: learning the direction-dependent map between two ears' latents through the flow loss alone did
not happen in our CPU budgets (the ears came out nearly identical: |ITD| ~10 us where the truth has
~400 us). So the binaural flow (FlowConfig.interaural) splits the job the way the physics does:

* a head on the spacetime module's per-ear features predicts, for every latent frame, the interaural
  transfer: ITD tau (s) and the ILD in K bands (dB). It is supervised by labels measured on the
  training audio itself (GCC-PHAT ITD below 1.5 kHz, band level ratios; `labels`), so real clips
  without metadata train it too;
* the flow generates each ear's latents with that transfer divided out ("centred" ears: alike for one
  source, different for diffuse sound and mixtures), conditioned on video and pose as before;
* the decoder multiplies the predicted transfer back in, in the compressed complex spectrum:
  left ear x e^{+i w tau / 2} 10^{+ILD p / 40}, right ear x e^{-i w tau / 2} 10^{-ILD p / 40}
  (p = the VAE's compression power), so tau > 0 delays the right ear: a source on the left.

The network's transfer outputs are in units of ITD_UNIT and ILD_UNIT (about unit scale).

A source that leaves the view can no longer be placed from the image. `hold_offscreen` (FlowConfig.
offscreen_hold; our extension, not in ViSAudio) keeps the world direction of the last sounding source
seen on screen and, while none is seen, gives the transfer of that direction relative to the
current head yaw, read from a table of the measured head's transfer by azimuth: a head turn away from
a source keeps moving it across the ears instead of dropping it to the middle.
"""
from __future__ import annotations

import math

import torch

from engine.vae import VAEConfig

# ILD band centres (FlowConfig.ild_bands_hz). The first heads had 8 bands about an octave apart; an
# HRTF's ILD has more structure than that: on validation scenes the 8-band basis alone (the least-
# squares fit of the reference's third-octave ILDs) misses them by 0.80 dB in anechoic scenes, 12
# bands by 0.40 (the student's whole error there was 1.36 dB). Third octaves (250 Hz - 6.3 kHz, the
# metric's bands; flat beyond) resolve what the labels measure.
OCTAVE_ILD_BANDS_HZ = (250.0, 500.0, 1000.0, 1600.0, 2500.0, 3500.0, 5000.0, 7000.0)
THIRD_OCTAVE_ILD_BANDS_HZ = tuple(round(1000.0 * 2.0 ** (k / 3), 1) for k in range(-6, 9))
ILD_BAND_SETS = {"octave": OCTAVE_ILD_BANDS_HZ, "third-octave": THIRD_OCTAVE_ILD_BANDS_HZ}  # by CLI name
ITD_UNIT = 1e-4  # seconds per network unit
ILD_UNIT = 3.0  # dB per network unit
MAX_ITD = 1e-3  # labels search lags within +-1 ms (a human head: < 0.8 ms)
LABEL_SMOOTHING = 5  # latent frames (100 ms) over which label cross-spectra are averaged
SILENCE_DB = 50.0  # frames this far below the clip's loudest carry no label weight
MIN_ITD_WEIGHT = 0.1  # squared coherence below which a frame's ITD label is 0 (diffuse or silent)
TABLE_AZIMUTHS = 361  # direction table rows: azimuth -180..180 degrees, 1 degree apart, elevation 0


def bin_frequencies(cfg: VAEConfig, device=None) -> torch.Tensor:
    return torch.arange(cfg.bins, dtype=torch.float32, device=device) * cfg.sample_rate / cfg.frame


def transfer_params(centres_hz: tuple[float, ...]) -> int:
    """Transfer parameters per latent frame: the ITD, then one ILD per band."""
    return 1 + len(centres_hz)


def band_matrix(cfg: VAEConfig, centres_hz: tuple[float, ...]) -> torch.Tensor:
    """(K, bins) triangular bands on log frequency centred at `centres_hz`, flat beyond the end
    centres: a partition of unity, so band values interpolate smoothly over the bins."""
    return triangles(bin_frequencies(cfg).clamp(min=1.0), centres_hz)


def triangles(freqs_hz: torch.Tensor, centres_hz: tuple[float, ...]) -> torch.Tensor:
    """(K, N) weights of the K triangular bands (band_matrix) at N frequencies: band values times
    these are the ILD curve there."""
    log_f = torch.log(freqs_hz.float())
    centres = torch.log(torch.tensor(centres_hz))
    log_f = log_f.clamp(centres[0], centres[-1])
    bands = torch.zeros(len(centres), len(log_f))
    for k in range(len(centres)):
        if k > 0:
            rise = (log_f - centres[k - 1]) / (centres[k] - centres[k - 1])
            bands[k] = torch.where((log_f >= centres[k - 1]) & (log_f <= centres[k]), rise, bands[k])
        if k < len(centres) - 1:
            fall = (centres[k + 1] - log_f) / (centres[k + 1] - centres[k])
            bands[k] = torch.where((log_f >= centres[k]) & (log_f <= centres[k + 1]), fall, bands[k])
    return bands


def spectral_factors(params: torch.Tensor, cfg: VAEConfig, bands: torch.Tensor) -> torch.Tensor:
    """Transfer params (..., L, P = 1 + K bands) in network units -> per-ear complex factors on the
    compressed spectrum, [re, im] (..., 2, L, 2 bins); ear 0 = left. Negated params give the inverse transfer."""
    itd = params[..., :1] * ITD_UNIT  # (..., L, 1)
    ild = (params[..., 1:] * ILD_UNIT) @ bands  # (..., L, bins) dB
    omega = 2 * math.pi * bin_frequencies(cfg, params.device)
    ear_sign = (1.0 - 2.0 * torch.arange(2, device=params.device, dtype=params.dtype))[:, None, None]  # +1, -1: (2, 1, 1)
    phase = ear_sign * (omega * itd / 2)[..., None, :, :]
    gain = 10.0 ** (ear_sign * ild[..., None, :, :] * cfg.compress / 40.0)
    return torch.cat([gain * torch.cos(phase), gain * torch.sin(phase)], dim=-1)


def _smooth(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Centred moving average over the latent axis (-2) of (..., L, C)."""
    kernel = torch.ones(1, 1, frames, dtype=x.dtype, device=x.device) / frames
    flat = x.movedim(-2, -1).reshape(-1, 1, x.shape[-2])
    out = torch.nn.functional.conv1d(flat, kernel, padding=frames // 2)
    return out.reshape(*x.shape[:-2], x.shape[-1], -1).movedim(-1, -2)


def labels(spectra: torch.Tensor, cfg: VAEConfig, bands: torch.Tensor,
           itd_band_hz: float = 1500.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Interaural transfer measured on binaural audio, for training the transfer head.

    spectra (2, L, 2 bins): both ears' raw spectra per latent frame ([re, im]; SpectralVAE.spectra).
    Returns params (L, 1 + K) in network units and weights (L, 2): for the ITD, the interaural
    coherence of the ITD band squared; for the ILDs, 1 where the frame is not silent."""
    (lre, lim), (rre, rim) = spectra[0].chunk(2, -1), spectra[1].chunk(2, -1)
    cross = _smooth(torch.cat([lre * rre + lim * rim, lim * rre - lre * rim], -1), LABEL_SMOOTHING)  # L conj(R)
    power = _smooth(torch.stack([lre ** 2 + lim ** 2, rre ** 2 + rim ** 2]), LABEL_SMOOTHING)  # (2, L, bins)
    c_re, c_im = cross.chunk(2, -1)
    freqs = bin_frequencies(cfg, spectra.device)
    band = (freqs > 0) & (freqs < itd_band_hz)
    # GCC-PHAT: the lag whose phase ramp best matches the whitened cross-spectrum (10 us grid)
    lags = torch.linspace(-MAX_ITD, MAX_ITD, 201, device=spectra.device)
    omega = 2 * math.pi * freqs[band]
    mag = torch.sqrt(c_re[:, band] ** 2 + c_im[:, band] ** 2) + 1e-20
    ramp = omega[:, None] * lags[None, :]  # (bins_b, lags)
    score = (c_re[:, band] / mag) @ torch.cos(ramp) + (c_im[:, band] / mag) @ torch.sin(ramp)
    best = score.argmax(-1)
    itd = lags[best]
    # coherence at that lag (the cross-spectrum phase-aligned by the ITD, not whitened)
    aligned = (c_re[:, band] * torch.cos(ramp[:, best].T) + c_im[:, band] * torch.sin(ramp[:, best].T)).sum(-1)
    coherence = aligned.clamp(min=0) / torch.sqrt(power[0][:, band].sum(-1) * power[1][:, band].sum(-1) + 1e-20)
    band_power = power @ bands.T  # (2, L, K)
    ild = 10 * torch.log10((band_power[0] + 1e-12) / (band_power[1] + 1e-12)).clamp(-30, 30)
    level = 10 * torch.log10(power.sum((0, -1)) + 1e-20)
    active = (level > level.max() - SILENCE_DB).float()
    itd_weight = coherence.clamp(0, 1) ** 2 * active
    # where nothing coherent is heard the transfer is neutral (no wild lags to rotate the spectra by)
    itd = torch.where(itd_weight >= MIN_ITD_WEIGHT, itd, 0.0)
    params = torch.cat([itd[:, None] / ITD_UNIT, ild * active[:, None] / ILD_UNIT], dim=-1)
    return params, torch.stack([itd_weight, active], dim=-1)


def mix_ears(latents: torch.Tensor, side: float) -> torch.Tensor:
    """Centred ears (B, 2, ...) -> mid + side * (ear - mid), mid = their mean (SamplerConfig.
    interaural_side). For one source the centred ears should be alike; where the two branches drift
    apart the difference turns into spurious level differences, which side < 1 removes."""
    if side == 1.0:
        return latents
    mid = latents.mean(dim=1, keepdim=True)
    return mid + side * (latents - mid)


def hold_offscreen(transfer: torch.Tensor, presence: torch.Tensor, yaw: torch.Tensor, held_azimuth: torch.Tensor,
                   held_present: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hop's transfer with the last seen source held in the world (see the module docstring).

    transfer (B, H, P): the head's prediction for the hop's new latents; presence (B, H): logits
    that a sounding source is on screen in each latent's frame; yaw (B, H): head yaw (degrees) at those
    latents; held_azimuth, held_present (B,): the stream's state (world azimuth of the last source
    seen, and whether there is one); table (TABLE_AZIMUTHS, P). Latent by latent (H is small and
    static): a seen source is placed at the frontal azimuth whose table ITD matches the predicted ITD.
    Returns (transfer, held_azimuth, held_present)."""
    front = table[90:271, 0]  # azimuth -90..90
    out = []
    for j in range(transfer.shape[1]):
        seen = presence[:, j] > 0
        azimuth = torch.argmin(torch.abs(front[None, :] - transfer[:, j, :1]), dim=1).float() - 90.0
        held_azimuth = torch.where(seen, azimuth + yaw[:, j], held_azimuth)
        held_present = torch.where(seen, torch.ones_like(held_present), held_present)
        relative = torch.remainder(held_azimuth - yaw[:, j] + 180.0, 360.0) - 180.0
        row = table[torch.round(relative).long() + 180]
        out.append(torch.where((~seen & (held_present > 0.5))[:, None], row, transfer[:, j]))
    return torch.stack(out, dim=1), held_azimuth, held_present
