"""The main job, live: a procedural "game engine" publishes a rendered scene's frames and head pose over
ZeroMQ in real time; the runtime turns them into binaural audio for headphones (when a PortAudio output
device exists) and a recording (always)."""
from __future__ import annotations

import threading
import time

import numpy as np

from realtime.client import Client
from realtime.runtime import Runtime, RuntimeConfig


class Recorder:
    """A sink that keeps one stream's audio (the live run's record, for the MP4 and the plot)."""

    def __init__(self, stream: int = 0):
        self.stream, self.chunks = stream, []

    def __call__(self, stream: int, t_ns: int, pcm: np.ndarray, yaw=None) -> None:
        if stream == self.stream:
            self.chunks.append(pcm.copy())

    def audio(self, lag: int, samples: int) -> np.ndarray:
        """(2, samples) aligned with the video: the decoder's lag of `lag` samples removed."""
        pcm = np.concatenate(self.chunks) if self.chunks else np.zeros((0, 2), np.float32)
        pcm = pcm[lag:lag + samples]
        return np.pad(pcm, ((0, samples - len(pcm)), (0, 0))).T

    def close(self) -> None:
        pass


def publish_scene(frames: np.ndarray, pose: np.ndarray, fps: float, endpoints: RuntimeConfig, stop: threading.Event,
                  pose_rate: float = 100.0) -> None:
    """The game engine: frames at `fps`, head pose (interpolated) at `pose_rate`, on its own clock."""
    from engine.geometry import interpolate_ypr

    duration = len(frames) / fps
    ticks = np.arange(0, duration, 1 / pose_rate)
    ypr = interpolate_ypr(pose[:, 0], pose[:, 1:], ticks)
    frame_every = int(round(pose_rate / fps))
    with Client(0, endpoints, subscribe=False) as client:
        start = time.monotonic()
        for k, t in enumerate(ticks):
            if stop.wait(max(0.0, start + t - time.monotonic())):
                return
            t_ns = int(round(t * 1e9))
            client.send_pose(ypr[k], t_ns)
            if k % frame_every == 0:
                client.send_frame(frames[k // frame_every], t_ns)


def run_live(engine_dir, frames: np.ndarray, pose: np.ndarray, fps: float, headphones: bool = True,
             backend: str = "onnxruntime", threads: int = 1) -> tuple[np.ndarray, dict]:
    """Play a scene through the live path; returns the recorded audio (2, N) and the runtime's stats."""
    from engine.backends import open_engine

    runner = open_engine(engine_dir, backend, threads)
    rate = runner.manifest["rates"]["sample_rate"]
    recorder = Recorder()
    sinks = [recorder]
    if headphones:
        try:
            from realtime.audio import HeadphoneSink

            sinks.append(HeadphoneSink(rate, 0))
        except (OSError, ValueError):  # no PortAudio library or no output device: record only
            pass
    cfg = RuntimeConfig.loopback()
    runtime = Runtime(runner, rate, cfg, sinks)
    stop = threading.Event()
    game = threading.Thread(target=publish_scene, args=(frames, pose, fps, runtime.endpoints(), stop), daemon=True)
    samples = int(round(len(frames) / fps * rate))
    game.start()
    try:
        while game.is_alive() or len(recorder.chunks) * runner.g.samples < samples + 2 * runner.g.samples:
            runtime.poll_once(20.0)
            if not game.is_alive() and runtime.next_due() is None:
                break
    finally:
        stop.set()
        stats = runtime.stats()
        stats["headphones"] = any(s is not recorder for s in sinks)
        for sink in sinks:
            sink.close()
        runtime.close()
    return recorder.audio(runner.g.vae_hop, samples), stats
