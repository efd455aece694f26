"""The ViSAudio-RT wire protocol, version 1 (docs/PROTOCOL.md): message encoding and validation.

Every message starts with a msgpack map carrying `v` (protocol version), `stream` (the listener it
belongs to), `seq` (per stream and kind, increasing) and `t_ns` (capture time, integer nanoseconds on
the sender's clock). Frames and audio add a second part: raw pixels / float32 PCM, sent zero-copy.
Decoding never trusts the peer: sizes, types, ranges and versions are checked and a bad message
raises ProtocolError naming the field; nothing is ever unpickled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import msgpack
import numpy as np

VERSION = 1
MAX_STREAM_ID = 1 << 16
MAX_SIDE = 4096  # pixels per frame side
FORMATS = {"rgb24": 3}
CONTROL_COMMANDS = ("start", "stop", "reset", "stats", "config")
MAX_HEADER_BYTES = 4096


class ProtocolError(ValueError):
    pass


@dataclass(frozen=True)
class FrameMessage:
    stream: int
    seq: int
    t_ns: int
    pixels: np.ndarray  # (height, width, 3) uint8, a view on the received buffer


@dataclass(frozen=True)
class PoseMessage:
    stream: int
    seq: int
    t_ns: int
    ypr: tuple[float, float, float]  # yaw, pitch, roll in degrees (a quaternion is converted)


@dataclass(frozen=True)
class AudioMessage:
    stream: int
    seq: int
    t_ns: int  # time of the first sample on the runtime's output clock
    sample_rate: int
    pcm: np.ndarray  # (frames, 2) float32 interleaved, channel 0 = left ear


def _view(data, kind: str) -> memoryview:
    """Any buffer (bytes, zmq.Frame, numpy) as bytes-like, or a ProtocolError."""
    try:
        return memoryview(data).cast("B")
    except (TypeError, ValueError):
        raise ProtocolError(f"{kind}: a message part is not a byte buffer") from None


def _map(data, kind: str) -> dict:
    view = _view(data, kind)
    if view.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"{kind}: header must be a msgpack map of at most {MAX_HEADER_BYTES} bytes")
    try:
        head = msgpack.unpackb(view, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several types for malformed input
        raise ProtocolError(f"{kind}: header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(head, dict):
        raise ProtocolError(f"{kind}: header must be a map")
    return head


def _header(data, kind: str) -> dict:
    head = _map(data, kind)
    if head.get("v") != VERSION:
        raise ProtocolError(f"{kind}: protocol version {head.get('v')!r}, this runtime speaks {VERSION}")
    for key, low, high in (("stream", 0, MAX_STREAM_ID), ("seq", 0, 1 << 63), ("t_ns", -(1 << 63), 1 << 63)):
        value = head.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
            raise ProtocolError(f"{kind}.{key}: must be an integer in [{low}, {high}), got {value!r}")
    return head


def _number(head: dict, key: str, kind: str, low: float, high: float) -> float:
    value = head.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ProtocolError(f"{kind}.{key}: must be a finite number in [{low}, {high}], got {value!r}")
    return float(value)


def encode_frame(stream: int, seq: int, t_ns: int, pixels: np.ndarray) -> list:
    """[header, pixels]: send with socket.send_multipart(parts, copy=False)."""
    h, w, c = pixels.shape
    if c != 3 or pixels.dtype != np.uint8:
        raise ProtocolError("frames are rgb24: (height, width, 3) uint8")
    head = {"v": VERSION, "stream": stream, "seq": seq, "t_ns": t_ns, "width": w, "height": h, "format": "rgb24"}
    return [msgpack.packb(head), np.ascontiguousarray(pixels)]


def decode_frame(parts: list) -> FrameMessage:
    if len(parts) != 2:
        raise ProtocolError(f"frame: expected 2 parts (header, pixels), got {len(parts)}")
    head = _header(parts[0], "frame")
    if not isinstance(head.get("format"), str) or head["format"] not in FORMATS:
        raise ProtocolError(f"frame.format: {head.get('format')!r} is not one of {sorted(FORMATS)}")
    w, h = (int(_number(head, k, "frame", 1, MAX_SIDE)) for k in ("width", "height"))
    if head["width"] != w or head["height"] != h:
        raise ProtocolError("frame.width/height: must be integers")
    buffer = _view(parts[1], "frame")
    expected = w * h * FORMATS[head["format"]]
    if buffer.nbytes != expected:
        raise ProtocolError(f"frame: {buffer.nbytes} pixel bytes, {w}x{h} {head['format']} needs {expected}")
    pixels = np.frombuffer(buffer, dtype=np.uint8).reshape(h, w, 3)
    return FrameMessage(head["stream"], head["seq"], head["t_ns"], pixels)


def encode_pose(stream: int, seq: int, t_ns: int, yaw: float | None = None, pitch: float | None = None,
                roll: float | None = None, quaternion=None) -> bytes:
    head = {"v": VERSION, "stream": stream, "seq": seq, "t_ns": t_ns}
    if quaternion is not None:
        head["q"] = [float(x) for x in quaternion]
    else:
        head.update(yaw=float(yaw), pitch=float(pitch), roll=float(roll))
    return msgpack.packb(head)


def decode_pose(parts: list) -> PoseMessage:
    from engine.geometry import quaternion_to_ypr

    if len(parts) != 1:
        raise ProtocolError(f"pose: expected 1 part, got {len(parts)}")
    head = _header(parts[0], "pose")
    if "q" in head:
        q = head["q"]
        if not isinstance(q, list) or len(q) != 4 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in q):
            raise ProtocolError("pose.q: must be 4 finite numbers [w, x, y, z]")
        norm = math.sqrt(sum(x * x for x in q))
        if not 0.5 < norm < 1.5:
            raise ProtocolError(f"pose.q: not a unit quaternion (norm {norm:.3g})")
        ypr = tuple(float(a) for a in quaternion_to_ypr(np.array(q) / norm))
    else:
        ypr = (_number(head, "yaw", "pose", -1e6, 1e6), _number(head, "pitch", "pose", -90, 90),
               _number(head, "roll", "pose", -1e6, 1e6))
    return PoseMessage(head["stream"], head["seq"], head["t_ns"], ypr)


def encode_audio(stream: int, seq: int, t_ns: int, sample_rate: int, pcm: np.ndarray) -> list:
    pcm = np.ascontiguousarray(pcm, dtype=np.float32)
    head = {"v": VERSION, "stream": stream, "seq": seq, "t_ns": t_ns, "sample_rate": sample_rate,
            "channels": 2, "frames": int(pcm.shape[0]), "format": "f32le"}
    return [msgpack.packb(head), pcm]


def decode_audio(parts: list) -> AudioMessage:
    if len(parts) != 2:
        raise ProtocolError(f"audio: expected 2 parts, got {len(parts)}")
    head = _header(parts[0], "audio")
    frames = int(_number(head, "frames", "audio", 0, 1 << 24))
    buffer = _view(parts[1], "audio")
    if head.get("channels") != 2 or head.get("format") != "f32le" or buffer.nbytes != frames * 8:
        raise ProtocolError("audio: expected 2 channels of f32le with frames * 8 bytes")
    pcm = np.frombuffer(buffer, dtype="<f4").reshape(frames, 2)
    rate = int(_number(head, "sample_rate", "audio", 1000, 384000))
    return AudioMessage(head["stream"], head["seq"], head["t_ns"], rate, pcm)


def encode_control(cmd: str, **fields) -> bytes:
    return msgpack.packb({"v": VERSION, "cmd": cmd, **fields})


def decode_control(parts: list) -> dict:
    if len(parts) != 1:
        raise ProtocolError(f"control: expected 1 part, got {len(parts)}")
    msg = _map(parts[0], "control")
    if msg.get("v") != VERSION:
        raise ProtocolError(f"control: protocol version {msg.get('v')!r}, this runtime speaks {VERSION}")
    if msg.get("cmd") not in CONTROL_COMMANDS:
        raise ProtocolError(f"control.cmd: {msg.get('cmd')!r} is not one of {list(CONTROL_COMMANDS)}")
    stream = msg.get("stream", 0)
    if not isinstance(stream, int) or isinstance(stream, bool) or not 0 <= stream < MAX_STREAM_ID:
        raise ProtocolError(f"control.stream: must be an integer in [0, {MAX_STREAM_ID})")
    return msg
