"""Headphones through PortAudio (sounddevice), with a resampler that also absorbs clock drift.

The model speaks 16 kHz; sound cards run at 44.1/48 kHz on their own crystal, which drifts against the
producer's clock. `Resampler` converts at ratio device_rate / 16000 * (1 + correction), a band-limited
(Kaiser-windowed sinc) interpolator with its input history as state, so blocks join seamlessly.
`HeadphoneSink` feeds a preallocated ring that python-rtmixer's C callback plays: the audio thread
never takes the GIL (a Python callback waiting for it behind the runtime's threads made the JACK
dummy device skip cycles: 536 in 30 s against 0 for the C callback, measured side by side). The
correction is a PI loop on the audio still buffered when each hop arrives, capped at +-0.5% (NetEq's
accelerate/decelerate), so the latency stays at its target.
"""
from __future__ import annotations

import functools
import threading
import time as _time
from collections import deque
from dataclasses import dataclass

import numpy as np


MAX_DRIFT_CORRECTION = 0.005
# Drift correction is a PI loop on the median slack of the last ARRIVAL_WINDOW hops: a late hop is an
# outlier, not the level. The proportional gain is correction per second of slack error (5 ms off
# reaches the cap; time constant 1 s: at 0.5, 2 s, the integral charged during a 25 ms step still held
# the level ~2 ms over the margin 11 s later, in a simulation of the loop); the integral learns the
# clocks' drift, which a proportional term alone keeps as a standing error of drift / DRIFT_GAIN.
ARRIVAL_WINDOW = 9
DRIFT_GAIN = 1.0
DRIFT_INTEGRAL_SECONDS = 4.0
# The device takes the ring in whole periods, so ring.read_available steps by a period (5.3 ms at 256
# frames) and, read when a hop arrives (80 ms hops are 15 periods), sits on one phase of that step. The
# sink follows the device's reads instead: frames taken minus monotonic time * rate, at its maximum over
# the feeder's last READ_LINE_POLLS polls (>= 160 ms, 30 periods), is the line the callbacks run on. A
# window, not a running maximum: a callback early once (as at the start of a playback) then lifted the
# line a period for seconds, and with it every reading. The clock is time.monotonic (the runtime's and
# the producers'), not PortAudio's stream time: on JACK that is jack_frame_time, which JACK's
# delay-locked loop filters, and after the server stalled 100 ms it slid ~100 ms over 1.5 s while the
# device's reads stepped by 100 ms at once (measured); so the stream time only dates a playback's start.
READ_LINE_POLLS = 64
# Where each ring frame reached the DAC: playbacks give the DAC time of their first frame, but a device
# that skips or catches up cycles (a JACK xrun) moves the rest (by 44 ms after 23 xruns in a minute,
# measured). So the feeder logs every poll (frames taken, its lead, the stretch of polls between xruns)
# and a frame plays at the read line of the polls around the one that saw it taken (LINE_HALF_WINDOW
# each side, in the same stretch), plus the device's read-to-DAC delay, measured once SETTLED_POLLS of
# a stretch have settled the line before any xrun or stall (STALL_PERIODS) of a playback. (Anchors on
# the line every 50 ms did that while xruns were rare; in a storm of xruns no stretch lasted long
# enough for one, and a soak's frames were dated from anchors a second old: video-to-sound read
# -100 ms.) A stretch of few polls dates its frames late, never early: a poll's lead is at most the
# line.
LINE_HALF_WINDOW = READ_LINE_POLLS // 2
SETTLED_POLLS = 8
# A device that stopped taking the ring (its server or the whole VM descheduled) takes it late after:
# its polls' leads fall below the line by the stall. Only PortAudio's xrun flag started a new stretch,
# and on JACK it came 5-240 ms after the device resumed; frames taken meanwhile were dated on the line
# before the stall (measured: the server and our process stopped 180 ms together, as a host's steal
# does: the hops sent as they resumed read 156-174 ms early in 5 runs of 5; 1 of 5 with this, where
# the feeder had not polled yet). So a poll that sees the device take frames with a lead more than
# STALL_PERIODS periods below the line starts a new stretch itself: between callbacks a lead falls at
# most a period below the line (99% of polls within 1.3 periods on the loaded test machine).
STALL_PERIODS = 2
POLL_SECONDS = 5e-4  # a poll that took longer to read the clock and the ring is not logged
# Latency the sink lets grow past its settled level before it drops audio: after the ring ran dry
# (a late hop), a gap up to this long is kept as latency, so the hops after it have their slack
# back, and drift correction takes it back at <= MAX_DRIFT_CORRECTION (NetEq: expand, then
# accelerate); dropping it all at once left the next hops as late as the first, one underrun per
# hop while compute stayed slow. Longer gaps and backlogs (a stalled device, a producer stall) are
# dropped down to it.
MAX_EXCESS_SECONDS = 0.04
# Latency kept that way, and a device's xruns (each leaves a period more buffered), drift correction
# gives back at <= 0.5% (8 s for 40 ms): on a VM whose host steals CPU time that kept 5-10% of a soak's
# frames 15-40 ms late. Once the hops have found at least half the margin buffered for CALM_SECONDS
# (compute keeps up again), a level more than RECOVER_ABOVE_SECONDS over the margin is dropped at
# once, crossfaded. (3-minute runs rotating the builds, 40 ms hops: video-to-sound p95 113-115 ms at
# 1 s, 113-140 at 2 s, 115-148 with drift correction alone; steal differed from run to run.)
CALM_SECONDS = 1.0
RECOVER_ABOVE_SECONDS = 0.01
# Every drop crossfades this many model samples (5 ms, raised cosine) from the audio it cuts to the
# audio after it: a hard cut in a tone clicks (a jump up to twice its amplitude).
FADE_SAMPLES = 80
# A hop later than the audio buffered: rather than let the ring run dry (the device plays silence and
# playback restarts a margin later), the feeder conceals the wait with NetEq's expand (Expander), from
# when the ring holds less than CONCEAL_PERIODS device periods and one feeder poll with nothing queued
# (the device takes a period per callback, and the feeder may wake a poll late), for at most
# MAX_CONCEAL_SECONDS; then it has faded out and the ring runs dry (a gap, counted as an underflow).
# The time concealed becomes latency, kept and given back as a kept gap is (MAX_EXCESS_SECONDS).
CONCEAL_PERIODS = 2
MAX_CONCEAL_SECONDS = MAX_EXCESS_SECONDS
EXPAND_LAG_SECONDS = (0.0025, 0.02)  # pitch periods searched: 50-400 Hz
EXPAND_MIN_CORRELATION = 0.5  # below it the audio has no period (noise): repeat the longest lag
FEED_SECONDS = 0.0025  # the feeder tops the ring up this often
TAPS = 32  # taps of the sinc kernel (half on each side), in input samples
KERNEL_PHASES = 512  # table rows per input sample; interpolating between rows errs by ~3e-6 of full scale


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


def _lines_at(reads: np.ndarray, polls: np.ndarray) -> np.ndarray:
    """The read line (frames taken - monotonic time * rate, HeadphoneSink.reads) at each of `polls`: the
    largest lead within LINE_HALF_WINDOW polls of it in its stretch (chunked: 65 leads per poll)."""
    lines, offsets = np.empty(len(polls)), np.arange(-LINE_HALF_WINDOW, LINE_HALF_WINDOW + 1)
    for start in range(0, len(polls), 8192):
        at = polls[start:start + 8192]
        near = np.clip(at[:, None] + offsets, 0, len(reads) - 1)
        same = reads[near, 2] == reads[at, 2][:, None]
        lines[start:start + 8192] = np.where(same, reads[near, 1], -np.inf).max(axis=1)
    return lines


def sinc_read(x: np.ndarray, t: np.ndarray, half: int, beta: float = 8.0, cutoff: float = 1.0) -> np.ndarray:
    """Band-limited values of x (n, channels) at fractional sample positions t (m,): Kaiser-windowed sinc
    over the `half` samples on each side (the caller keeps half samples of margin). The kernel comes from
    a table over KERNEL_PHASES fractional offsets, linearly interpolated (as libsamplerate and the speex
    resampler do): evaluating the Kaiser window per sample cost the feeder thread ~1.2 ms per 5 ms block."""
    floor = np.floor(t)
    phase = (t - floor) * KERNEL_PHASES
    row = np.minimum(phase.astype(int), KERNEL_PHASES - 1)
    between = (phase - row)[:, None]
    table = _kernel_table(half, beta, round(cutoff, 4))
    weights = table[row] * (1 - between) + table[row + 1] * between
    idx = floor.astype(int)[:, None] + np.arange(-half + 1, half + 1)[None, :]
    return np.einsum("nk,nkc->nc", weights, x[idx]).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _kernel_table(half: int, beta: float, cutoff: float) -> np.ndarray:
    """(KERNEL_PHASES + 1, 2 half): the kernel at distances p / KERNEL_PHASES - k, k = -half + 1 .. half."""
    dist = np.arange(KERNEL_PHASES + 1)[:, None] / KERNEL_PHASES - np.arange(-half + 1, half + 1)[None, :]
    return cutoff * np.sinc(cutoff * dist) * _kaiser(dist / half, beta)


def _kaiser(u: np.ndarray, beta: float) -> np.ndarray:
    """Kaiser window at positions u in [-1, 1] (0 outside)."""
    inside = np.abs(u) < 1
    return np.where(inside, np.i0(beta * np.sqrt(np.clip(1 - u * u, 0, 1))) / np.i0(beta), 0.0)


def _rise(n: int) -> np.ndarray:
    """A raised-cosine ramp from 0 to 1 over n samples, (n, 1) float32: every crossfade's weights."""
    return (0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)).astype(np.float32)[:, None]


class Expander:
    """NetEq's expand for binaural audio: continue what was played last by repeating its last pitch
    period (the lag of highest normalised autocorrelation over both ears, EXPAND_LAG_SECONDS), one lag
    for both ears so that their ITD and ILD carry on. A concealment ends on a period boundary, where
    the repeated period is in phase with the audio it stood in for (NetEq's merge aligns likewise):
    there the late audio is crossfaded in (FADE_SAMPLES); it lasts whole periods, at most
    MAX_CONCEAL_SECONDS, and fades out to silence when no audio came by then."""

    def __init__(self, sample_rate: int, channels: int = 2):
        self.min_lag, self.max_lag = (int(round(s * sample_rate)) for s in EXPAND_LAG_SECONDS)
        self.max_samples = int(MAX_CONCEAL_SECONDS * sample_rate)
        self.recent = np.zeros((2 * self.max_lag, channels), np.float32)  # the last audio played
        self.period: np.ndarray | None = None  # the period being repeated; None when not concealing
        self.position = 0  # samples concealed so far
        self.limit = 0  # whole periods, at most max_samples
        self.faded = False  # faded out (the ring runs dry): the audio after the gap fades in

    @property
    def active(self) -> bool:
        return self.period is not None

    def remember(self, pcm: np.ndarray) -> None:
        n = min(len(pcm), len(self.recent))
        self.recent[:-n] = self.recent[n:]
        self.recent[-n:] = pcm[-n:]

    def best_lag(self) -> int:
        """The lag whose shift of the last max_lag samples matches them best (normalised correlation
        summed over the ears); max_lag where none reaches EXPAND_MIN_CORRELATION."""
        window = self.max_lag
        target = self.recent[-window:].astype(np.float64)
        lags = np.arange(self.min_lag, self.max_lag + 1)
        starts = len(self.recent) - window - lags
        shifted = np.lib.stride_tricks.sliding_window_view(self.recent.astype(np.float64), window, axis=0)[starts]
        dots = np.einsum("lcw,wc->l", shifted, target)
        energy = np.einsum("lcw,lcw->l", shifted, shifted) * float(np.sum(target * target))
        score = dots / np.sqrt(np.maximum(energy, 1e-20))
        best = int(np.argmax(score))
        return int(lags[best]) if score[best] >= EXPAND_MIN_CORRELATION else self.max_lag

    def start(self) -> None:
        lag = self.best_lag()
        self.period, self.position, self.faded = self.recent[-lag:].copy(), 0, False
        self.limit = max(1, self.max_samples // lag) * lag

    def to_boundary(self) -> int:
        """Samples to conceal before the next period boundary (0: on one)."""
        return -self.position % len(self.period)

    def next(self, n: int, fade_out: bool = False) -> np.ndarray:
        """The next n samples of the repeated period; fade_out: falling to silence over them (the last
        before the ring runs dry); silence once faded."""
        at = self.position + np.arange(n)
        self.position += n
        if self.faded:
            return np.zeros((n, self.period.shape[1]), np.float32)
        pcm = self.period[at % len(self.period)]
        if fade_out:
            self.faded = True
            return pcm * (1 - _rise(n))
        return pcm

    def merge(self, pcm: np.ndarray) -> np.ndarray:
        """pcm, crossfaded from the concealment it ends (FADE_SAMPLES); pcm itself when none."""
        if self.period is None:
            return pcm
        k = min(FADE_SAMPLES, len(pcm))
        rise = _rise(k)
        pcm = pcm.copy()
        pcm[:k] = self.next(k) * (1 - rise) + pcm[:k] * rise
        self.period = None
        return pcm


@dataclass
class _Playback:
    """One rtmixer play action over the device ring: it stops when the ring runs dry (an underflow)
    and the sink starts another."""

    first: int  # the ring frame it plays first
    action: object  # rtmixer action; action.actual_time: DAC time of that frame (-1 until it starts)
    # PortAudio stream time - monotonic time, read as the feeder saw it start (a clock JACK's DLL moves
    # after xruns, slowly: read then, it dates action.actual_time on the monotonic clock)
    stream_offset: float | None = None


class HeadphoneSink:
    """One stream's audio to a PortAudio output device, corrected late for head rotation.

    Hops from the runtime queue up as they are generated (with the yaw each was generated for). A feeder
    thread moves 5 ms blocks from that queue into the device ring, which it keeps `device_ms` full:
    each block is re-spatialised for the newest head yaw (LateRotation), resampled to the device rate
    and written. So a head turn reaches the ears in about device_ms + the device's own buffer, not a
    whole hop plus the prebuffer. Playback starts `margin_ms` after the first hop arrived; from then on
    drift correction moves the level until the hops find `margin_ms` still buffered as they arrive
    (median): the slack for a hop's compute or frames to come late, the same whatever the first hop
    happened to cost. A hop later than that is waited for with concealment (Expander, `_conceal`): the
    ring runs dry only when the wait outlasts MAX_CONCEAL_SECONDS. Then playback restarts `margin_ms`
    after audio is back (prebuffered again), up to MAX_EXCESS_SECONDS of the silence played becomes
    latency, and the rest of the audio it stood for is dropped (NetEq: expand, then accelerate); the
    latency kept, concealed or silent, is dropped too once the hops have come on time for CALM_SECONDS.
    Every drop is crossfaded (FADE_SAMPLES). The device callback is rtmixer's, in C: it copies from the
    ring and nothing else."""

    # margin_ms: on the 2-core Xeon a 40 ms hop computes in p50 ~20 / p99 25-37 ms, and the runtime waits
    # for late frames until compute p95 + 10 ms before the output would run dry, so 28 ms leaves ~15 ms
    # for frame jitter; video-to-sound grows ms for ms with it (p95 107-117 ms there, target 120)
    def __init__(self, sample_rate: int, stream: int = 0, device=None, blocksize: int = 256, margin_ms: float = 28.0,
                 device_ms: float = 25.0, late_rotation: bool = True, capacity_seconds: float = 2.0,
                 capture_seconds: float = 0.0):
        try:
            import rtmixer
            import sounddevice as sd
        except (ImportError, OSError) as exc:  # no PortAudio library
            raise OSError(f"PortAudio playback is unavailable: {exc}") from exc

        from realtime.reproject import LateRotation

        try:
            info = sd.query_devices(device, "output")
        except sd.PortAudioError as exc:  # (not an OSError) e.g. PortAudio without any output device
            raise OSError(f"no PortAudio output device {device if device is not None else '(default)'}: {exc}") from exc
        self.portaudio_error = sd.PortAudioError
        self.sample_rate, self.device_rate = sample_rate, int(info["default_samplerate"])
        self.stream_id, self.ratio = stream, self.device_rate / sample_rate
        self.margin = margin_ms / 1e3
        self.first_audio: float | None = None  # monotonic time the first hop arrived
        self.started_at: float | None = None
        self.output_latency = 0.0
        self.arrival_slack: deque = deque(maxlen=ARRIVAL_WINDOW)  # seconds still buffered as the last hops arrived
        self.calm_since = _time.monotonic()  # since then no hop found less than half the margin, no ring ran dry
        self.device_target = int(device_ms / 1e3 * self.device_rate)
        frames = 1 << int(np.ceil(np.log2(capacity_seconds * self.device_rate)))  # PortAudio rings: 2^k
        self.ring = rtmixer.RingBuffer(8, frames)  # float32 stereo frames
        self.written = 0  # frames ever written into the ring (feeder thread)
        self.underflows = 0  # times the ring ran dry under the callback (it plays silence until restarted)
        self.concealments = 0  # times the feeder concealed a late hop (Expander) instead
        self.concealed = 0  # model samples of that concealment
        self.missing = 0  # device frames of that silence
        self.overflows = 0  # blocks refused for lack of room
        self.playbacks: list[_Playback] = []
        self.period = blocksize  # device frames per callback
        self.leads: deque = deque(maxlen=READ_LINE_POLLS)  # frames taken - monotonic time * device rate, per poll
        self.read_line: float | None = None  # their maximum
        self.xruns_seen = 0  # the current playback's device underflows when the line was last reset
        self.read_to_dac: float | None = None  # seconds from the callback taking a frame to its DAC time
        self.stalls = 0  # times the device took the ring STALL_PERIODS late with no xrun flagged
        self.stalls_at_start = 0  # self.stalls at the newest playback's first logged poll
        self.dated_cleanly = False  # read_to_dac came from a playback with no xrun or stall before it
        # per poll: frames taken, their lead, the stretch (a new one after each xrun), the playback;
        # sized for capture_seconds of polls (<= 400 per second), else the newest half is kept when full
        self.reads = np.zeros((int(capture_seconds * 500) + 4 * READ_LINE_POLLS, 4))
        self.read_count = 0
        self.stretch = 0
        self.gap_from: float | None = None  # DAC time the last playback ran dry, until the next one starts
        self.restarted = False  # a new playback was queued after running dry (once the ring refilled)
        self.refilled_at: float | None = None  # monotonic time the ring refilled after running dry
        self.resampler = Resampler()
        self.expander = Expander(sample_rate)
        self.conceal_below = min(CONCEAL_PERIODS * blocksize + int(FEED_SECONDS * self.device_rate),
                                 self.device_target)  # ring frames
        self.rotation = LateRotation(sample_rate) if late_rotation else None
        self.block = sample_rate // 200
        self.queue: deque = deque()  # (pcm (n, 2), generation yaw (n,) or None), appended by the runtime
        self.head: tuple | None = None  # the block being consumed, and how far
        self.queued = 0  # samples appended (runtime thread)
        self.last_hop = 0.0  # seconds of audio in the last hop
        self.taken = 0  # samples taken (feeder thread)
        self.level_lock = threading.Lock()
        self.yaw_now: float | None = None
        self.correction = self.drift_integral = 0.0
        self.skipped = 0  # missing device frames already handled (kept as latency or dropped)
        self.dropped = 0  # model samples dropped after underflows, device stalls and backlogs (latency kept)
        self.drops = 0  # times audio was dropped (each a crossfaded seam)
        # for `visaudio bench latency`: what went into the ring (ring frame k plays at device_time(k)),
        # and (first model sample, ring frame) of every 5 ms block; preallocated, pages touched now
        self.capture = np.ones((int(capture_seconds * self.device_rate), 2), np.float32)
        self.block_log = np.zeros((int(capture_seconds * 200) + 1, 2), np.int64)
        self.logged = 0
        self.output = rtmixer.Mixer(device=device, channels=2, blocksize=blocksize, samplerate=self.device_rate)
        self.playing = False
        self.stopping = threading.Event()
        self.feeder = threading.Thread(target=self._feed_loop, name="headphones-feeder", daemon=True)
        self.feeder.start()

    def __call__(self, stream: int, t_ns: int, pcm: np.ndarray, yaw: np.ndarray | None = None) -> None:
        if stream != self.stream_id:
            return
        per_sample = None
        if yaw is not None:  # latent j of the hop is centred at sample (j + 1) * vae_hop of this output
            centres = (np.arange(len(yaw)) + 1) * (len(pcm) / len(yaw))
            per_sample = np.interp(np.arange(len(pcm)), centres, yaw)
        if self.playing and self.gap_from is None:  # (not while the ring is dry and refilling)
            self._hold_level(self.slack())
        self.queue.append((pcm, per_sample))
        self.queued += len(pcm)
        self.last_hop = len(pcm) / self.sample_rate
        if self.first_audio is None:
            self.first_audio = _time.monotonic()

    def on_pose(self, stream: int, yaw: float) -> None:
        if stream == self.stream_id:
            self.yaw_now = float(yaw)

    @property
    def consumed(self) -> int:
        """Ring frames the device has taken."""
        return self.written - self.ring.read_available

    @property
    def device_underflows(self) -> int:
        """Callbacks PortAudio flagged output_underflow: the device played a gap because the callback
        itself ran late (e.g. a JACK xrun)."""
        return sum(p.action.stats.output_underflows for p in self.playbacks)

    def device_time(self, frame: np.ndarray) -> np.ndarray:
        """DAC time (time.monotonic) at which ring frame(s) `frame` played: on the read line where the
        polls saw it taken (LINE_HALF_WINDOW), or on the newest line where none has yet; from its
        playback's start where no poll of that playback has settled a line."""
        frame = np.asarray(frame)
        played, which = self._dated_from_start(frame)
        if played is None:
            return np.full(np.shape(frame), np.nan)
        reads = self.reads[:self.read_count]
        if self.read_to_dac is None or not len(reads):
            return played
        seen = np.minimum(np.searchsorted(reads[:, 0], frame, side="right"), len(reads) - 1)
        # a frame its playback played out after its last logged poll (the ring ran dry): on that poll's line
        seen = np.where((reads[seen, 3] != which) & (reads[np.maximum(seen - 1, 0), 3] == which), seen - 1, seen)
        lined = (frame - _lines_at(reads, seen.ravel()).reshape(seen.shape)) / self.device_rate + self.read_to_dac
        return np.where(reads[seen, 3] == which, lined, played)

    def _dated_from_start(self, frame: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """DAC time of ring frame(s) from the start of the playback that played them (its first frame's
        DAC time + frames since / rate), and that playback; (None, None) before any playback started."""
        started = [p for p in self.playbacks if p.stream_offset is not None]
        if not started:
            return None, None
        firsts = np.array([p.first for p in started])
        which = np.clip(np.searchsorted(firsts, frame, side="right") - 1, 0, len(started) - 1)
        origin = np.array([p.action.actual_time - p.stream_offset for p in started])
        return origin[which] + (frame - firsts[which]) / self.device_rate, which

    def _take(self, n: int):
        """The next n queued samples (and their generation yaw); the caller counts them in `taken`."""
        if self.queued - self.taken < n:
            return None
        pcm, yaw, need = [], [], n
        while need:
            if self.head is None:
                self.head = (*self.queue.popleft(), 0)
            block, block_yaw, at = self.head
            k = min(need, len(block) - at)
            pcm.append(block[at:at + k])
            yaw.append(None if block_yaw is None else block_yaw[at:at + k])
            self.head = (block, block_yaw, at + k) if at + k < len(block) else None
            need -= k
        yaws = None if any(y is None for y in yaw) else np.concatenate(yaw)
        return np.concatenate(pcm), yaws

    def _recoverable(self) -> int:
        """Model samples of kept latency to give back now (CALM_SECONDS, RECOVER_ABOVE_SECONDS)."""
        if self.gap_from is not None or _time.monotonic() < self.calm_since + CALM_SECONDS:
            return 0
        found = list(self.arrival_slack)  # (a copy: the runtime thread appends to it)
        if len(found) < ARRIVAL_WINDOW:
            return 0
        excess = float(np.median(found)) - self.margin
        if excess <= RECOVER_ABOVE_SECONDS:
            return 0
        self.arrival_slack.clear()  # (they read the level before the drop)
        return int(excess * self.sample_rate)

    def _drop(self, n: int) -> None:
        """Drop the next n queued samples, crossfading FADE_SAMPLES of the audio cut into the audio after
        it (the first samples still to play); the caller keeps n <= what is queued."""
        fade = min(FADE_SAMPLES, self.queued - self.taken - n)
        pcm, yaw = self._take(n + max(fade, 0))
        if fade > 0:
            rise = _rise(fade)
            blend = pcm[:fade] * (1 - rise) + pcm[n:] * rise
            if self.head is not None:  # what is left of the block being consumed plays after the blend
                block, block_yaw, at = self.head
                self.queue.appendleft((block[at:], None if block_yaw is None else block_yaw[at:]))
            self.head = (blend, None if yaw is None else yaw[n:], 0)
        with self.level_lock:
            self.taken += n
        self.dropped += n
        self.drops += 1

    def _write(self, block: np.ndarray) -> None:
        n = len(block)
        if n > self.ring.write_available:
            self.overflows += 1
            return
        if self.written + n <= len(self.capture):
            self.capture[self.written:self.written + n] = block
        self.ring.write(block)
        self.written += n

    def _play(self) -> None:
        self.playbacks.append(_Playback(self.consumed, self.output.play_ringbuffer(self.ring)))

    def _date_start(self) -> None:
        """Read the stream clock's offset as the newest playback is seen started (_Playback.stream_offset)."""
        last = self.playbacks[-1]
        if last.stream_offset is None and last.action.actual_time >= 0:
            try:
                last.stream_offset = self.output.time - _time.monotonic()
            except self.portaudio_error:  # a host API without a stream clock
                last.stream_offset = 0.0

    def _track_reads(self) -> None:
        """Follow the line on which the device's callbacks take the ring (READ_LINE_POLLS); start it
        again when the device stopped taking it on time (ran dry, a new playback not yet begun, an xrun)."""
        last = self.playbacks[-1]
        xruns = last.action.stats.output_underflows  # (this playback's alone: the sum grows with them)
        if self.gap_from is not None or last.stream_offset is None or xruns != self.xruns_seen:
            self._new_stretch()
            self.xruns_seen = xruns
            return
        before, consumed, after = _time.monotonic(), self.consumed, _time.monotonic()
        if after - before > POLL_SECONDS:  # descheduled while reading: a lead off by up to that
            return
        lead = consumed - (before + after) / 2 * self.device_rate
        took = self.read_count == 0 or consumed != self.reads[self.read_count - 1, 0]
        if took and self.read_line is not None and lead < self.read_line - STALL_PERIODS * self.period:
            self.stalls += 1  # (counted as it resumes: while stopped, the leads fall and the line stays)
            self._new_stretch()
        playback = len(self.playbacks) - 1
        if self.read_count == 0 or self.reads[self.read_count - 1, 3] != playback:
            self.stalls_at_start = self.stalls
        self.leads.append(lead)
        self.read_line = max(self.leads)
        if self.read_count == len(self.reads):  # (not when capturing: sized for it)
            half = len(self.reads) // 2
            self.reads[:half] = self.reads[-half:]
            self.read_count = half
        self.reads[self.read_count] = consumed, lead, self.stretch, playback
        self.read_count += 1
        clean = xruns == 0 and self.stalls == self.stalls_at_start
        if len(self.leads) >= SETTLED_POLLS and (self.read_to_dac is None or clean and not self.dated_cleanly):
            # from the playback's start, at once: after an xrun or a stall the device takes its frames
            # later than the start foretold, for good, and on a loaded host the first xrun comes early.
            # Where one came first, measured anyway (dated from the start alone, every later stall
            # would add to every frame's error) and again in the next playback that begins cleanly.
            taken_at = (consumed - self.read_line) / self.device_rate
            self.read_to_dac = float(self._dated_from_start(consumed)[0]) - taken_at
            self.dated_cleanly = clean

    def _new_stretch(self) -> None:
        """Forget the read line: the device stopped taking the ring on time (_track_reads)."""
        if self.leads:
            self.stretch += 1
        self.leads.clear()
        self.read_line = None

    def _watch_playback(self) -> None:
        """Notice the ring running dry under the callback (rtmixer then ends the playback and the device
        plays silence), and once a restarted playback has begun, count that silence."""
        last = self.playbacks[-1]
        if self.gap_from is None:
            if last.action not in self.output.actions:
                self.underflows += 1
                self.calm_since = _time.monotonic()
                self.gap_from = float(self.device_time(self.consumed))
        elif self.restarted and last.stream_offset is not None:
            began = last.action.actual_time - last.stream_offset
            self.missing += int(round((began - self.gap_from) * self.device_rate))
            self.gap_from, self.restarted = None, False

    def feed(self) -> None:
        """Top the device ring up to device_ms, 5 ms at a time (the feeder thread calls this)."""
        if self.playing:
            self._date_start()
            self._watch_playback()
            self._track_reads()
        lost = 0
        if self.missing > self.skipped:  # the device played silence: drop what exceeds MAX_EXCESS_SECONDS of
            # it, but not the last `margin` queued (hops that did not catch up after a stall: dropping them
            # left the next hop a ring run dry again)
            gap = (self.missing - self.skipped) / self.device_rate
            lost = min(int(max(0.0, gap - MAX_EXCESS_SECONDS) * self.sample_rate),
                       self.queued - self.taken - int(self.margin * self.sample_rate))
            self.skipped = self.missing
        elif self.playing and self.gap_from is None:  # a backlog (the device stalled, a burst of hops) is
            # latency: drop it down to MAX_EXCESS_SECONDS above the top of the level's sawtooth, margin + a
            # hop (just after a hop arrived; measuring from the sawtooth's mean dropped audio after every
            # 80 ms hop). Not while the ring is dry: the hops a stalled producer sends at once to catch up
            # are the gap's audio, which the rule above drops once the gap is known (both left the next
            # hop 3 ms buffered of a 40 ms margin)
            excess = self.slack() - self.margin - self.last_hop
            backlog = int(max(0.0, excess - MAX_EXCESS_SECONDS) * self.sample_rate)
            lost = max(backlog, self._recoverable())  # (two measures of one excess: never both)
        lost = min(lost, self.queued - self.taken)
        if lost > 0:
            self._drop(lost)
        while self.ring.read_available < self.device_target:
            if self._conceal():
                if self.ring.read_available >= self.conceal_below:
                    break
                continue
            taken = self._take(self.block)
            if taken is None:
                break
            pcm, yaw = taken
            if self.logged < len(self.block_log):
                self.block_log[self.logged] = self.taken, self.written
                self.logged += 1
            if self.rotation is not None:
                change = 0.0 if yaw is None or self.yaw_now is None else \
                    (self.yaw_now - float(yaw.mean()) + 180.0) % 360.0 - 180.0
                pcm = self.rotation.process(pcm, change)
            self._send(self.expander.merge(pcm), len(pcm))
        full = self.ring.read_available >= self.device_target
        if self.gap_from is not None and not self.restarted and full:
            # after running dry, prebuffer `margin` again as at the start: restarting the moment audio is
            # back left no slack, so a run of late hops ran dry on every one of them
            self.refilled_at = self.refilled_at or _time.monotonic()
            if _time.monotonic() >= self.refilled_at + self.margin:
                self._play()
                self.restarted, self.refilled_at = True, None
        if not self.playing and self.first_audio is not None and full and \
                _time.monotonic() >= self.first_audio + self.margin:
            self.output.start()
            self._play()
            self.playing, self.started_at = True, _time.monotonic()
            self.output_latency = float(self.output.latency)  # the device's own buffering, seconds

    def _conceal(self) -> bool:
        """Write the concealment (Expander) the ring needs now; False when the queue plays instead.

        A concealment starts when the ring is low (conceal_below) with nothing queued, and goes on after
        the late hop came until the level is back at margin + a hop (where the hops find the margin as
        they arrive; a restart after running dry prebuffers the margin likewise: merging the moment audio
        was back left the next hops ~12 ms of slack) or its whole periods are spent; it ends on a period
        boundary. Spent with nothing queued, it fades out and the ring runs dry (an underflow)."""
        expander, queued, ring = self.expander, self.queued - self.taken, self.ring.read_available
        if not expander.active:
            if not self.playing or self.gap_from is not None or queued >= self.block or ring >= self.conceal_below:
                return False
            expander.start()
            self.concealments += 1
            self.calm_since = _time.monotonic()
        if expander.faded:
            return False
        n = min(self.block, expander.limit - expander.position)
        rebuilt = ring / self.device_rate + queued / self.sample_rate >= self.margin + self.last_hop
        if queued >= self.block and (rebuilt or n == 0):
            n = min(n, expander.to_boundary())
            if n == 0:
                return False  # the queue's next block merges in phase
        if ring >= self.conceal_below:
            return True  # not yet
        pcm = expander.next(n) if n else expander.next(FADE_SAMPLES, fade_out=True)
        self.concealed += len(pcm)
        self._send(pcm, 0)
        return True

    def _send(self, pcm: np.ndarray, taken: int) -> None:
        """Resample pcm (model rate) into the ring; `taken`: how many queued samples it stands for."""
        self.expander.remember(pcm)
        block = self.resampler.process(pcm, self.ratio * (1 + self.correction))
        with self.level_lock:  # slack() finds the block queued or in the ring, never in neither
            self.taken += taken
            self._write(block)

    def _hold_level(self, found: float) -> None:
        """Drift correction (PI, anti-windup by conditional integration) from the slack a hop found.

        Sampling the level where each hop arrives sees the same phase of its sawtooth every time: a
        time-averaged level needed a 2 s filter against the sawtooth, whose lag overshot the target
        by ~9 ms for seconds after each move, and the mean sits above the arrivals by a hop-dependent
        half hop."""
        self.arrival_slack.append(found)
        if found < self.margin / 2:
            self.calm_since = _time.monotonic()
        error = float(np.median(self.arrival_slack)) - self.margin
        # fuller than the margin: the device is slower than the producer, so shrink the output a little
        wanted = -DRIFT_GAIN * (error + self.drift_integral)
        if abs(wanted) < MAX_DRIFT_CORRECTION:  # not at the cap (a kept gap would wind it up)
            self.drift_integral += error * self.last_hop / DRIFT_INTEGRAL_SECONDS
        self.correction = float(np.clip(wanted, -MAX_DRIFT_CORRECTION, MAX_DRIFT_CORRECTION))

    def _feed_loop(self) -> None:
        while not self.stopping.wait(FEED_SECONDS):
            self.feed()

    def slack(self) -> float | None:
        """Seconds of audio buffered (queue + ring) before the device runs dry; None before playback."""
        if not self.playing:
            return None
        with self.level_lock:
            line, ring, written, queued = self.read_line, self.ring.read_available, self.written, self.queued - self.taken
        if line is not None:  # less what the device played since its last callback
            ring = min(max(written - line - _time.monotonic() * self.device_rate, ring - self.period), ring)
        return ring / self.device_rate + queued / self.sample_rate

    def stats(self) -> dict:
        return {"device_rate": self.device_rate, "buffered_ms": self.ring.read_available / self.device_rate * 1e3,
                "queued_ms": (self.queued - self.taken) / self.sample_rate * 1e3, "underflows": self.underflows,
                "concealments": self.concealments, "concealed_samples": self.concealed,
                "device_underflows": self.device_underflows, "device_stalls": self.stalls, "missing_samples": self.missing,
                "dropped_samples": self.dropped, "drops": self.drops, "overflows": self.overflows,
                "drift_correction": self.correction}

    def close(self) -> None:
        self.stopping.set()
        self.feeder.join(timeout=1)
        self.output.stop()
        self.output.close()
