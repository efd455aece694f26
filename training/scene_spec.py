"""Scene specification: the JSON a user writes by hand, parsed and checked before anything renders.

Every problem is reported as SceneSpecError naming the field path (e.g. `sources[1].trajectory[2].t`).
Angles in degrees (conventions in engine/geometry.py); keyframes interpolate linearly and do not wrap,
so an azimuth going 0 -> 720 circles the listener twice.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from training.sounds import KINDS


class SceneSpecError(ValueError):
    """A scene file that cannot be rendered; the message starts with the offending field."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.field, self.problem = path, problem

    def __reduce__(self):  # pickled across worker processes (scene_cache.build_cache)
        return type(self), (self.field, self.problem)


@dataclass(frozen=True)
class SourceKeyframe:
    t: float
    azimuth: float
    elevation: float
    distance: float


@dataclass(frozen=True)
class HeadKeyframe:
    t: float
    yaw: float
    pitch: float
    roll: float


@dataclass(frozen=True)
class Event:
    t: float
    duration: float


@dataclass(frozen=True)
class Source:
    kind: str
    trajectory: tuple[SourceKeyframe, ...]
    events: tuple[Event, ...] | None = None  # None: sounds for the whole clip
    wav: str | None = None  # a user's sound file, resolved against the scene file's folder
    visible: bool = True  # False: off-screen / ambient, never drawn
    gain_db: float = 0.0


@dataclass(frozen=True)
class Room:
    """A shoebox room: first-order image sources plus an exponential late tail."""

    size: tuple[float, float, float]  # metres along x (forward at yaw 0), y (left), z (up)
    listener: tuple[float, float, float]  # listener position inside the room
    rt60: float  # seconds


@dataclass(frozen=True)
class SceneSpec:
    duration: float
    sources: tuple[Source, ...]
    head: tuple[HeadKeyframe, ...] = (HeadKeyframe(0.0, 0.0, 0.0, 0.0),)
    sample_rate: int = 16000
    fps: float = 25.0
    frame_size: tuple[int, int] = (128, 128)  # width, height (even: H.264 4:2:0)
    fov: float = 90.0  # horizontal field of view, degrees
    seed: int = 0
    room: Room | None = None
    hrtf: str = "axd1"

    def to_json(self) -> dict:
        """The spec as plain JSON (what meta.json stores and parse_scene reads back)."""
        out = asdict(self)
        for src in out["sources"]:
            if src["events"] is None:
                del src["events"]
            if src["wav"] is None:
                del src["wav"]
        if out["room"] is None:
            del out["room"]
        return json.loads(json.dumps(out))  # tuples to lists: what a JSON file would hold


_MISSING = object()


def _number(obj: dict, key: str, path: str, default: Any = _MISSING, **limits) -> float:
    """obj[key] checked by _check_number, or the default when absent (required without one)."""
    where = f"{path}.{key}" if path else key
    if key not in obj:
        if default is _MISSING:
            raise SceneSpecError(where, "missing required field")
        return default
    return _check_number(obj[key], where, **limits)


def _check_number(value: Any, where: str, *, lo=None, hi=None, lo_open=False, integer=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SceneSpecError(where, f"expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise SceneSpecError(where, f"must be finite, got {value!r}")
    if integer and int(value) != value:
        raise SceneSpecError(where, f"expected an integer, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise SceneSpecError(where, f"must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise SceneSpecError(where, f"must be <= {hi}, got {value!r}")
    return int(value) if integer else float(value)


def _list(obj: dict, key: str, path: str, *, required=True, min_len=1) -> list | None:
    where = f"{path}.{key}" if path else key
    if key not in obj:
        if required:
            raise SceneSpecError(where, "missing required field")
        return None
    value = obj[key]
    if not isinstance(value, list):
        raise SceneSpecError(where, f"expected a list, got {type(value).__name__}")
    if len(value) < min_len:
        raise SceneSpecError(where, f"needs at least {min_len} entr{'y' if min_len == 1 else 'ies'}")
    return value


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise SceneSpecError(where, f"expected an object, got {type(value).__name__}")
    return value


def _keyframes(items: list, path: str, fields: tuple[str, ...], cls, limits: dict):
    frames = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]"
        item = _object(item, where)
        values = {"t": _number(item, "t", where, lo=0.0)}
        for name in fields:
            lo, hi, default = limits[name]
            values[name] = _number(item, name, where, default, lo=lo, hi=hi, lo_open=(name == "distance"))
        if frames and values["t"] <= frames[-1].t:
            raise SceneSpecError(f"{where}.t", f"keyframes out of order: {values['t']} after {frames[-1].t}")
        frames.append(cls(**values))
    return tuple(frames)


_SOURCE_LIMITS = {"azimuth": (None, None, _MISSING), "elevation": (-90.0, 90.0, 0.0),
                  "distance": (0.0, 1000.0, _MISSING)}
_HEAD_LIMITS = {"yaw": (None, None, 0.0), "pitch": (-90.0, 90.0, 0.0), "roll": (-180.0, 180.0, 0.0)}


def _reject_unknown(obj: dict, cls, path: str) -> None:
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(obj) - known)
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise SceneSpecError(where, f"unknown field (known: {', '.join(sorted(known))})")


def _source(obj: Any, path: str, base_dir: Path | None, duration: float) -> Source:
    obj = _object(obj, path)
    kind = obj.get("kind", _MISSING)
    if kind is _MISSING:
        raise SceneSpecError(f"{path}.kind", "missing required field")
    if kind not in KINDS:
        raise SceneSpecError(f"{path}.kind", f"unknown kind {kind!r}; known: {', '.join(sorted(KINDS))}")
    trajectory = _keyframes(_list(obj, "trajectory", path), f"{path}.trajectory",
                            ("azimuth", "elevation", "distance"), SourceKeyframe, _SOURCE_LIMITS)
    events = None
    raw_events = _list(obj, "events", path, required=False, min_len=0)
    if raw_events is not None:
        parsed = []
        for i, ev in enumerate(raw_events):
            where = f"{path}.events[{i}]"
            ev = _object(ev, where)
            e = Event(_number(ev, "t", where, lo=0.0), _number(ev, "duration", where, lo=0.0, lo_open=True))
            if parsed and e.t < parsed[-1].t + parsed[-1].duration:
                raise SceneSpecError(f"{where}.t", "events out of order or overlapping the previous one")
            if e.t >= duration:
                raise SceneSpecError(f"{where}.t", f"starts at {e.t} s, after the scene ends ({duration} s)")
            parsed.append(e)
        events = tuple(parsed)
    wav = obj.get("wav")
    if wav is not None:
        if not isinstance(wav, str) or not wav:
            raise SceneSpecError(f"{path}.wav", "expected a file path string")
        resolved = Path(wav) if base_dir is None or Path(wav).is_absolute() else base_dir / wav
        if not resolved.is_file():
            raise SceneSpecError(f"{path}.wav", f"file not found: {resolved}")
        wav = str(resolved.resolve())
    visible = obj.get("visible", True)
    if not isinstance(visible, bool):
        raise SceneSpecError(f"{path}.visible", f"expected true or false, got {visible!r}")
    gain = _number(obj, "gain_db", path, 0.0, lo=-60.0, hi=24.0)
    _reject_unknown(obj, Source, path)
    return Source(kind, trajectory, events, wav, visible, gain)


def default_listener(size) -> list[float]:
    """Where a room's listener stands unless the scene says: centred, ears at 1.6 m (or mid-height)."""
    return [size[0] / 2, size[1] / 2, min(1.6, size[2] / 2)]


def _room(obj: Any) -> Room:
    obj = _object(obj, "room")
    size = _list(obj, "size", "room", min_len=3)
    if len(size) != 3:
        raise SceneSpecError("room.size", f"expected [x, y, z], got {len(size)} values")
    dims = tuple(_check_number(v, f"room.size[{i}]", lo=1.0, hi=200.0) for i, v in enumerate(size))
    listener = obj.get("listener", default_listener(dims))
    if not isinstance(listener, list) or len(listener) != 3:
        raise SceneSpecError("room.listener", "expected [x, y, z] inside the room")
    pos = []
    for axis, (value, extent) in enumerate(zip(listener, dims)):
        v = _check_number(value, f"room.listener[{axis}]", lo=0.0, lo_open=True)
        if v >= extent:
            raise SceneSpecError(f"room.listener[{axis}]", f"{v} is outside the room (0..{extent})")
        pos.append(v)
    return Room(dims, tuple(pos), _number(obj, "rt60", "room", lo=0.05, hi=10.0))


def parse_scene(obj: Any, base_dir: Path | None = None) -> SceneSpec:
    """Check a scene JSON object and build a SceneSpec; raise SceneSpecError naming the bad field."""
    obj = _object(obj, "scene")
    duration = _number(obj, "duration", "", lo=0.0, hi=3600.0, lo_open=True)
    sample_rate = _number(obj, "sample_rate", "", 16000, lo=8000, hi=96000, integer=True)
    fps = _number(obj, "fps", "", 25.0, lo=1.0, hi=240.0)
    size = obj.get("frame_size", [128, 128])
    if not isinstance(size, list) or len(size) != 2:
        raise SceneSpecError("frame_size", f"expected [width, height], got {size!r}")
    frame_size = tuple(_check_number(v, f"frame_size[{i}]", lo=16, hi=4096, integer=True) for i, v in enumerate(size))
    if any(v % 2 for v in frame_size):
        raise SceneSpecError("frame_size", f"width and height must be even (H.264 4:2:0), got {list(frame_size)}")
    fov = _number(obj, "fov", "", 90.0, lo=10.0, hi=170.0)
    seed = _number(obj, "seed", "", 0, lo=0, hi=2 ** 63 - 1, integer=True)
    sources = tuple(_source(s, f"sources[{i}]", base_dir, duration)
                    for i, s in enumerate(_list(obj, "sources", "")))
    head_items = _list(obj, "head", "", required=False)
    head = (_keyframes(head_items, "head", ("yaw", "pitch", "roll"), HeadKeyframe, _HEAD_LIMITS)
            if head_items is not None else SceneSpec.head)
    room = _room(obj["room"]) if obj.get("room") is not None else None
    hrtf = obj.get("hrtf", "axd1")
    if not isinstance(hrtf, str):
        raise SceneSpecError("hrtf", f"expected a set name or a .sofa path, got {hrtf!r}")
    _reject_unknown(obj, SceneSpec, "")
    return SceneSpec(duration, sources, head, sample_rate, fps, frame_size, fov, seed, room, hrtf)


def load_scene(path: str | Path) -> SceneSpec:
    """Read and check a scene file."""
    import json

    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise SceneSpecError(str(path), "file not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SceneSpecError(str(path), f"not valid JSON ({exc})") from exc
    return parse_scene(obj, path.parent)


def interpolate_keyframes(frames, names: tuple[str, ...], times):
    """Linear interpolation of keyframe fields at `times` (held constant outside the keyframes)."""
    import numpy as np

    kt = np.array([f.t for f in frames])
    return tuple(np.interp(times, kt, np.array([getattr(f, n) for f in frames])) for n in names)

