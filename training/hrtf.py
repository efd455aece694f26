"""Measured HRTFs from SOFA files, split into onset delays and aligned filters, interpolated on the sphere.

Each measured HRIR is decomposed into a per-ear onset delay (threshold onset on a 4x-upsampled,
low-passed copy) and an onset-aligned filter. Directions between measurements are interpolated with
barycentric (VBAP-style) weights on the Delaunay triangulation of the measured directions: the aligned
filters are mixed, the delays are mixed separately. Mixing aligned filters avoids the comb filtering of
mixing raw HRIRs whose onsets differ; rendering applies the delays as a fractional delay line, so the
interaural time difference moves smoothly.

The default set is subject 1 of the AXD database (Imperial College London, in-ear, 793 directions,
48 kHz, CC BY-SA 3.0) as shipped offline by the PyPI package spatialaudiometrics==0.1.0.
"""
from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np
from scipy import signal
from scipy.spatial import ConvexHull, cKDTree

from engine.geometry import unit_vector

BUILTIN_SETS = {"axd1": "example_sofa_1.sofa", "axd2": "example_sofa_2.sofa"}
FILTER_TAPS_SECONDS = 0.004  # aligned filters keep 4 ms after the onset: the pinna/head response
PRE_ONSET_SECONDS = 0.0005  # kept before the onset so the band-limited main lobe is not cut
ONSET_THRESHOLD = 0.2  # onset = first crossing of 20% (-14 dB) of the low-passed peak
ONSET_LOWPASS_HZ = 3000.0
ANTI_ALIAS = 0.9  # fraction of the target Nyquist kept when resampling measured responses down
MIN_ELEVATION = -45.0  # lowest measured elevation of the AXD sets; lower queries are clamped


class HrtfError(ValueError):
    """A SOFA file that cannot be used (missing, wrong convention, malformed data)."""


@dataclass(frozen=True)
class HrtfSet:
    """Decomposed HRIR set at one sample rate.

    filters: (M, 2, L) onset-aligned impulse responses (channel 0 = left ear).
    onsets: (M, 2) per-ear onset delay in seconds, relative to the measurement's time origin.
    directions: (M, 3) unit vectors of the measured source directions.
    """

    name: str
    sample_rate: int
    filters: np.ndarray
    onsets: np.ndarray
    directions: np.ndarray
    measured_distance: float
    raw_irs: np.ndarray  # (M, 2, N) original responses resampled to sample_rate, for checks

    @functools.cached_property
    def _triangulation(self):
        hull = ConvexHull(self.directions)
        faces = hull.simplices
        inverse = np.linalg.inv(self.directions[faces].transpose(0, 2, 1))  # (F, 3, 3): v -> weights
        centroids = self.directions[faces].mean(axis=1)
        return faces, inverse, cKDTree(centroids / np.linalg.norm(centroids, axis=1, keepdims=True))

    def weights(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Barycentric interpolation: (indices (Q, 3), weights (Q, 3)) of unit vectors (Q, 3)."""
        faces, inverse, tree = self._triangulation
        q = np.asarray(vectors, dtype=np.float64).reshape(-1, 3)
        _, candidates = tree.query(q, k=min(32, len(faces)))  # faces near the poles are large
        g = np.einsum("qkij,qj->qki", inverse[candidates], q)  # weights in each candidate face
        score = g.min(axis=-1)  # >= 0 inside the face
        best = np.argmax(score, axis=1)
        rows = np.arange(len(q))
        g = np.clip(g[rows, best], 0.0, None)
        return faces[candidates[rows, best]], g / g.sum(axis=1, keepdims=True)

    def lookup(self, azimuth_deg, elevation_deg) -> tuple[np.ndarray, np.ndarray]:
        """Interpolated (filters (Q, 2, L), onsets (Q, 2) seconds) at head-relative directions."""
        el = np.maximum(np.asarray(elevation_deg, dtype=np.float64), MIN_ELEVATION)
        idx, w = self.weights(unit_vector(azimuth_deg, el).reshape(-1, 3))
        filters = np.einsum("qk,qkel->qel", w, self.filters[idx])
        onsets = np.einsum("qk,qke->qe", w, self.onsets[idx])
        return filters, onsets

    def nearest(self, azimuth_deg: float, elevation_deg: float) -> int:
        """Index of the measured direction closest to the given one."""
        return int(np.argmax(self.directions @ unit_vector(azimuth_deg, elevation_deg)))


def _sofa_path(name: str) -> Path:
    if name in BUILTIN_SETS:
        try:
            root = importlib.resources.files("spatialaudiometrics")
        except ModuleNotFoundError as exc:
            raise HrtfError(
                f"HRTF set {name!r} ships in the package spatialaudiometrics: "
                "pip install --no-deps spatialaudiometrics==0.1.0 (make setup does this)"
            ) from exc
        return Path(str(root / BUILTIN_SETS[name]))
    path = Path(name)
    if not path.is_file():
        raise HrtfError(f"HRTF file {name!r} not found (use one of {sorted(BUILTIN_SETS)} or a .sofa path)")
    return path


def _read_sofa(path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """(irs (M, 2, N), source positions (M, 3) spherical deg/deg/m, sample rate) of a SimpleFreeFieldHRIR file."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            convention = f.attrs.get("SOFAConventions", b"")
            convention = convention.decode() if isinstance(convention, bytes) else str(convention)
            if convention != "SimpleFreeFieldHRIR":
                raise HrtfError(f"{path}: SOFA convention {convention!r}, expected SimpleFreeFieldHRIR")
            irs = np.asarray(f["Data.IR"][:], dtype=np.float64)
            positions = np.asarray(f["SourcePosition"][:], dtype=np.float64)
            pos_type = f["SourcePosition"].attrs.get("Type", b"spherical")
            rate = float(np.asarray(f["Data.SamplingRate"][:]).ravel()[0])
            delay = np.asarray(f["Data.Delay"][:])
    except (OSError, KeyError) as exc:
        raise HrtfError(f"{path}: not a readable SOFA file ({exc})") from exc
    pos_type = pos_type.decode() if isinstance(pos_type, bytes) else str(pos_type)
    if pos_type != "spherical":
        raise HrtfError(f"{path}: SourcePosition type {pos_type!r}, expected spherical")
    if irs.ndim != 3 or irs.shape[1] != 2 or irs.shape[0] != positions.shape[0]:
        raise HrtfError(f"{path}: Data.IR has shape {irs.shape}, expected (M, 2, N) matching SourcePosition")
    if np.any(delay != 0):
        raise HrtfError(f"{path}: non-zero Data.Delay is not supported")
    if not np.all(np.isfinite(irs)):
        raise HrtfError(f"{path}: Data.IR contains NaN or infinite values")
    return irs, positions, rate


def _onsets(irs: np.ndarray, rate: float) -> np.ndarray:
    """Per-ear onset time (seconds) by threshold crossing of a low-passed, 4x-upsampled copy."""
    up = 4
    sos = signal.butter(4, ONSET_LOWPASS_HZ, fs=rate, output="sos")
    smooth = signal.resample_poly(signal.sosfiltfilt(sos, irs, axis=-1), up, 1, axis=-1)
    mag = np.abs(smooth)
    first = np.argmax(mag >= ONSET_THRESHOLD * mag.max(axis=-1, keepdims=True), axis=-1)
    return first / (rate * up)


def _advance(irs: np.ndarray, seconds: np.ndarray, rate: float, length: int) -> np.ndarray:
    """Shift each response earlier by a fractional number of seconds (frequency-domain, zero padded)."""
    n = 2 ** int(np.ceil(np.log2(irs.shape[-1] * 2)))
    spectrum = np.fft.rfft(irs, n=n, axis=-1)
    freqs = np.fft.rfftfreq(n, 1 / rate)
    shifted = np.fft.irfft(spectrum * np.exp(2j * np.pi * freqs * seconds[..., None]), n=n, axis=-1)
    return shifted[..., :length]


@functools.lru_cache(maxsize=4)
def load_hrtf(name: str = "axd1", sample_rate: int = 16000) -> HrtfSet:
    """Load a SOFA HRIR set, resample it to sample_rate and decompose it (cached per process)."""
    irs, positions, rate = _read_sofa(_sofa_path(name))
    if sample_rate < rate:  # band-limit first: resample_poly's own filter aliases near the new Nyquist
        guard = signal.butter(8, ANTI_ALIAS * sample_rate / 2, fs=rate, output="sos")
        irs = signal.sosfiltfilt(guard, irs, axis=-1)
    onsets = _onsets(irs, rate)
    pre = PRE_ONSET_SECONDS
    aligned_len_src = int(round((FILTER_TAPS_SECONDS + pre) * rate))
    aligned = _advance(irs, onsets - pre, rate, aligned_len_src)
    g = gcd(int(sample_rate), int(rate))
    up, down = int(sample_rate) // g, int(rate) // g
    # An impulse response resampled like a signal loses gain by the rate ratio; scale it back so
    # the frequency response is unchanged.
    gain = rate / sample_rate
    taps = int(round((FILTER_TAPS_SECONDS + pre) * sample_rate))
    filters = gain * signal.resample_poly(aligned, up, down, axis=-1)[..., :taps]
    raw = gain * signal.resample_poly(irs, up, down, axis=-1)
    directions = unit_vector(positions[:, 0], positions[:, 1])
    return HrtfSet(
        name=name,
        sample_rate=int(sample_rate),
        filters=np.ascontiguousarray(filters),
        onsets=onsets - pre,  # the aligned filters start `pre` before the onset
        directions=directions,
        measured_distance=float(np.median(positions[:, 2])),
        raw_irs=raw,
    )
