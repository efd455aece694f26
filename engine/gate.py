"""The silence gate: quiet where the picture shows nothing sounding (our extension, not in ViSAudio).

Why: after 3250 CPU training steps the flow had not learned to go quiet between visible events: around
an event the generated level rose 1.6 dB where the truth rises 29 dB (median over 98 events), so only
27% of visible events had an audio onset within 40 ms. Gating the same outputs with the truth's
per-frame activity (causal, at video-frame resolution) gives 97%: timing is there to be taken from the
picture. So, as Video-Foley (arXiv 2408.11915) conditions on an RMS envelope predicted from video, the
loudness envelope is predicted from the frames and imposed explicitly:

* a small CNN on each frame's pixels (`SilenceHead`, FlowConfig.silence_gate) gives p, the
  probability that the sources on screen are all silent, as the product of two logistic factors: a
  source is on screen, and none of those on screen sounds (a sounding source is drawn larger and
  brighter). Logistic factors on the flow's frozen 4 x 4 frame grid (held-out frame accuracy 0.944
  and 0.874) gave onsets within 40 ms on 0.765 of the events of 40 validation scenes (seed 30000, 98
  events); the CNN, which sees the few pixels of a far source (0.966 and 0.920), 0.878. One
  logistic regression on the conjunction itself scored no better than always saying 'no' (0.844
  against 0.842), and adding the grid's change since the frame before (the onset flash) did not
  help there. The CNN's fit adds every frame where a label switches (an event's first frame, a
  source entering the view) to the random frames: those frames time the onsets, and on held-out ones
  "sounding" went from 0.81 to 0.89 correct; the CNN also sees the change since the frame before
  (an event's first frame flashes), which took them to 0.90 and onsets on 100 validation scenes from
  0.935 to 0.955. The scene engine's caches label both factors from the scene; for real clips
  "sounding" is measured on the audio (`silence_labels`: the mix SILENT_BELOW_DB under the clip's
  loudest frame);
* the decoded waveform of both ears is scaled by FLOOR_DB * p dB (the gain's expectation in dB),
  each video frame's gain from the frame's first sample on, eased in over RAMP_SECONDS (the truth's
  event attack). The same factor on both ears leaves ITD, ILD and coherence as they were. The gain
  first scaled the latents' compressed spectra; the decoder's 40 ms overlap-add then smeared a step
  over 40 ms, too slow a rise for the onset detector (9 dB in 10 ms) and 20 ms early.

A frame that has not arrived gets p = 0: what cannot be seen is never silenced. Nor is a sound from
off screen while nothing is on screen; while a silent source is in view, it is attenuated too.
"""
from __future__ import annotations

import numpy as np
import torch

FLOOR_DB = -60.0  # gain when the head is sure nothing sounds; -40 / -60 / -80 dB: onsets 0.89 / 0.91 / 0.86 (validation)
RAMP_SECONDS = 0.005  # a gain change takes the truth's event attack (training/render.py: 5 ms)
SILENT_BELOW_DB = 30.0  # a frame is labelled silent this far below the clip's loudest frame


def silence_labels(audio: np.ndarray, sample_rate: int, fps: float, frames: int) -> np.ndarray:
    """(frames,) bool: the mix's power over each video frame's period [f / fps, (f + 1) / fps) is more
    than SILENT_BELOW_DB under the loudest frame's. audio (ears, N)."""
    edges = np.minimum(np.round(np.arange(frames + 1) * sample_rate / fps).astype(int), audio.shape[-1])
    cumulative = np.concatenate([[0.0], np.cumsum(np.square(np.asarray(audio, np.float64)).sum(0))])
    energy = np.diff(cumulative[edges]) / np.maximum(np.diff(edges), 1)  # 0 past the audio's end
    level = 10 * np.log10(energy + 1e-20)
    return level < level.max() - SILENT_BELOW_DB


class SilenceHead(torch.nn.Module):
    """Per frame pair (..., 2, S, S, 3) uint8, the frame before and the frame (`frame_pairs`) -> logits
    (..., 2): a source is on screen; a sounding one is. The frame and its change since the one before
    (an event's first frame flashes and grows its source) go through three 3x3 convolutions (two 2x
    max-pools between them), a global max over positions (a source is a small spot anywhere), one
    linear layer: 15k parameters."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 32)):
        super().__init__()
        layers, width = [], 6
        for i, c in enumerate(channels):
            layers += [torch.nn.Conv2d(width, c, 3, padding=1), torch.nn.SiLU()]
            layers += [torch.nn.MaxPool2d(2)] if i < len(channels) - 1 else []
            width = c
        self.features = torch.nn.Sequential(*layers)
        self.out = torch.nn.Linear(width, 2)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        lead = pairs.shape[:-4]
        x = pairs.reshape(-1, *pairs.shape[-4:]).float() / 255.0
        before, now = x[:, 0], x[:, 1]
        pixels = torch.cat([now, now - before], dim=-1).permute(0, 3, 1, 2)
        return self.out(self.features(pixels).amax(dim=(-2, -1))).reshape(*lead, 2)


def frame_pairs(frames: torch.Tensor, present: torch.Tensor, last: torch.Tensor,
                last_present: torch.Tensor) -> torch.Tensor:
    """A stream's new frames (B, F, S, S, 3) with presence (B, F), after its last frame (B, S, S, 3) with
    presence (B,) -> pairs (B, F, 2, S, S, 3): each frame after the one before it, or after itself
    where that one is missing (no change seen)."""
    before = torch.cat([last[:, None], frames[:, :-1]], dim=1)
    before_present = torch.cat([last_present[:, None], present[:, :-1]], dim=1)
    before = torch.where(before_present[..., None, None, None] > 0.5, before, frames)
    return torch.stack([before, frames], dim=2)


def gain_db(logits: torch.Tensor, frame_present: torch.Tensor) -> torch.Tensor:
    """Silence-head logits (..., 2) per frame (on screen, sounding on screen) -> gain (dB) per frame;
    0 where the frame is missing."""
    silent = torch.sigmoid(logits[..., 0]) * torch.sigmoid(-logits[..., 1])
    return FLOOR_DB * silent * (frame_present > 0.5)


def ease(hop: int, sample_rate: int) -> torch.Tensor:
    """(hop,) weights 0 -> 1: a raised cosine over the first RAMP_SECONDS of a block, then 1."""
    ramp = max(1, round(RAMP_SECONDS * sample_rate))
    position = torch.clamp((torch.arange(hop) + 0.5) / ramp, max=1.0)
    return 0.5 - 0.5 * torch.cos(torch.pi * position)


def waveform_gain(db: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample gain of L decoded blocks from the gains db (B, L + 1) in dB: block j eases from
    db[:, j] to db[:, j + 1] along `weights` (hop,) (`ease`), then holds. -> (B, L * hop)."""
    start, end = db[:, :-1, None], db[:, 1:, None]
    return (10.0 ** ((start + (end - start) * weights) / 20.0)).flatten(1)
