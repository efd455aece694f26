"""Clip folders (docs/FORMATS.md): clip.mp4 + binaural.wav + pose.jsonl + meta.json, written and read.

Our renders carry all four files. Real BiAudio-style clips may carry only an mp4 whose audio track is
binaural (and perhaps a pose.jsonl); then the camera is the head and the pose may be unknown.
Every problem with a file raises ClipError naming the file and what is wrong.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from engine.geometry import quaternion_to_ypr

CLIP_FORMAT = "visaudio-clip/1"
VIDEO_CRF = 18  # near-transparent H.264 at 128x128; the exact frames are re-rendered from meta if needed


class ClipError(ValueError):
    """A clip file that is missing, corrupt, truncated or inconsistent with the others."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)


@dataclass
class Clip:
    path: Path
    frames: np.ndarray  # (F, H, W, 3) uint8 rgb
    fps: float
    audio: np.ndarray  # (2, N) float32, channel 0 = left
    sample_rate: int
    pose: np.ndarray | None  # (P, 4): t seconds, yaw, pitch, roll degrees; None = unknown
    meta: dict | None  # our renders only

    @property
    def duration(self) -> float:
        return self.audio.shape[1] / self.sample_rate


# ----------------------------------------------------------------------------------------------- write


def write_mp4(path: Path, frames: np.ndarray, fps: float, audio: np.ndarray, sample_rate: int) -> None:
    """H.264 (yuv420p) video + AAC stereo audio, single-threaded so the bytes are reproducible."""
    import av

    with av.open(str(path), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        video.width, video.height = frames.shape[2], frames.shape[1]
        video.pix_fmt = "yuv420p"
        video.codec_context.thread_count = 1
        video.options = {"crf": str(VIDEO_CRF), "preset": "medium"}
        sound = container.add_stream("aac", rate=sample_rate, layout="stereo")
        sound.codec_context.thread_count = 1
        for image in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        planar = np.ascontiguousarray(audio, dtype=np.float32)
        chunk = 1024
        for start in range(0, planar.shape[1], chunk):
            frame = av.AudioFrame.from_ndarray(planar[:, start:start + chunk], format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = sample_rate, start
            for packet in sound.encode(frame):
                container.mux(packet)
        for packet in sound.encode():
            container.mux(packet)


def write_clip(out_dir: Path | str, frames, fps, audio, sample_rate, pose, meta) -> Path:
    """Write a clip folder atomically: files go to a temporary sibling that is renamed when complete."""
    from scipy.io import wavfile

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write_mp4(tmp / "clip.mp4", frames, fps, audio, sample_rate)
        # scipy writes plain IEEE-float WAV; libsndfile would add a PEAK chunk with a timestamp.
        wavfile.write(tmp / "binaural.wav", sample_rate, np.ascontiguousarray(np.asarray(audio, np.float32).T))
        with open(tmp / "pose.jsonl", "w") as f:
            for t, yaw, pitch, roll in pose:
                f.write(json.dumps({"t": round(float(t), 6), "yaw": round(float(yaw), 4),
                                    "pitch": round(float(pitch), 4), "roll": round(float(roll), 4)}) + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta, separators=(",", ":"), sort_keys=True))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ------------------------------------------------------------------------------------------------ read


def read_pose(path: Path) -> np.ndarray:
    """pose.jsonl -> (P, 4) t, yaw, pitch, roll; accepts yaw/pitch/roll or a quaternion q = [w, x, y, z]."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ClipError(path, f"cannot read ({exc})") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ClipError(where, f"not valid JSON ({exc.msg})") from exc
        if not isinstance(item, dict) or "t" not in item:
            raise ClipError(where, "each line needs an object with 't'")
        if "q" in item:
            q = item["q"]
            if not isinstance(q, list) or len(q) != 4:
                raise ClipError(where, "'q' must be [w, x, y, z]")
            values = [item["t"], *q]
        else:
            missing = [k for k in ("yaw", "pitch", "roll") if k not in item]
            if missing:
                raise ClipError(where, f"missing {', '.join(missing)} (or give 'q')")
            values = [item["t"], item["yaw"], item["pitch"], item["roll"]]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values):
            raise ClipError(where, "values must be finite numbers")
        if "q" in item:
            if np.linalg.norm(values[1:]) < 1e-6:
                raise ClipError(where, "quaternion has zero length")
            values = [values[0], *quaternion_to_ypr(values[1:])]
        if rows and values[0] <= rows[-1][0]:
            raise ClipError(where, f"timestamps must increase ({values[0]} after {rows[-1][0]})")
        rows.append(values)
    if not rows:
        raise ClipError(path, "no poses")
    return np.asarray(rows, dtype=np.float64)


def read_video(path: Path | str) -> tuple[np.ndarray, float]:
    """(frames (F, H, W, 3) uint8, fps) of an mp4 or of a clip folder's clip.mp4 (audio not decoded)."""
    path = Path(path)
    mp4 = path / "clip.mp4" if path.is_dir() else path
    if not mp4.is_file():
        raise ClipError(mp4, "video not found")
    frames, fps, _ = _decode_mp4(mp4, want_audio=False, sample_rate=0)
    return frames, fps


def _decode_mp4(path: Path, want_audio: bool, sample_rate: int):
    """(frames (F, H, W, 3) uint8, fps, audio (2, N) float32 or None) of an mp4."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise ClipError(path, f"cannot open video ({exc})") from exc
    with container:
        if not container.streams.video:
            raise ClipError(path, "has no video stream")
        vstream = container.streams.video[0]
        fps = float(vstream.average_rate or vstream.guessed_rate or 0)
        astream = container.streams.audio[0] if container.streams.audio else None
        if want_audio and astream is None:
            raise ClipError(path, "has no audio track and there is no binaural.wav")
        if want_audio and astream.codec_context.channels != 2:
            raise ClipError(path, f"audio track has {astream.codec_context.channels} channels, expected 2 (binaural)")
        streams = [vstream] + ([astream] if want_audio else [])
        frames, chunks = [], []
        resampler = av.AudioResampler(format="fltp", layout="stereo", rate=sample_rate) if want_audio else None
        try:
            for frame in container.decode(*streams):
                if isinstance(frame, av.VideoFrame):
                    frames.append(frame.to_ndarray(format="rgb24"))
                else:
                    chunks.extend(r.to_ndarray() for r in resampler.resample(frame))
            if resampler is not None:
                chunks.extend(r.to_ndarray() for r in resampler.resample(None))
        except av.error.FFmpegError as exc:
            raise ClipError(path, f"corrupt or truncated stream ({exc})") from exc
    if not frames:
        raise ClipError(path, "contains no decodable video frames")
    audio = np.concatenate(chunks, axis=1).astype(np.float32) if want_audio and chunks else None
    if want_audio and audio is None:
        raise ClipError(path, "audio track contains no decodable samples")
    return np.stack(frames), fps, audio


def read_clip(path: Path | str, sample_rate: int = 16000) -> Clip:
    """Load a clip folder (ours or a real one with only clip.mp4 [+ pose.jsonl]) and cross-check it."""
    import soundfile as sf

    root = Path(path)
    if not root.is_dir():
        raise ClipError(root, "clip folder not found")
    meta = None
    if (root / "meta.json").exists():
        try:
            meta = json.loads((root / "meta.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ClipError(root / "meta.json", f"not valid JSON ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != CLIP_FORMAT:
            raise ClipError(root / "meta.json", f"format is not {CLIP_FORMAT!r}")
        sample_rate = int(meta["sample_rate"])
    wav = root / "binaural.wav"
    mp4 = root / "clip.mp4"
    if not mp4.exists():
        raise ClipError(mp4, "missing (every clip needs its video)")
    frames, fps, audio = _decode_mp4(mp4, want_audio=not wav.exists(), sample_rate=sample_rate)
    if wav.exists():
        try:
            data, rate = sf.read(wav, dtype="float32", always_2d=True)
        except (RuntimeError, sf.LibsndfileError) as exc:
            raise ClipError(wav, f"cannot read ({exc})") from exc
        if data.shape[1] != 2:
            raise ClipError(wav, f"has {data.shape[1]} channel(s), expected 2 (left, right)")
        if rate != sample_rate:
            raise ClipError(wav, f"sample rate {rate} Hz does not match meta.json ({sample_rate} Hz)")
        audio = np.ascontiguousarray(data.T)
    if meta is not None:
        if audio.shape[1] != meta["num_samples"]:
            raise ClipError(wav, f"{audio.shape[1]} samples, meta.json says {meta['num_samples']} (truncated?)")
        if len(frames) != meta["num_frames"]:
            raise ClipError(mp4, f"{len(frames)} video frames, meta.json says {meta['num_frames']} (truncated?)")
        fps = float(meta["fps"])
    video_seconds, audio_seconds = len(frames) / fps, audio.shape[1] / sample_rate
    if abs(video_seconds - audio_seconds) > 2.0 / fps + 0.1:
        raise ClipError(root, f"video lasts {video_seconds:.2f} s but audio {audio_seconds:.2f} s")
    pose = read_pose(root / "pose.jsonl") if (root / "pose.jsonl").exists() else None
    return Clip(root, frames, fps, audio, sample_rate, pose, meta)
