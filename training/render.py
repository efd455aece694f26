"""Scene renderer: binaural audio through a measured HRTF, the perspective video the head sees, pose, metadata.

Audio, per source and per propagation path (direct, plus six first-order image sources in a room):
  1. the dry mono sound, gated by its events (5 ms raised-cosine attack, 30 ms release);
  2. per ear, a time-varying fractional delay (propagation distance / c + the HRTF's onset delay for the
     current direction), read with a Kaiser-windowed sinc: ITD changes and Doppler are smooth;
  3. 1/r distance attenuation (reference 1 m, clamped at 0.25 m);
  4. the onset-aligned HRIR interpolated at block boundaries (4 ms), applied by overlap-save and
     crossfaded linearly across each block, which is exactly a filter whose taps move linearly in time:
     no clicks, no zipper noise.
The late reverb of a room is a diffuse field: independent exponentially decaying noises arriving from
DIFFUSE_DIRECTIONS directions spread evenly over the sphere, each through the HRTF of its direction, so
the two ears keep the measured head's diffuse-field coherence (coherent below ~500 Hz, incoherent
above ~1.5 kHz; Borss & Martin 2009). Its energy follows Sabine's critical distance.

Video: outdoors, sky, mountains and a checkered ground; in a room, its walls, floor and ceiling seen
from the listener's position, so the picture tells a generator when to expect reflections and reverb.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import signal

from engine.geometry import SPEED_OF_SOUND, PinholeCamera, head_rotation, to_spherical, unit_vector
from training.hrtf import HrtfSet, load_hrtf
from training.scene_spec import Room, SceneSpec, Source, interpolate_keyframes
from training.sounds import KINDS, REFERENCE_RMS, synthesize

BLOCK_SECONDS = 0.004  # HRIR update interval; a source at 90 deg/s moves 0.36 deg per block
SINC_HALF_TAPS = 8  # fractional delay interpolator: 16 taps, Kaiser beta 8
MIN_DISTANCE = 0.25  # m: 1/r attenuation is clamped here
ATTACK_SECONDS, RELEASE_SECONDS = 0.005, 0.030
FLASH_SECONDS = 0.12  # on-screen flash after an event onset
CAMERA_HEIGHT = 1.6  # m above the ground plane drawn in the video
TAIL_STREAM = 1_000_003  # the late tail's random stream of a scene's seed (plus render_audio's tail_draw)
SOUND_STREAM = 2_000_003  # a source's waveform stream for render_audio's sound_draw > 0 (draw 0: [seed, index])
DIFFUSE_DIRECTIONS = 256  # plane waves of the tail; from 64 to 256 no band's coherence moved by more than 0.07


@dataclass
class RenderedScene:
    spec: SceneSpec
    audio: np.ndarray  # (2, N) float32, channel 0 = left ear
    frames: np.ndarray  # (F, H, W, 3) uint8
    pose: np.ndarray  # (F, 4): t, yaw, pitch, roll at each frame time
    meta: dict

    def write(self, out_dir: Path | str) -> Path:
        """Write the clip folder (docs/FORMATS.md)."""
        from training.clips import write_clip

        return write_clip(out_dir, self.frames, self.spec.fps, self.audio, self.spec.sample_rate, self.pose, self.meta)


def headroom_gain(audio: np.ndarray, peak: float = 0.98) -> float:
    """Gain that brings the audio's peak down to `peak` full scale (1.0 if it is already below)."""
    top = float(np.max(np.abs(audio))) if audio.size else 0.0
    return min(1.0, peak / top) if top > 0 else 1.0


# ----------------------------------------------------------------------------------------------- sound


def _gate(n: int, sr: int, events) -> np.ndarray:
    """Amplitude envelope that is 1 inside events, with raised-cosine attack and release."""
    if events is None:
        return np.ones(n)
    env = np.zeros(n)
    attack, release = int(ATTACK_SECONDS * sr), int(RELEASE_SECONDS * sr)
    for ev in events:
        start, stop = int(round(ev.t * sr)), int(round((ev.t + ev.duration) * sr))
        stop = min(max(stop, start + attack), n)
        env[start:stop] = 1.0
        a = min(attack, stop - start)
        env[start:start + a] = 0.5 - 0.5 * np.cos(np.pi * np.arange(a) / attack)
        r = min(release, n - stop)
        env[stop:stop + r] = 0.5 + 0.5 * np.cos(np.pi * np.arange(r) / release)
    return env


def _user_sound(path: str, n: int, sr: int) -> np.ndarray:
    import soundfile as sf
    from math import gcd

    try:
        data, rate = sf.read(path, dtype="float64", always_2d=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: cannot read sound file ({exc})") from exc
    mono = data.mean(axis=1)
    if rate != sr:
        g = gcd(int(rate), sr)
        mono = signal.resample_poly(mono, sr // g, int(rate) // g)
    if not len(mono) or not np.any(mono):
        raise ValueError(f"{path}: sound file is empty or silent")
    mono = np.tile(mono, int(np.ceil(n / len(mono))))[:n]
    return mono * (REFERENCE_RMS / np.sqrt(np.mean(mono ** 2)))


def dry_signal(spec: SceneSpec, index: int, sound_draw: int = 0) -> np.ndarray:
    """A source's mono sound at 1 m, gated by its events, with its gain applied. sound_draw > 0 draws
    another waveform of the same kind, events and gain (another instance: what a picture cannot show)."""
    src = spec.sources[index]
    sr, n = spec.sample_rate, int(round(spec.duration * spec.sample_rate))
    rng = np.random.default_rng([spec.seed, index] + ([SOUND_STREAM + sound_draw] if sound_draw else []))
    if src.wav is not None:
        sound = _user_sound(src.wav, n, sr)
    elif src.events is None:
        sound = synthesize(src.kind, n, sr, rng)
    else:  # each event is its own instance of the sound (a strike, a sentence) starting at its onset
        sound = np.zeros(n)
        for ev in src.events:
            start = int(round(ev.t * sr))
            length = min(n - start, int(round((ev.duration + RELEASE_SECONDS) * sr)))
            sound[start:start + length] = synthesize(src.kind, length, sr, rng)
    return sound * _gate(n, sr, src.events) * 10 ** (src.gain_db / 20)


def _sinc_table(resolution: int = 512, beta: float = 8.0) -> np.ndarray:
    """Kaiser-windowed sinc taps for fractional positions 0..1 in `resolution` steps: (res + 1, 2K)."""
    k = np.arange(-SINC_HALF_TAPS + 1, SINC_HALF_TAPS + 1)
    x = k[None, :] - np.arange(resolution + 1)[:, None] / resolution
    window = np.i0(beta * np.sqrt(np.clip(1 - (x / SINC_HALF_TAPS) ** 2, 0, None))) / np.i0(beta)
    taps = np.sinc(x) * window
    return taps / taps.sum(axis=1, keepdims=True)


_SINC = _sinc_table()


def fractional_delay(x: np.ndarray, delay_samples: np.ndarray) -> np.ndarray:
    """y[n] = x(n - delay[n]) for a time-varying delay, band-limited interpolation; x is zero before 0."""
    n = len(x)
    pos = np.arange(n) - delay_samples
    base = np.floor(pos).astype(np.int64)
    frac_index = np.rint((pos - base) * (len(_SINC) - 1)).astype(np.int64)
    taps = _SINC[frac_index]  # (n, 2K)
    offsets = np.arange(-SINC_HALF_TAPS + 1, SINC_HALF_TAPS + 1)
    idx = base[:, None] + offsets[None, :]
    valid = (idx >= 0) & (idx < n)
    gathered = np.where(valid, x[np.clip(idx, 0, n - 1)], 0.0)
    return np.einsum("nk,nk->n", gathered, taps)


def time_varying_fir(x: np.ndarray, filters: np.ndarray, block: int) -> np.ndarray:
    """Filter x (..., N) with taps that move linearly from filters[k] to filters[k+1] over block k.

    filters: (K + 1, ..., L) with K = ceil(N / block). Overlap-save with both block-boundary filters,
    crossfaded sample by sample: y[n] = sum_j ((1 - w_n) a_j + w_n b_j) x[n - j].
    """
    n = x.shape[-1]
    taps = filters.shape[-1]
    k = -(-n // block)
    padded = np.concatenate([np.zeros(x.shape[:-1] + (taps - 1,)), x, np.zeros(x.shape[:-1] + (k * block - n,))], -1)
    seg_len = block + taps - 1
    starts = np.arange(k) * block
    segments = padded[..., starts[:, None] + np.arange(seg_len)[None, :]]  # (..., K, seg_len)
    segments = np.moveaxis(segments, -2, 0)  # (K, ..., seg_len)
    nfft = 1 << (seg_len - 1).bit_length()
    spec = np.fft.rfft(segments, nfft)
    first = np.fft.irfft(spec * np.fft.rfft(filters[:-1], nfft), nfft)[..., taps - 1:taps - 1 + block]
    second = np.fft.irfft(spec * np.fft.rfft(filters[1:], nfft), nfft)[..., taps - 1:taps - 1 + block]
    ramp = np.arange(block) / block
    y = first + (second - first) * ramp  # (K, ..., block)
    return np.moveaxis(y, 0, -2).reshape(x.shape[:-1] + (k * block,))[..., :n]


def head_track(spec: SceneSpec, times: np.ndarray) -> np.ndarray:
    """(T, 3) yaw, pitch, roll at the given times."""
    return np.stack(interpolate_keyframes(spec.head, ("yaw", "pitch", "roll"), times), -1)


def source_positions(src: Source, times: np.ndarray) -> np.ndarray:
    """World positions (T, 3) in metres relative to the listener."""
    az, el, dist = interpolate_keyframes(src.trajectory, ("azimuth", "elevation", "distance"), times)
    return unit_vector(az, el) * dist[:, None]


def image_sources(positions: np.ndarray, room: Room) -> list[tuple[np.ndarray, float]]:
    """First-order image sources of a shoebox: (positions relative to the listener, reflection gain)."""
    size, listener = np.array(room.size), np.array(room.listener)
    absolute = positions + listener
    volume = float(np.prod(size))
    surface = 2 * (size[0] * size[1] + size[0] * size[2] + size[1] * size[2])
    absorption = min(0.161 * volume / (surface * room.rt60), 0.99)  # Sabine
    gain = float(np.sqrt(1 - absorption))
    images = []
    for axis in range(3):
        for wall in (0.0, size[axis]):
            mirrored = absolute.copy()
            mirrored[:, axis] = 2 * wall - absolute[:, axis]
            images.append((mirrored - listener, gain))
    return images


def render_path(dry: np.ndarray, positions: np.ndarray, yaw_pitch_roll: np.ndarray,
                hrtf: HrtfSet, block: int, gain: float = 1.0) -> np.ndarray:
    """Binaural (2, N) of one propagation path; positions and pose are sampled at block boundaries."""
    sr = hrtf.sample_rate
    n = len(dry)
    rot = head_rotation(yaw_pitch_roll[:, 0], yaw_pitch_roll[:, 1], yaw_pitch_roll[:, 2])
    local = np.einsum("kji,kj->ki", rot, positions)
    az, el, dist = to_spherical(local)
    filters, onsets = hrtf.lookup(az, el)  # (K+1, 2, L), (K+1, 2)
    boundary_samples = np.arange(len(dist)) * block
    per_sample = np.arange(n)
    out = np.empty((2, n))
    for ear in range(2):
        delay = np.interp(per_sample, boundary_samples, (dist / SPEED_OF_SOUND + onsets[:, ear]) * sr)
        out[ear] = fractional_delay(dry, delay)
    amplitude = np.interp(per_sample, boundary_samples, gain / np.maximum(dist, MIN_DISTANCE))
    return time_varying_fir(out * amplitude, filters, block)


def sphere_directions(count: int) -> np.ndarray:
    """(count, 3) unit vectors spread evenly over the sphere (Fibonacci lattice)."""
    i = np.arange(count) + 0.5
    z = 1 - 2 * i / count
    phi = np.pi * (1 + 5 ** 0.5) * i
    r = np.sqrt(1 - z ** 2)
    return np.column_stack([r * np.cos(phi), r * np.sin(phi), z])


def late_reverb(dry_sum: np.ndarray, room: Room, hrtf: HrtfSet, rng: np.random.Generator) -> np.ndarray:
    """Diffuse tail through the HRTF from DIFFUSE_DIRECTIONS directions; its energy per ear equals the
    direct energy at Sabine's critical distance."""
    sr = hrtf.sample_rate
    volume = float(np.prod(room.size))
    critical = 0.057 * np.sqrt(volume / room.rt60)
    length = int(min(room.rt60 * 1.2, 3.0) * sr)
    t = np.arange(length) / sr
    start = 0.02  # mixing time: the first-order reflections are rendered explicitly before this
    envelope = np.exp(-6.91 * t / room.rt60) * np.clip((t - start) / 0.01, 0.0, 1.0)
    directions = sphere_directions(DIFFUSE_DIRECTIONS)
    az, el, _ = to_spherical(directions)
    filters, onsets = hrtf.lookup(az, el)  # (D, 2, L), (D, 2)
    delays = (onsets - onsets.min()) * sr
    span = int(np.ceil(delays.max())) + SINC_HALF_TAPS + filters.shape[-1]
    impulse = np.zeros(span)
    impulse[0] = 1.0
    responses = np.stack([[signal.fftconvolve(fractional_delay(impulse, np.full(span, delays[d, ear])),
                                              filters[d, ear])[:span] for ear in range(2)]
                          for d in range(len(directions))])  # (D, 2, span): HRIR with its onset
    noise = rng.normal(0, 1, (len(directions), 1, length)) * envelope
    tail = signal.fftconvolve(noise, responses, axes=-1).sum(axis=0)[:, :length]
    diffuse_gain = np.mean(np.sum(hrtf.filters ** 2, axis=-1), axis=0)  # diffuse-field HRTF energy per ear
    tail *= np.sqrt(diffuse_gain[:, None] / critical ** 2 / np.sum(tail ** 2, axis=-1, keepdims=True))
    return signal.fftconvolve(dry_sum[None, :], tail, axes=-1)[:, : len(dry_sum)]


def render_audio(spec: SceneSpec, hrtf: HrtfSet | None = None, tail_draw: int = 0, sound_draw: int = 0) -> np.ndarray:
    """Ground-truth binaural audio (2, N) float64 of a scene (before the mix gain); see
    render_audio_and_levels for tail_draw and sound_draw."""
    return render_audio_and_levels(spec, hrtf, tail_draw, sound_draw)[0]


def frame_levels_db(direct: np.ndarray, sample_rate: int, fps: float, count: int) -> np.ndarray:
    """Mean power over both ears in each video frame's interval, dB re full scale: (count,)."""
    edges = np.minimum(np.rint(np.arange(count + 1) * sample_rate / fps).astype(int), direct.shape[1])
    power = np.add.reduceat(np.sum(direct ** 2, axis=0), edges[:-1]) / np.maximum(np.diff(edges), 1) / 2
    return 10 * np.log10(np.maximum(power, 1e-20))


def render_audio_and_levels(spec: SceneSpec, hrtf: HrtfSet | None = None, tail_draw: int = 0,
                            sound_draw: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(binaural audio (2, N), each source's direct-sound level at the ears per video frame (S, F) dB).

    A room's late tail is random noise (a diffuse field); tail_draw picks its draw. Draw 0 is the
    scene's own; another draw is the same room, sources and reflections with a tail nobody could have
    predicted from the scene. sound_draw likewise picks the sources' waveforms (dry_signal): the same
    kinds, events and paths, other instances. `visaudio eval` scores such draws: the floor of any
    renderer's cue errors."""
    hrtf = hrtf or load_hrtf(spec.hrtf, spec.sample_rate)
    sr = spec.sample_rate
    n = int(round(spec.duration * sr))
    block = max(1, int(round(BLOCK_SECONDS * sr)))
    boundary_times = np.arange(-(-n // block) + 1) * block / sr
    pose = head_track(spec, boundary_times)
    frame_count = int(np.floor(spec.duration * spec.fps + 1e-9))
    out = np.zeros((2, n))
    levels = np.zeros((len(spec.sources), frame_count))
    dry_sum = np.zeros(n)
    for i, src in enumerate(spec.sources):
        dry = dry_signal(spec, i, sound_draw)
        positions = source_positions(src, boundary_times)
        direct = render_path(dry, positions, pose, hrtf, block)
        levels[i] = frame_levels_db(direct, sr, spec.fps, frame_count)
        out += direct
        if spec.room is not None:
            for image, gain in image_sources(positions, spec.room):
                out += render_path(dry, image, pose, hrtf, block, gain)
            dry_sum += dry
    if spec.room is not None:
        out += late_reverb(dry_sum, spec.room, hrtf, np.random.default_rng([spec.seed, TAIL_STREAM + tail_draw]))
    return out, levels


# ----------------------------------------------------------------------------------------------- video


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Pixels inside a unit-radius shape; dx right, dy down, in radii."""
    r = np.hypot(dx, dy)
    if shape == "circle":
        return r <= 1
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1
    if shape == "triangle":  # apex up, symmetric about dx = 0
        return (dy <= 0.75) & (dy >= -1) & (np.abs(dx) <= (dy + 1) * 0.5)
    if shape == "ring":
        return (r <= 1) & (r >= 0.55)
    if shape == "cross":
        return ((np.abs(dx) <= 0.3) & (np.abs(dy) <= 1)) | ((np.abs(dy) <= 0.3) & (np.abs(dx) <= 1))
    if shape == "ellipse":
        return (dx / 0.6) ** 2 + dy ** 2 <= 1
    if shape == "bar":
        return (np.abs(dx) <= 1) & (np.abs(dy) <= 0.45)
    raise ValueError(f"unknown shape {shape!r}")


def _horizon_profile(seed: int):
    """Mountain height (radians of elevation) as a smooth function of world azimuth."""
    rng = np.random.default_rng([seed, 7])
    k = np.arange(1, 7)
    amp, phase = rng.uniform(0.01, 0.05, 6) / k ** 0.5, rng.uniform(0, 2 * np.pi, 6)
    return lambda az: 0.06 + np.sum(amp * np.sin(np.multiply.outer(az, k) + phase), axis=-1)


def _background(world_rays: np.ndarray, mountains) -> np.ndarray:
    """Sky, mountains fixed to world azimuths, and a checkered ground plane with fog."""
    x, y, z = world_rays[..., 0], world_rays[..., 1], world_rays[..., 2]
    az, el = np.arctan2(y, x), np.arcsin(np.clip(z, -1, 1))
    sky = np.array([170, 200, 235.0]) + np.clip(el, 0, None)[..., None] * np.array([-110, -90, -30.0])
    img = sky
    mountain = (el > 0) & (el < mountains(az))
    img = np.where(mountain[..., None], np.array([110, 100, 130.0]) - 40 * el[..., None], img)
    ground = z < -1e-3
    scale = CAMERA_HEIGHT / np.where(ground, -z, 1.0)
    gx, gy = x * scale, y * scale
    checker = ((np.floor(gx) + np.floor(gy)) % 2)[..., None]
    ground_color = np.array([70, 140, 60.0]) + checker * np.array([30, 30, 20.0])
    fog = np.exp(-np.hypot(gx, gy) / 25.0)[..., None]
    ground_color = fog * ground_color + (1 - fog) * np.array([160, 180, 170.0])
    return np.where(ground[..., None], ground_color, img)


def _room_palette(seed: int) -> np.ndarray:
    """(6, 3) base colours of the faces x=0, x=X, y=0, y=Y (walls), z=0 (floor), z=Z (ceiling)."""
    rng = np.random.default_rng([seed, 11])
    walls = 150 + rng.uniform(0, 90, (4, 3))
    floor = np.array([130, 100, 70.0]) * rng.uniform(0.7, 1.2)
    return np.vstack([walls, floor, [228, 226, 218.0]])


def _room_interior(world_rays: np.ndarray, room: Room, palette: np.ndarray) -> np.ndarray:
    """The walls, floor and ceiling of a shoebox seen from the listener: each ray's first face hit.

    Tiled floor (0.5 m), wall panels 1 m wide above a skirting board, dark lines along the room's edges,
    light falling off with distance: the perspective shows the room's size and the head's turn in it.
    """
    size, origin = np.array(room.size), np.array(room.listener)
    with np.errstate(divide="ignore", invalid="ignore"):
        exits = np.where(world_rays > 0, (size - origin) / world_rays,
                         np.where(world_rays < 0, -origin / world_rays, np.inf))
    axis = np.argmin(exits, axis=-1)
    distance = np.take_along_axis(exits, axis[..., None], -1)
    hit = origin + distance * world_rays
    face = 2 * axis + (np.take_along_axis(world_rays, axis[..., None], -1)[..., 0] > 0)
    img = palette[face]
    x, y, z = hit[..., 0], hit[..., 1], hit[..., 2]
    floor, ceiling, wall = face == 4, face == 5, face < 4
    tile = (np.floor(x / 0.5) + np.floor(y / 0.5)) % 2
    img = np.where(floor[..., None], img * (0.85 + 0.15 * tile)[..., None], img)
    along = np.where(axis == 0, y, x)  # the horizontal coordinate along a wall
    line = 0.012 * distance[..., 0]  # about one pixel at this distance
    panel = np.abs(along - np.round(along)) < line
    img = np.where((wall & panel)[..., None], img * 0.8, img)
    img = np.where((wall & (z < 0.1))[..., None], np.array([70, 60, 55.0]), img)
    edge_gap = np.minimum(hit, size - hit)
    on_edge = np.sum(edge_gap < line[..., None], axis=-1) >= 2  # near a second face: a corner line
    img = np.where(on_edge[..., None], np.array([50, 45, 45.0]), img)
    shade = 0.7 + 0.3 * np.exp(-distance / 6.0)
    return img * shade * np.where(ceiling, 1.0, 0.95)[..., None]


def _event_state(src: Source, t: float) -> tuple[bool, float]:
    """(active, flash) of a source at time t; flash decays from 1 at each onset."""
    if src.events is None:
        return True, float(np.exp(-t / FLASH_SECONDS * 3)) if t < FLASH_SECONDS else 0.0
    for ev in src.events:
        if ev.t <= t < ev.t + ev.duration:
            since = t - ev.t
            return True, float(np.exp(-since / FLASH_SECONDS * 3)) if since < FLASH_SECONDS else 0.0
    return False, 0.0


def render_frames(spec: SceneSpec):
    """Video frames (F, H, W, 3) uint8, pose (F, 4) and per-frame metadata of a scene."""
    width, height = spec.frame_size
    camera = PinholeCamera(width, height, spec.fov)
    rays = camera.pixel_rays()
    count = int(np.floor(spec.duration * spec.fps + 1e-9))
    times = np.arange(count) / spec.fps
    ypr = head_track(spec, times)
    rotations = head_rotation(ypr[:, 0], ypr[:, 1], ypr[:, 2])
    positions = [source_positions(s, times) for s in spec.sources]
    mountains = _horizon_profile(spec.seed)
    palette = _room_palette(spec.seed)
    frames = np.empty((count, height, width, 3), np.uint8)
    per_frame = []
    rows, cols = np.arange(height) + 0.5, np.arange(width) + 0.5
    for f in range(count):
        rot = rotations[f]
        world_rays = rays @ rot.T
        img = (_background(world_rays, mountains) if spec.room is None
               else _room_interior(world_rays, spec.room, palette))
        states = []
        for i, src in enumerate(spec.sources):
            local = rot.T @ positions[i][f]
            az, el, dist = to_spherical(local)
            u, v, depth = camera.project(local)
            active, flash = _event_state(src, times[f])
            on_screen = bool(src.visible and depth > 0.05 and 0 <= u < width and 0 <= v < height)
            info = {"azimuth": round(float(az), 4), "elevation": round(float(el), 4),
                    "distance": round(float(dist), 4), "visible": on_screen, "active": active}
            if on_screen:
                info.update(u=round(float(u), 3), v=round(float(v), 3))
            states.append((float(depth), i, float(u), float(v), active, flash, info))
        # painter's algorithm: far sources first, so nearer ones occlude them
        for depth, i, u, v, active, flash, _ in sorted(states, key=lambda s: -s[0]):
            src = spec.sources[i]
            if not src.visible or depth <= 0.05:
                continue
            look = KINDS[src.kind].look
            radius = camera.focal * look.radius * (1.25 if active else 1.0) / depth
            c0, c1 = int(max(0, np.floor(u - radius))), int(min(width, np.ceil(u + radius) + 1))
            r0, r1 = int(max(0, np.floor(v - radius))), int(min(height, np.ceil(v + radius) + 1))
            if c0 >= c1 or r0 >= r1:
                continue
            dx = (cols[None, c0:c1] - u) / radius
            dy = (rows[r0:r1, None] - v) / radius
            mask = _shape_mask(look.shape, dx, dy)
            color = np.array(look.color, dtype=np.float64)
            color = color * (1.0 if active else 0.55) + (255 - color) * 0.85 * flash
            img[r0:r1, c0:c1][mask] = color
        frames[f] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        per_frame.append({
            "t": round(float(times[f]), 6),
            "head": {k: round(float(a), 4) for k, a in zip(("yaw", "pitch", "roll"), ypr[f])},
            "sources": [s[-1] for s in states],
        })
    pose = np.column_stack([times, ypr])
    return frames, pose, per_frame


def render_scene(spec: SceneSpec) -> RenderedScene:
    """Render everything a clip holds. Audio is scaled down only if it would clip (mix_gain in meta)."""
    audio, levels = render_audio_and_levels(spec)
    mix_gain = headroom_gain(audio)
    frames, pose, per_frame = render_frames(spec)
    levels += 20 * np.log10(mix_gain)
    for f, frame in enumerate(per_frame):
        for s, info in enumerate(frame["sources"]):
            info["level_db"] = round(float(levels[s, f]), 2)
    meta = {
        "format": "visaudio-clip/1",
        "scene": spec.to_json(),
        "mix_gain": mix_gain,
        "sample_rate": spec.sample_rate,
        "fps": spec.fps,
        "num_samples": audio.shape[1],
        "num_frames": len(frames),
        "frames": per_frame,
    }
    return RenderedScene(spec, (audio * mix_gain).astype(np.float32), frames, pose, meta)
