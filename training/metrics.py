"""Objective binaural metrics (DESIGN.md section 5). Arrays are (2, N), channel 0 = left ear.

Conventions: ITD is the delay of the right ear relative to the left, in seconds, so a source on the
left (positive azimuth) has a positive ITD; ILD = 10 log10(P_left / P_right) dB, positive on the left;
lateral angles are degrees from the median plane, positive left. Binaural cues cannot tell front from
back, so direction errors are lateral-angle errors, reported separately for sources in front and behind.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import signal

from engine.geometry import HEAD_RADIUS, lateral_angle, woodworth_lateral

# Woodworth's model describes the high-frequency (onset) ITD; GCC-PHAT below 1.5 kHz measures a larger,
# low-frequency ITD (Kuhn 1977). The effective radius below maps our low-band ITD to lateral angle; it
# was fitted on the shipped AXD subject-1 HRTF (tests/test_metrics.py::test_head_radius_fits_hrtf).
MAX_ITD = 1e-3  # s: GCC-PHAT lag search range
ITD_BAND_HZ = 1500.0
FRAME_SECONDS, HOP_SECONDS = 0.064, 0.02
DOMINANCE_DB = 6.0  # a source dominates a frame when its direct sound is 6 dB above all others together
DIRECTION_MIN_COHERENCE = 0.8  # direction is read only where the direct sound dominates (Faller & Merimaa 2004)
SILENCE_DB = 40.0  # frames more than 40 dB below the loudest frame are not analysed
THIRD_OCTAVE_CENTERS = 1000.0 * 2.0 ** (np.arange(-6, 9) / 3)  # 250 Hz .. 6.3 kHz


# --------------------------------------------------------------------------- 2.5D Visual Sound distances


def stft(x: np.ndarray, n_fft: int = 512, hop: int = 160, win: int = 400) -> np.ndarray:
    """librosa-style centred STFT (zero padding, periodic Hann of `win` centred in n_fft): (..., F, T)."""
    window = np.zeros(n_fft)
    offset = (n_fft - win) // 2
    window[offset:offset + win] = signal.get_window("hann", win, fftbins=True)
    pad = [(0, 0)] * (x.ndim - 1) + [(n_fft // 2, n_fft // 2)]
    padded = np.pad(np.asarray(x, dtype=np.float64), pad)
    count = 1 + (padded.shape[-1] - n_fft) // hop
    idx = np.arange(count)[:, None] * hop + np.arange(n_fft)[None, :]
    return np.swapaxes(np.fft.rfft(padded[..., idx] * window, axis=-1), -1, -2)


def stft_distance(ref: np.ndarray, est: np.ndarray) -> float:
    """Sum over ears of the mean squared error of STFT real and imaginary parts (16 kHz, 512/160/400)."""
    ref, est = _pair(ref, est)
    d = stft(ref) - stft(est)
    return float(sum(np.mean(np.concatenate([d[e].real, d[e].imag]) ** 2) for e in range(2)))


def envelope_distance(ref: np.ndarray, est: np.ndarray) -> float:
    """Sum over ears of the RMSE between Hilbert envelopes."""
    ref, est = _pair(ref, est)
    env = lambda x: np.abs(signal.hilbert(x, axis=-1))  # noqa: E731
    return float(np.sum(np.sqrt(np.mean((env(ref) - env(est)) ** 2, axis=-1))))


def _pair(ref, est):
    ref, est = np.asarray(ref, np.float64), np.asarray(est, np.float64)
    if ref.ndim != 2 or ref.shape[0] != 2 or est.shape != ref.shape:
        raise ValueError(f"expected two (2, N) signals of equal length, got {ref.shape} and {est.shape}")
    return ref, est


# ------------------------------------------------------------------------------------ interaural cues


@dataclass
class BinauralCues:
    """Per-frame interaural cues of a binaural signal."""

    times: np.ndarray  # frame centres, s
    itd: np.ndarray  # s, positive = left ear leads
    ild: np.ndarray  # (T, bands) dB, positive = left louder
    band_power: np.ndarray  # (T, bands) mean of both ears' band power
    coherence: np.ndarray  # max normalised cross-correlation within +-1 ms
    energy_db: np.ndarray  # frame energy, dB
    active: np.ndarray  # frames within SILENCE_DB of the loudest

    @property
    def broadband_ild(self) -> np.ndarray:
        w = self.band_power / np.maximum(self.band_power.sum(axis=1, keepdims=True), 1e-30)
        return np.sum(w * self.ild, axis=1)


def binaural_cues(audio: np.ndarray, sample_rate: int, frame_seconds: float = FRAME_SECONDS,
                  hop_seconds: float = HOP_SECONDS, upsample: int = 16) -> BinauralCues:
    """GCC-PHAT ITD (< 1.5 kHz, |tau| <= 1 ms), third-octave ILDs and interaural coherence per frame."""
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != 2:
        raise ValueError(f"expected a (2, N) binaural signal, got shape {x.shape}")
    frame, hop = int(round(frame_seconds * sample_rate)), int(round(hop_seconds * sample_rate))
    if x.shape[1] < frame:
        x = np.pad(x, ((0, 0), (0, frame - x.shape[1])))
    count = 1 + (x.shape[1] - frame) // hop
    idx = np.arange(count)[:, None] * hop + np.arange(frame)[None, :]
    frames = x[:, idx] * np.hanning(frame)  # (2, T, frame)
    nfft = 2 * frame
    spec = np.fft.rfft(frames, nfft, axis=-1)
    freqs = np.fft.rfftfreq(nfft, 1 / sample_rate)
    cross = spec[1] * np.conj(spec[0])  # correlation of right against left: peak at the right ear's lag
    max_lag = int(np.ceil(MAX_ITD * sample_rate * upsample))

    phat = cross / np.maximum(np.abs(cross), 1e-20) * (freqs <= ITD_BAND_HZ)
    cc = np.fft.irfft(phat, nfft * upsample, axis=-1)
    lags = np.concatenate([cc[:, -max_lag:], cc[:, :max_lag + 1]], axis=1)
    itd = (np.argmax(lags, axis=1) - max_lag) / (sample_rate * upsample)

    plain = np.fft.irfft(cross, nfft * upsample, axis=-1) * upsample
    window_lags = np.concatenate([plain[:, -max_lag:], plain[:, :max_lag + 1]], axis=1)
    power = np.sum(frames ** 2, axis=-1)  # (2, T)
    coherence = np.max(window_lags, axis=1) / np.maximum(np.sqrt(power[0] * power[1]), 1e-30)

    bands = []
    for centre in THIRD_OCTAVE_CENTERS:
        lo, hi = centre * 2 ** (-1 / 6), centre * 2 ** (1 / 6)
        sel = (freqs >= lo) & (freqs < hi)
        bands.append(np.sum(np.abs(spec[..., sel]) ** 2, axis=-1))
    band_power = np.stack(bands, axis=-1)  # (2, T, B)
    ild = 10 * np.log10(np.maximum(band_power[0], 1e-20) / np.maximum(band_power[1], 1e-20))
    energy_db = 10 * np.log10(np.maximum(power.sum(axis=0), 1e-30))
    active = energy_db > energy_db.max() - SILENCE_DB
    times = (np.arange(count) * hop + frame / 2) / sample_rate
    return BinauralCues(times, itd, ild, band_power.mean(axis=0), np.clip(coherence, 0, 1), energy_db, active)


def lateral_from_cues(cues: BinauralCues, head_radius: float = HEAD_RADIUS) -> tuple[np.ndarray, np.ndarray]:
    """(lateral angle deg from the ITD by Woodworth's model, whether the ILD sign agrees).

    The ILD check counts as agreeing when either cue is too small to carry a side (|ILD| < 1 dB or
    lateral < 5 degrees)."""
    lateral = woodworth_lateral(cues.itd, head_radius)
    ild = cues.broadband_ild
    agrees = (np.sign(ild) == np.sign(lateral)) | (np.abs(ild) < 1.0) | (np.abs(lateral) < 5.0)
    return lateral, agrees


# ------------------------------------------------------------------------------- reference comparisons


def cue_errors(ref: np.ndarray, est: np.ndarray, sample_rate: int, frames: np.ndarray | None = None,
               min_reference_coherence: float = 0.0) -> dict:
    """ITD error (us), per-band ILD error (dB) and coherence error of two binaural signals
    (errors_from_cues on their cues)."""
    ref, est = _pair(ref, est)
    return errors_from_cues(binaural_cues(ref, sample_rate), binaural_cues(est, sample_rate), frames,
                            min_reference_coherence)


def errors_from_cues(a: BinauralCues, b: BinauralCues, frames: np.ndarray | None = None,
                     min_reference_coherence: float = 0.0) -> dict:
    """Cue errors of b against the reference a on frames where the reference sounds (and `frames`, a
    (T,) mask over the cue frames, is True, if given; and the reference's interaural coherence is at
    least `min_reference_coherence`: DIRECTION_MIN_COHERENCE keeps the frames where the direct sound
    dominates and the reference has an ITD at all, as direction_error does)."""
    frames = a.active if frames is None else a.active & frames
    frames = frames & (a.coherence >= min_reference_coherence)
    if not frames.any():
        raise ValueError("the reference is silent: no frame to compare")
    itd_err = np.abs(a.itd - b.itd)[frames] * 1e6
    loud_band = a.band_power > a.band_power.max() * 10 ** (-SILENCE_DB / 10)
    sel = loud_band & frames[:, None]
    ild_err = np.abs(a.ild - b.ild)[sel]
    ic_err = np.abs(a.coherence - b.coherence)[frames]
    return {
        "itd_error_us": float(np.mean(itd_err)), "itd_error_us_median": float(np.median(itd_err)),
        "ild_error_db": float(np.mean(ild_err)) if len(ild_err) else float("nan"), "ic_error": float(np.mean(ic_err)),
        "frames": int(frames.sum()),
    }


def compare(ref: np.ndarray, est: np.ndarray, sample_rate: int) -> dict:
    """All reference metrics of an estimate against the ground truth."""
    out = {"stft_distance": stft_distance(ref, est), "envelope_distance": envelope_distance(ref, est)}
    out.update(cue_errors(ref, est, sample_rate))
    return out


# ------------------------------------------------------------------------------- against scene metadata


def meta_tracks(meta: dict):
    """(frame times, azimuth (F, S), elevation (F, S), active (F, S), visible (F, S)) from meta.json."""
    frames = meta["frames"]
    times = np.array([f["t"] for f in frames])
    get = lambda key: np.array([[s[key] for s in f["sources"]] for f in frames])  # noqa: E731
    return times, get("azimuth").astype(float), get("elevation").astype(float), get("active"), get("visible")


def dominant_source(meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """(index of each frame's dominant source, whether one dominates) from meta.json."""
    _, _, _, active, _ = meta_tracks(meta)
    if all("level_db" in s for s in meta["frames"][0]["sources"]):
        level = np.array([[s["level_db"] for s in f["sources"]] for f in meta["frames"]], dtype=np.float64)
        power = np.where(active, 10 ** (level / 10), 0.0)
        which = np.argmax(power, axis=1)
        rest = power.sum(axis=1) - power[np.arange(len(power)), which]
        dominated = active.any(axis=1) & (power[np.arange(len(power)), which] >= rest * 10 ** (DOMINANCE_DB / 10))
        return which, dominated
    return np.argmax(active, axis=1), active.sum(axis=1) == 1


def direction_error(audio: np.ndarray, sample_rate: int, meta: dict, head_radius: float = HEAD_RADIUS,
                    min_coherence: float = DIRECTION_MIN_COHERENCE) -> dict:
    """Lateral-angle error of the direction estimated from the audio against the metadata.

    A frame is scored against the source that dominates it: whose direct-sound level (meta
    `level_db`) is DOMINANCE_DB above the power sum of the other active sources (without levels in
    the metadata: the only active source). Of those, only frames whose interaural coherence is at
    least `min_coherence` count: in a room the late reverb decorrelates the ears and drags the ITD
    toward zero, and, as in the auditory cue-selection model of Faller & Merimaa (2004), cues are
    trusted only where the direct sound dominates; `coverage` is the fraction of frames kept.
    Front (|azimuth| <= 90) and back sources are reported apart: lateral cues alone cannot separate them."""
    cues = binaural_cues(audio, sample_rate)
    lateral, agrees = lateral_from_cues(cues, head_radius)
    times, az, el, active, _ = meta_tracks(meta)
    frame_index = np.clip(np.rint(cues.times * meta["fps"]).astype(int), 0, len(times) - 1)
    which, dominated = dominant_source(meta)
    candidates = cues.active & dominated[frame_index]
    use = candidates & (cues.coherence >= min_coherence)
    src = which[frame_index]
    true_az = az[frame_index, src]
    truth = lateral_angle(true_az, el[frame_index, src])
    err = np.abs(lateral - truth)
    front = np.abs(true_az) <= 90

    def summary(mask):
        sel = use & mask
        return {"frames": int(sel.sum()),
                "median_deg": float(np.median(err[sel])) if sel.any() else None,
                "mean_deg": float(np.mean(err[sel])) if sel.any() else None}

    result = summary(np.ones_like(use))
    result.update(front=summary(front), back=summary(~front),
                  coverage=float(use.sum() / candidates.sum()) if candidates.any() else 0.0,
                  ild_agreement=float(np.mean(agrees[use])) if use.any() else None)
    result["series"] = {"times": cues.times, "estimate": lateral, "truth": truth, "scored": use}
    return result


def detect_onsets(audio: np.ndarray, sample_rate: int, rise_db: float = 9.0, min_gap: float = 0.08) -> np.ndarray:
    """Onset times (s): where the 5 ms log-energy rises by `rise_db` within 10 ms, refined to the steepest rise."""
    mono = np.asarray(audio, dtype=np.float64)
    mono = mono.sum(axis=0) if mono.ndim == 2 else mono
    hop = max(1, sample_rate // 1000)  # 1 ms
    win = 5 * hop
    energy = np.convolve(mono ** 2, np.ones(win) / win, mode="same")[::hop]
    level = 10 * np.log10(energy + 1e-10 * max(energy.max(), 1e-20))
    floor = level.max() - 50
    level = np.maximum(level, floor)
    lag = 10
    rise = level[lag:] - level[:-lag]
    onsets, last = [], -np.inf
    i = 0
    while i < len(rise):
        if rise[i] >= rise_db:
            j = i + int(np.argmax(rise[i:i + lag]))
            slope = np.diff(level[j:j + lag + 1])
            t = (j + int(np.argmax(slope)) + 0.5) * hop / sample_rate
            if t - last >= min_gap:
                onsets.append(t)
                last = t
            i = j + lag
        else:
            i += 1
    return np.asarray(onsets)


def visible_events(meta: dict) -> np.ndarray:
    """Onset times of events whose source is on screen at the onset."""
    times, _, _, _, visible = meta_tracks(meta)
    out = []
    for s, src in enumerate(meta["scene"]["sources"]):
        for ev in src.get("events") or []:
            f = min(int(np.floor(ev["t"] * meta["fps"] + 1e-9)), len(times) - 1)
            if visible[f, s]:
                out.append(ev["t"])
    return np.sort(np.asarray(out, dtype=np.float64))


def onset_frames(times: np.ndarray, meta: dict, frame_seconds: float = FRAME_SECONDS,
                 hop_seconds: float = HOP_SECONDS) -> np.ndarray:
    """(T,) mask of the cue frames (centred at `times`) that open on a visible event: for each event,
    the one frame whose window starts within a hop before its onset, so the window holds the first
    wavefront and at most its first 64 ms. There a listener localises a source even in a room (the
    precedence effect; Litovsky et al. 1999), and the room's late tail has not yet built up, so its
    noise does not decide the cues as it does in the frames that follow."""
    starts = np.asarray(times) - frame_seconds / 2
    mask = np.zeros(len(starts), dtype=bool)
    for onset in visible_events(meta):
        mask |= (starts > onset - hop_seconds) & (starts <= onset + 1e-9)
    return mask


def onset_sync(audio: np.ndarray, sample_rate: int, meta: dict, tolerance: float = 0.04,
               search: float = 0.25) -> dict:
    """For each visible event, the nearest detected audio onset within +-250 ms: the DeSync analogue."""
    events = visible_events(meta)
    onsets = detect_onsets(audio, sample_rate)
    errors = []
    for t in events:
        d = onsets - t
        near = d[np.abs(d) <= search]
        errors.append(near[np.argmin(np.abs(near))] if len(near) else np.inf)
    errors = np.asarray(errors)
    hit = np.abs(errors) <= tolerance
    finite = np.isfinite(errors)
    return {
        "events": int(len(events)),
        "within_40ms": float(np.mean(hit)) if len(events) else None,
        "median_abs_error_ms": float(np.median(np.abs(errors[finite])) * 1e3) if finite.any() else None,
        "missed": int(np.sum(~finite)),
        "onsets_detected": int(len(onsets)),
    }
