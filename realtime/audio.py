"""Headphones through PortAudio (sounddevice), with a resampler that also absorbs clock drift.

The model speaks 16 kHz; sound cards run at 44.1/48 kHz on their own crystal, which drifts against the
producer's clock. `Resampler` converts at ratio device_rate / 16000 * (1 + correction), a band-limited
(Kaiser-windowed sinc) interpolator with its input history as state, so blocks join seamlessly.
`HeadphoneSink` feeds a preallocated `AudioRing`; the device callback only copies out of it
(python-rtmixer's rule). The correction follows the ring's fill level with a small proportional
gain, capped at +-0.5% (NetEq's accelerate/decelerate), so the latency stays at its target.
"""
from __future__ import annotations

import numpy as np

from realtime.ring import AudioRing

MAX_DRIFT_CORRECTION = 0.005
TAPS = 32  # per side... of the sinc kernel, in input samples


class Resampler:
    """Streaming band-limited resampling of (n, channels) blocks at a ratio that may change per block.

    Output lags the input by `half_taps` input samples (1 ms at 16 kHz); block boundaries are seamless."""

    def __init__(self, channels: int = 2, half_taps: int = TAPS // 2, beta: float = 8.0):
        self.half, self.beta = half_taps, beta
        self.history = np.zeros((2 * half_taps, channels), np.float64)
        self.position = float(half_taps)  # of the next output sample, as an index into history + block

    def process(self, block: np.ndarray, ratio: float) -> np.ndarray:
        """block (n, channels) at the input rate -> output at input rate * ratio (about n * ratio samples)."""
        x = np.concatenate([self.history, block.astype(np.float64)])
        step = 1.0 / ratio
        last = len(x) - 1 - self.half  # an output needs `half` samples after its floor
        t = self.position + np.arange(max(0, int(np.ceil((last + 1 - self.position) / step)) + 1)) * step
        t = t[np.floor(t) <= last]
        count = len(t)
        # downsampling: the kernel's cutoff also removes what the output cannot carry
        out = sinc_read(x, t, self.half, self.beta, cutoff=min(1.0, ratio))
        self.position += count * step - len(block)
        self.history = x[-2 * self.half:]
        return out


def sinc_read(x: np.ndarray, t: np.ndarray, half: int, beta: float = 8.0, cutoff: float = 1.0) -> np.ndarray:
    """Band-limited values of x (n, channels) at fractional sample positions t (m,): Kaiser-windowed sinc
    over the `half` samples on each side (the caller keeps half samples of margin)."""
    idx = np.floor(t).astype(int)[:, None] + np.arange(-half + 1, half + 1)[None, :]
    dist = t[:, None] - idx
    weights = cutoff * np.sinc(cutoff * dist) * _kaiser(dist / half, beta)
    return np.einsum("nk,nkc->nc", weights, x[idx]).astype(np.float32)


def _kaiser(u: np.ndarray, beta: float) -> np.ndarray:
    """Kaiser window at positions u in [-1, 1] (0 outside)."""
    inside = np.abs(u) < 1
    return np.where(inside, np.i0(beta * np.sqrt(np.clip(1 - u * u, 0, 1))) / np.i0(beta), 0.0)


class HeadphoneSink:
    """One stream's audio to a PortAudio output device (sounddevice) through the ring.

    Playback starts once `target_ms` of audio is buffered; from then on the resampling ratio leans
    toward keeping that fill (drift correction, capped at MAX_DRIFT_CORRECTION)."""

    def __init__(self, sample_rate: int, stream: int = 0, device=None, blocksize: int = 256, target_ms: float = 40.0,
                 capacity_seconds: float = 2.0, gain: float = 0.02):
        import sounddevice as sd

        info = sd.query_devices(device, "output")
        self.device_rate = int(info["default_samplerate"])
        self.stream_id, self.gain = stream, gain
        self.ratio = self.device_rate / sample_rate
        self.target = int(target_ms / 1e3 * self.device_rate)
        self.ring = AudioRing(int(capacity_seconds * self.device_rate))
        self.resampler = Resampler()
        self.correction = 0.0
        self.output = sd.OutputStream(samplerate=self.device_rate, blocksize=blocksize, channels=2, dtype="float32",
                                      device=device, callback=self._callback)
        self.playing = False

    def _callback(self, outdata, frames, time, status) -> None:  # the audio thread: copy only
        self.ring.read_into(outdata)

    def __call__(self, stream: int, t_ns: int, pcm: np.ndarray) -> None:
        if stream != self.stream_id:
            return
        if self.playing:  # fuller than the target: the device is slower than the producer, shrink the output
            error = (self.ring.available - self.target) / max(self.target, 1)
            self.correction = float(np.clip(-self.gain * error, -MAX_DRIFT_CORRECTION, MAX_DRIFT_CORRECTION))
        self.ring.write(self.resampler.process(pcm, self.ratio * (1 + self.correction)))
        if not self.playing and self.ring.available >= self.target:
            self.output.start()
            self.playing = True

    def stats(self) -> dict:
        return {"device_rate": self.device_rate, "buffered_ms": self.ring.available / self.device_rate * 1e3,
                "underflows": self.ring.underflows, "missing_samples": self.ring.missing,
                "overflows": self.ring.overflows, "drift_correction": self.correction}

    def close(self) -> None:
        self.output.stop()
        self.output.close()
