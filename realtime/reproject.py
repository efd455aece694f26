"""Late head-rotation correction: binaural audio generated for one head yaw, re-spatialised for the yaw
measured just before it plays (the audio analogue of VR's late reprojection; DESIGN.md section 4).

A hop is generated from the poses known when it ran; by the time it plays the head has moved on. Per
small block, `LateRotation` reads the dominant source's lateral angle from the generated audio itself
(GCC-PHAT ITD below 1.5 kHz over the last 64 ms, inverted through Woodworth's model), moves that source
by the yaw change since generation (azimuth a -> a - d, for a source in front), and changes the ears
by the difference: half the ITD change as a fractional delay per ear (ramped across the block, so the
delay never jumps) and a broadband ILD change (ILD_MAX_DB sin theta) as opposite gains. It works for
any model, including one whose ears are nearly identical (a source straight ahead then moves aside).
Constant cost: BASE_DELAY + the interpolator's half width (2 ms at 16 kHz).
"""
from __future__ import annotations

import math

import numpy as np

from engine.geometry import HEAD_RADIUS, woodworth_itd, woodworth_lateral
from realtime.audio import sinc_read

ILD_MAX_DB = 8.0  # broadband ILD at 90 degrees, a mid-band average for a human head
ITD_BAND_HZ = 1500.0
MIN_COHERENCE = 0.3  # below this the block's direction is unreliable: keep the previous estimate
HALF_TAPS = 8


class LateRotation:
    def __init__(self, sample_rate: int = 16000, analysis: int = 1024):
        self.sr, self.analysis = sample_rate, analysis
        self.base = math.ceil(1.0e-3 * sample_rate) + HALF_TAPS  # > the largest half ITD change (0.8 ms)
        self.history = np.zeros((analysis, 2), np.float64)
        self.delays = np.array([self.base, self.base], np.float64)  # per ear, in samples
        self.gains = np.ones(2)
        self.lateral = 0.0  # degrees, the generated audio's dominant direction
        freqs = np.fft.rfftfreq(analysis, 1 / sample_rate)
        self.band = (freqs > 0) & (freqs < ITD_BAND_HZ)
        lags = np.linspace(-1e-3, 1e-3, 201)
        ramp = 2 * np.pi * freqs[self.band][:, None] * lags[None, :]
        self.lags, self.cos, self.sin = lags, np.cos(ramp), np.sin(ramp)
        self.window = np.hanning(analysis)

    def measure_lateral(self, x: np.ndarray) -> float:
        """Lateral angle (degrees, positive = left) of the dominant source in the last `analysis` samples."""
        spectra = np.fft.rfft(x[-self.analysis:] * self.window[:, None], axis=0)
        cross = (spectra[:, 0] * np.conj(spectra[:, 1]))[self.band]  # L conj(R): phase +w tau if R is later
        power = np.abs(spectra[self.band]) ** 2
        if power.sum() <= 1e-12:
            return self.lateral
        white = cross / (np.abs(cross) + 1e-20)
        best = int(np.argmax(white.real @ self.cos + white.imag @ self.sin))
        aligned = (cross.real * self.cos[:, best] + cross.imag * self.sin[:, best]).sum()
        coherence = aligned / math.sqrt(power[:, 0].sum() * power[:, 1].sum())
        if coherence >= MIN_COHERENCE:
            self.lateral = float(woodworth_lateral(self.lags[best], HEAD_RADIUS))
        return self.lateral

    def process(self, block: np.ndarray, yaw_change: float) -> np.ndarray:
        """block (n, 2) as generated; yaw_change = yaw now - yaw it was generated for (degrees, positive =
        head turned left). Returns the block re-spatialised, delayed by `self.base` samples."""
        x = np.concatenate([self.history, block.astype(np.float64)])
        theta = self.measure_lateral(x)
        moved = math.degrees(math.asin(max(-1.0, min(1.0, math.sin(math.radians(theta - yaw_change))))))
        itd_change = float(woodworth_itd(moved, HEAD_RADIUS) - woodworth_itd(theta, HEAD_RADIUS))
        ild_change = ILD_MAX_DB * (math.sin(math.radians(moved)) - math.sin(math.radians(theta)))
        # a larger ITD (more to the left) = the right ear later and quieter, the left earlier and louder
        target_delays = self.base + np.array([-0.5, 0.5]) * itd_change * self.sr
        target_gains = 10.0 ** (np.array([1.0, -1.0]) * ild_change / 40.0)
        n = len(block)
        ramp = (np.arange(1, n + 1) / n)[:, None]
        delays = self.delays[None, :] + ramp * (target_delays - self.delays)[None, :]
        gains = self.gains[None, :] + ramp * (target_gains - self.gains)[None, :]
        out = np.empty((n, 2), np.float32)
        for ear in range(2):
            positions = len(self.history) + np.arange(n) - delays[:, ear]
            out[:, ear] = sinc_read(x[:, ear:ear + 1], positions, HALF_TAPS)[:, 0] * gains[:, ear]
        self.delays, self.gains = target_delays, target_gains
        self.history = x[-self.analysis:]
        return out
