"""Procedural source kinds: how each kind sounds (a mono synthesiser) and how it looks on screen.

Every synthesiser draws only from the generator it is given, so a scene seed fixes every sample.
Sounds are normalised to the same RMS over their active time; a source's `gain_db` sets its level.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import signal

REFERENCE_RMS = 0.05  # -26 dBFS per source at 1 m before distance attenuation: headroom for 4 sources + room


@dataclass(frozen=True)
class Look:
    """How a kind is drawn: a shape, an RGB colour and a physical radius in metres."""

    shape: str  # circle | square | diamond | triangle | ring | cross | ellipse | bar
    color: tuple[int, int, int]
    radius: float


def _decay(n: int, sr: int, seconds: float) -> np.ndarray:
    return np.exp(-np.arange(n) / (seconds * sr))


def _resonator_bank(excitation: np.ndarray, sr: int, freqs, bandwidths) -> np.ndarray:
    """Sum of two-pole resonators (formants, body modes) driven by one excitation."""
    out = np.zeros_like(excitation)
    for f, bw in zip(freqs, bandwidths):
        r = np.exp(-np.pi * bw / sr)
        a = [1.0, -2 * r * np.cos(2 * np.pi * f / sr), r * r]
        out += signal.lfilter([1.0 - r], a, excitation)
    return out


def _strike(n: int, sr: int, rng: np.random.Generator, freqs, decays, noise_seconds=0.004) -> np.ndarray:
    """Modal synthesis: damped sinusoids plus a short noise transient."""
    t = np.arange(n) / sr
    out = np.zeros(n)
    for f, d in zip(freqs, decays):
        out += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) * np.exp(-t / d)
    click = min(n, int(noise_seconds * sr))
    out[:click] += rng.normal(0, 1.0, click) * np.linspace(1, 0, click)
    return out


def impact(n, sr, rng):
    freqs = rng.uniform(180, 1800, 4)
    return _strike(n, sr, rng, freqs, rng.uniform(0.02, 0.09, 4))


def bell(n, sr, rng):
    f0 = rng.uniform(350, 900)
    ratios = np.array([0.56, 0.92, 1.19, 1.71, 2.0, 2.74, 3.0])
    freqs = f0 * ratios
    keep = freqs < 0.45 * sr
    return _strike(n, sr, rng, freqs[keep], rng.uniform(0.4, 1.2, keep.sum()), noise_seconds=0.002)


def engine(n, sr, rng):
    t = np.arange(n) / sr
    f0 = rng.uniform(35, 80) * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    out = sum(np.sin(k * phase) / k for k in range(1, 16) if k * f0.max() < 0.45 * sr)
    firing = 0.6 + 0.4 * np.sin(phase / 2) ** 2
    rumble = signal.sosfilt(signal.butter(2, 300, fs=sr, output="sos"), rng.normal(0, 1, n))
    return out * firing + 0.5 * rumble


def speech(n, sr, rng):
    """Babble: a glottal pulse train with intonation through per-syllable formant filters."""
    t = np.arange(n) / sr
    f0 = rng.uniform(100, 220) * (1 + 0.12 * np.sin(2 * np.pi * rng.uniform(0.5, 1.5) * t))
    phase = np.cumsum(f0) / sr
    pulses = np.diff(np.floor(phase), prepend=0.0) + 0.02 * rng.normal(0, 1, n)
    vowels = [(730, 1090, 2440), (270, 2290, 3010), (530, 1840, 2480), (570, 840, 2410), (300, 870, 2240)]
    out = np.zeros(n)
    start = 0
    while start < n:
        length = int(rng.uniform(0.15, 0.3) * sr)
        seg = slice(start, min(n, start + length))
        seg_n = seg.stop - seg.start
        formants = vowels[rng.integers(len(vowels))]
        voiced = _resonator_bank(pulses[seg], sr, [f for f in formants if f < 0.45 * sr], [80, 100, 120])
        env = np.sin(np.pi * np.arange(seg_n) / max(seg_n, 1)) ** 2
        if rng.random() < 0.3:  # a fricative consonant
            voiced += 0.3 * signal.sosfilt(signal.butter(2, [2500, 0.45 * sr], "bandpass", fs=sr, output="sos"),
                                           rng.normal(0, 1, seg_n))
        out[seg] = voiced * env
        start += length + int(rng.uniform(0.0, 0.08) * sr)
    return out


def music(n, sr, rng):
    """Melody of decaying harmonic notes on a pentatonic scale."""
    out = np.zeros(n)
    root = rng.uniform(196, 330)
    scale = [0, 2, 4, 7, 9, 12, 14]
    note_len = rng.uniform(0.2, 0.45)
    start = 0
    while start < n:
        length = min(n - start, int(note_len * sr * rng.choice([1, 1, 2])))
        f = root * 2 ** (scale[rng.integers(len(scale))] / 12)
        t = np.arange(length) / sr
        tone = sum(np.sin(2 * np.pi * k * f * t) / k ** 1.5 for k in range(1, 7) if k * f < 0.45 * sr)
        attack = np.minimum(1.0, t / 0.005)
        out[start:start + length] = tone * attack * np.exp(-t / 0.25)
        start += length
    return out


def noise_burst(n, sr, rng):
    lo = rng.uniform(300, 1500)
    sos = signal.butter(2, [lo, min(lo * 4, 0.45 * sr)], "bandpass", fs=sr, output="sos")
    return signal.sosfilt(sos, rng.normal(0, 1, n))


def footsteps(n, sr, rng):
    out = np.zeros(n)
    period = rng.uniform(0.45, 0.6)
    thump = signal.butter(2, 400, fs=sr, output="sos")
    step = int(0.08 * sr)
    for k in range(int(np.ceil(n / (period * sr)))):
        start = int(k * period * sr + rng.uniform(-0.02, 0.02) * sr * (k > 0))
        length = min(step, n - start)
        if length <= 0:
            break
        burst = signal.sosfilt(thump, rng.normal(0, 1, length)) * _decay(length, sr, 0.02)
        burst[: int(0.003 * sr)] += 0.3 * rng.normal(0, 1, min(length, int(0.003 * sr)))
        out[start:start + length] += burst
    return out


def water(n, sr, rng):
    """Bubbles (rising damped sinusoids, Minnaert resonances) over a soft noise bed."""
    out = 0.05 * signal.sosfilt(signal.butter(2, [400, 3000], "bandpass", fs=sr, output="sos"), rng.normal(0, 1, n))
    count = rng.poisson(30 * n / sr)
    length = int(0.03 * sr)
    t = np.arange(length) / sr
    for start in rng.integers(0, max(1, n - length), count):
        f = rng.uniform(500, 2500)
        chirp = np.sin(2 * np.pi * f * (t + 40 * t * t)) * _decay(length, sr, rng.uniform(0.005, 0.012))
        out[start:start + length] += rng.uniform(0.3, 1.0) * chirp
    return out


def wind(n, sr, rng):
    """Low-passed noise whose level and cutoff drift slowly (gusts)."""
    t = np.arange(n) / sr
    gust = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.1, 0.3) * t + rng.uniform(0, 6.3))
    low = signal.sosfilt(signal.butter(2, 500, fs=sr, output="sos"), rng.normal(0, 1, n))
    high = signal.sosfilt(signal.butter(2, [800, 2500], "bandpass", fs=sr, output="sos"), rng.normal(0, 1, n))
    return gust * low + 0.3 * gust ** 2 * high


def bird(n, sr, rng):
    """Frequency-modulated chirps in bursts."""
    out = np.zeros(n)
    start = 0
    while start < n:
        length = min(n - start, int(rng.uniform(0.06, 0.15) * sr))
        t = np.arange(length) / sr
        f = rng.uniform(2000, 4500) + rng.uniform(-1500, 1500) * t / max(t[-1], 1e-3)
        f = np.minimum(f, 0.45 * sr)
        if length > 1:
            out[start:start + length] = np.sin(2 * np.pi * np.cumsum(f) / sr) * np.sin(np.pi * t / t[-1])
        start += length + int(rng.uniform(0.03, 0.25) * sr)
    return out


@dataclass(frozen=True)
class SourceKind:
    name: str
    synth: Callable[[int, int, np.random.Generator], np.ndarray]
    look: Look
    impulsive: bool  # a sound that starts with a strike: events are short and their onsets sharp


KINDS: dict[str, SourceKind] = {k.name: k for k in [
    SourceKind("impact", impact, Look("square", (235, 120, 30), 0.25), True),
    SourceKind("engine", engine, Look("bar", (120, 120, 130), 0.6), False),
    SourceKind("speech", speech, Look("circle", (240, 170, 150), 0.25), False),
    SourceKind("music", music, Look("diamond", (40, 80, 230), 0.3), False),
    SourceKind("noise_burst", noise_burst, Look("cross", (245, 245, 245), 0.3), True),
    SourceKind("footsteps", footsteps, Look("ellipse", (120, 70, 30), 0.35), False),
    SourceKind("bell", bell, Look("triangle", (250, 220, 30), 0.25), True),
    SourceKind("water", water, Look("ring", (40, 220, 230), 0.35), False),
    SourceKind("wind", wind, Look("ellipse", (190, 200, 215), 0.5), False),
    SourceKind("bird", bird, Look("triangle", (40, 200, 60), 0.15), False),
]}


def synthesize(kind: str, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """n samples of a kind's sound at REFERENCE_RMS."""
    x = np.asarray(KINDS[kind].synth(n, sr, rng), dtype=np.float64)
    rms = np.sqrt(np.mean(x * x)) if n else 0.0
    return x * (REFERENCE_RMS / rms) if rms > 0 else x
