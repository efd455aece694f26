"""Sources that feed a runtime like any producer (through a Client), and sinks it writes to.

Sources run on their own clock in a thread: a video file is played at its frame rate, a pose file at
its timestamps, a camera as it delivers (PyAV: v4l2 on Linux, avfoundation on macOS, dshow on
Windows). Sinks receive (stream, t_ns, pcm (n, 2)) from the runtime's loop.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np

from realtime.client import Client
from realtime.runtime import RuntimeConfig


def _paced(times: np.ndarray, stop: threading.Event):
    """Yield indices at their times (seconds from now), on the monotonic clock; stops early on `stop`."""
    start = time.monotonic()
    for i, t in enumerate(times):
        delay = start + t - time.monotonic()
        if delay > 0 and stop.wait(delay):
            return
        if stop.is_set():
            return
        yield i, start + t


def play_video(path: str, endpoints: RuntimeConfig, stream: int, stop: threading.Event, origin_ns: int) -> None:
    """Publish a video file's frames in real time (t_ns = origin + k / fps)."""
    from training.clips import read_video

    frames, fps = read_video(path)
    with Client(stream, endpoints, subscribe=False) as client:
        for i, _ in _paced(np.arange(len(frames)) / fps, stop):
            client.send_frame(frames[i], origin_ns + int(round(i * 1e9 / fps)))


def play_pose(path: str, endpoints: RuntimeConfig, stream: int, stop: threading.Event, origin_ns: int) -> None:
    """Publish a pose.jsonl file at its timestamps."""
    from training.clips import read_pose

    pose = read_pose(Path(path))
    with Client(stream, endpoints, subscribe=False) as client:
        for i, _ in _paced(pose[:, 0], stop):
            client.send_pose(pose[i, 1:], origin_ns + int(round(pose[i, 0] * 1e9)))


def camera_format() -> str:
    """This platform's capture input format for PyAV (FFmpeg libavdevice)."""
    return {"linux": "v4l2", "darwin": "avfoundation"}.get(sys.platform, "dshow")


def open_camera(device: str, fmt: str | None = None):
    """Open a capture device with PyAV (`fmt` None: this platform's; "lavfi" opens an FFmpeg source
    filter such as "testsrc2=size=320x240:rate=25,realtime", a camera for machines without one).
    Raises OSError naming the device when it cannot be opened."""
    import av

    fmt = fmt or camera_format()
    try:
        return av.open(device, format=fmt, options={} if fmt == "lavfi" else {"framerate": "25"})
    except (av.FFmpegError, ValueError) as exc:
        raise OSError(f"camera {device!r} ({fmt}): {exc}") from exc


def play_camera(container, endpoints: RuntimeConfig, stream: int, stop: threading.Event, size: int = 128) -> None:
    """Publish an opened camera's frames (centre-cropped square, resized to `size`) stamped on arrival."""
    with container, Client(stream, endpoints, subscribe=False) as client:
        for frame in container.decode(video=0):
            if stop.is_set():
                return
            side = min(frame.width, frame.height)
            image = frame.reformat(width=frame.width * size // side, height=frame.height * size // side,
                                   format="rgb24").to_ndarray()
            top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
            client.send_frame(np.ascontiguousarray(image[top:top + size, left:left + size]), time.monotonic_ns())


class WavSink:
    """Each stream's audio into a float32 WAV (STREAM inserted before the suffix when there are several)."""

    def __init__(self, path: str | Path, sample_rate: int):
        self.path, self.sample_rate, self.files = Path(path), sample_rate, {}

    def __call__(self, stream: int, t_ns: int, pcm: np.ndarray, yaw=None) -> None:
        import soundfile as sf

        if stream not in self.files:
            path = self.path if not self.files else self.path.with_name(f"{self.path.stem}.{stream}{self.path.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            self.files[stream] = sf.SoundFile(path, "w", self.sample_rate, 2, subtype="FLOAT")
        self.files[stream].write(pcm)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
