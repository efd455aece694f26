"""Random training scenes in the BiAudio manner (ViSAudio, arXiv 2512.03036, section on BiAudio).

BiAudio projects 360-degree video along a camera trajectory that starts near the loudest direction plus
a random offset and moves piecewise-linearly in yaw/pitch/roll with random drift. We do the same with
1-4 procedural sources of mixed kinds, visible and off-screen, some moving, some in a room.
The result is a plain scene JSON object: what a user could have written by hand.
"""
from __future__ import annotations

import numpy as np

from training.scene_spec import default_listener
from training.sounds import KINDS

START_OFFSET_DEG = 30.0  # the head starts within +-30 degrees of the loudest source (inside a 90-degree view)
ROOM_PROBABILITY = 0.3


def _r(x: float) -> float:
    return round(float(x), 3)


def _events(rng: np.random.Generator, duration: float, impulsive: bool) -> list[dict]:
    """Non-overlapping sound events: short strikes for impulsive kinds, longer phrases otherwise."""
    events, t = [], rng.uniform(0.1, 1.0)
    while t < duration - 0.2:
        length = rng.uniform(0.15, 0.5) if impulsive else rng.uniform(0.5, 2.0)
        length = min(length, duration - t)
        events.append({"t": _r(t), "duration": _r(length)})
        t += length + rng.uniform(0.3, 1.5)
    return events


def _head(rng: np.random.Generator, duration: float, yaw0: float, pitch0: float) -> list[dict]:
    """Piecewise-linear yaw/pitch/roll keyframes with a random drift per segment."""
    frames, t = [], 0.0
    yaw, pitch, roll = yaw0, pitch0, rng.normal(0, 3)
    drift = rng.normal(0, 15)  # degrees per second of slow yaw drift
    while True:
        frames.append({"t": _r(t), "yaw": _r(yaw), "pitch": _r(pitch), "roll": _r(roll)})
        if t >= duration:
            return frames
        step = min(rng.uniform(1.0, 3.0), duration - t)
        if duration - (t + step) < 0.002:  # keyframe times are rounded to 1 ms: do not leave a sliver
            step = duration - t
        t += step
        yaw += drift * step + rng.uniform(-40, 40)
        pitch = float(np.clip(pitch + rng.uniform(-10, 10), -30, 30))
        roll = float(np.clip(roll + rng.normal(0, 4), -15, 15))


ROOM_MARGIN = 0.3  # m: sources in a room stay this far below the ceiling and above the floor


def _inside_room(elevation: float, distance: float, room_size) -> float:
    """The elevation clamped so that a source at this distance from the listener is inside the room."""
    height, ears = room_size[2], default_listener(room_size)[2]
    lo = np.degrees(np.arcsin(np.clip((ROOM_MARGIN - ears) / distance, -1, 1)))
    hi = np.degrees(np.arcsin(np.clip((height - ROOM_MARGIN - ears) / distance, -1, 1)))
    return float(np.clip(elevation, lo, hi))


def random_scene(seed: int, duration: float = 8.0, num_sources: int | None = None,
                 sample_rate: int = 16000, fps: float = 25.0, frame_size=(128, 128),
                 room: bool | None = None) -> dict:
    """A random scene spec (JSON object); the same seed gives the same scene."""
    rng = np.random.default_rng([seed, 0x5CE7E])
    kinds = sorted(KINDS)
    count = int(num_sources) if num_sources is not None else int(rng.integers(1, 5))
    use_room = bool(rng.random() < ROOM_PROBABILITY) if room is None else room
    room_size = [_r(rng.uniform(5, 12)), _r(rng.uniform(5, 12)), _r(rng.uniform(2.6, 4.0))]
    max_distance = 0.45 * min(room_size[:2]) if use_room else 8.0  # inside the walls around a centred listener
    place = (lambda el, dist: _inside_room(el, dist, room_size)) if use_room else (lambda el, dist: el)
    sources, loudness = [], []
    for i in range(count):
        kind = kinds[rng.integers(len(kinds))]
        az0, el0 = rng.uniform(-180, 180), rng.uniform(-15, 25)
        dist0 = rng.uniform(1.0, max_distance)
        trajectory = [{"t": 0.0, "azimuth": _r(az0), "elevation": _r(place(el0, dist0)), "distance": _r(dist0)}]
        if rng.random() < 0.4:  # a moving source
            t = 0.0
            az, el, dist = az0, el0, dist0
            while _r(t) < duration:  # compare rounded times: a t within 0.5 ms of the end is the end
                t = min(duration, t + rng.uniform(1.5, 4.0))
                az += rng.uniform(-50, 50)
                el = float(np.clip(el + rng.uniform(-10, 10), -20, 35))
                dist = float(np.clip(dist + rng.uniform(-1.5, 1.5), 1.0, max_distance))
                trajectory.append({"t": _r(t), "azimuth": _r(az), "elevation": _r(place(el, dist)),
                                   "distance": _r(dist)})
        source = {"kind": kind, "trajectory": trajectory, "gain_db": _r(rng.uniform(-6, 6)),
                  "visible": bool(i == 0 or rng.random() < 0.7)}
        if KINDS[kind].impulsive or rng.random() < 0.5:
            source["events"] = _events(rng, duration, KINDS[kind].impulsive)
        sources.append(source)
        loudness.append(source["gain_db"] - 20 * np.log10(dist0))
    # BiAudio: the camera starts near the loudest (visible) direction, plus a random offset.
    visible = [i for i, s in enumerate(sources) if s["visible"]]
    loudest = max(visible, key=lambda i: loudness[i])
    start = sources[loudest]["trajectory"][0]
    yaw0 = start["azimuth"] + rng.uniform(-START_OFFSET_DEG, START_OFFSET_DEG)
    pitch0 = float(np.clip(start["elevation"] + rng.uniform(-10, 10), -30, 30))
    scene = {
        "duration": duration, "sample_rate": sample_rate, "fps": fps, "frame_size": list(frame_size),
        "fov": 90.0, "seed": int(seed), "sources": sources, "head": _head(rng, duration, yaw0, pitch0),
    }
    if use_room:
        scene["room"] = {"size": room_size, "rt60": _r(rng.uniform(0.2, 0.7))}
    return scene


HEAD_TURN_DEG = 60.0


def head_turn_scene(seed: int, duration: float = 8.0, sample_rate: int = 16000, fps: float = 25.0,
                    frame_size=(128, 128)) -> dict:
    """A fixed, continuously sounding visible source near the front; the head sweeps yaw +-60 degrees
    (one full sweep per 4 s, linear segments), so the source's lateral angle swings across the head."""
    rng = np.random.default_rng([seed, 0x7E4D])
    continuous = sorted(k for k, v in KINDS.items() if not v.impulsive)
    kind = continuous[rng.integers(len(continuous))]
    source = {"kind": kind, "visible": True,
              "trajectory": [{"t": 0.0, "azimuth": _r(rng.uniform(-20, 20)), "elevation": _r(rng.uniform(-5, 10)),
                              "distance": _r(rng.uniform(1.5, 4.0))}]}
    keys, t, sign = [], 0.0, 1.0 if rng.random() < 0.5 else -1.0
    keys.append({"t": 0.0, "yaw": 0.0, "pitch": 0.0, "roll": 0.0})
    t = 1.0
    while t <= duration:
        keys.append({"t": _r(t), "yaw": sign * HEAD_TURN_DEG, "pitch": 0.0, "roll": 0.0})
        sign, t = -sign, t + 2.0
    if keys[-1]["t"] < duration:
        keys.append({"t": duration, "yaw": 0.0, "pitch": 0.0, "roll": 0.0})
    return {"duration": duration, "sample_rate": sample_rate, "fps": fps, "frame_size": list(frame_size),
            "fov": 90.0, "seed": int(seed), "sources": [source], "head": keys}
