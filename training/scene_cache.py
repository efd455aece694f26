"""A training cache: many rendered scenes (or dataset clips) as memory-mapped .npy arrays.

Flow training reads random windows from thousands of clip-seconds every step; decoding mp4s or
rendering scenes on the fly would dominate the step time on a CPU. The cache holds, per clip, the
frames at the model's input resolution, the head pose at the frame times and the binaural audio.
Only .npy (no pickle) and JSON are written, so a cache is safe to share.

    cache/index.json      {"format", "count", "fps", "sample_rate", "frame_size", "seconds", "clips"}
    cache/frames.npy      (N, F, S, S, 3) uint8
    cache/pose.npy        (N, F, 3) float32 yaw, pitch, roll (degrees) at t = f / fps
    cache/pose_known.npy  (N,) bool
    cache/audio.npy       (N, 2, T) float32, channel 0 = left ear
    cache/visible_dominant.npy  (N, F) bool: one visible, sounding source dominates the frame's direct
                          sound (from the metadata; true everywhere for clips without metadata). The
                          frames where the direction heard can be seen: they supervise the interaural head.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.generate import box_downsample

CACHE_FORMAT = "visaudio-cache/2"


def visible_dominant(frame_meta: list[dict]) -> np.ndarray:
    """(F,) bool from per-frame metadata: a visible, active source dominates (metrics.dominant_source)."""
    from training.metrics import dominant_source, meta_tracks

    meta = {"frames": frame_meta}
    which, dominated = dominant_source(meta)
    visible = meta_tracks(meta)[4].astype(bool)
    return dominated & visible[np.arange(len(which)), which]


def _render(args) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    seed, seconds, size = args
    from training.render import render_scene
    from training.sampler import random_scene
    from training.scene_spec import parse_scene

    try:
        scene = render_scene(parse_scene(random_scene(seed, duration=seconds)))
    except ValueError as exc:
        raise ValueError(f"scene seed {seed}: {exc}") from exc
    return (box_downsample(scene.frames, size), scene.pose[:, 1:].astype(np.float32), scene.audio,
            visible_dominant(scene.meta["frames"]))


@dataclass
class SceneCache:
    frames: np.ndarray
    pose: np.ndarray
    pose_known: np.ndarray
    audio: np.ndarray
    visible_dominant: np.ndarray
    fps: float
    sample_rate: int

    def __len__(self) -> int:
        return len(self.audio)


def build_cache(out: Path | str, count: int, seed: int = 1_000_000, seconds: float = 8.0, size: int = 64,
                jobs: int = 1, sample_rate: int = 16000, fps: float = 25.0, progress: bool = True) -> Path:
    """Render `count` random scenes (seeds seed .. seed + count - 1) into a cache folder."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    nf, ns = int(round(seconds * fps)), int(round(seconds * sample_rate))
    frames = np.lib.format.open_memmap(out / "frames.npy", "w+", np.uint8, (count, nf, size, size, 3))
    pose = np.lib.format.open_memmap(out / "pose.npy", "w+", np.float32, (count, nf, 3))
    audio = np.lib.format.open_memmap(out / "audio.npy", "w+", np.float32, (count, 2, ns))
    seen = np.zeros((count, nf), bool)
    np.save(out / "pose_known.npy", np.ones(count, bool))
    jobs_args = [(seed + i, seconds, size) for i in range(count)]
    with process_pool(jobs) as pool:
        results = pool.map(_render, jobs_args, chunksize=4)
        for i, (fr, po, au, vd) in enumerate(tqdm(results, total=count, desc="scenes", disable=not progress)):
            frames[i], pose[i], audio[i], seen[i] = fr, po, au, vd
    np.save(out / "visible_dominant.npy", seen)
    for arr in (frames, pose, audio):
        arr.flush()
    index = {"format": CACHE_FORMAT, "count": count, "fps": fps, "sample_rate": sample_rate,
             "frame_size": size, "seconds": seconds, "clips": [f"seed:{seed + i}" for i in range(count)]}
    tmp = out / ".index.json.tmp"
    tmp.write_text(json.dumps(index))
    os.replace(tmp, out / "index.json")
    return out


def cache_from_dataset(out: Path | str, dataset: Path | str, seconds: float = 8.0, size: int = 64,
                       progress: bool = True) -> Path:
    """Cache the first `seconds` of every clip of a dataset folder (ours or real mp4-only clips)."""
    from tqdm import tqdm

    from training.clips import read_clip
    from training.data import dataset_clips, window_of

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = dataset_clips(dataset)
    first = read_clip(paths[0])
    fps, sr = first.fps, first.sample_rate
    nf, ns = int(round(seconds * fps)), int(round(seconds * sr))
    n = len(paths)
    frames = np.lib.format.open_memmap(out / "frames.npy", "w+", np.uint8, (n, nf, size, size, 3))
    pose = np.lib.format.open_memmap(out / "pose.npy", "w+", np.float32, (n, nf, 3))
    audio = np.lib.format.open_memmap(out / "audio.npy", "w+", np.float32, (n, 2, ns))
    known = np.zeros(n, bool)
    seen = np.ones((n, nf), bool)
    for i, p in enumerate(tqdm(paths, desc="clips", disable=not progress)):
        clip = first if i == 0 else read_clip(p, sr)
        if clip.fps != fps or clip.sample_rate != sr:
            raise ValueError(f"{p}: {clip.fps} fps / {clip.sample_rate} Hz differs from the first clip's")
        w = window_of(clip, 0.0, seconds)
        frames[i], pose[i], audio[i], known[i] = box_downsample(w.frames, size), w.pose, w.audio, w.pose_known
        if w.frame_meta is not None:
            seen[i] = visible_dominant(w.frame_meta)
    np.save(out / "pose_known.npy", known)
    np.save(out / "visible_dominant.npy", seen)
    for arr in (frames, pose, audio):
        arr.flush()
    index = {"format": CACHE_FORMAT, "count": n, "fps": fps, "sample_rate": sr, "frame_size": size,
             "seconds": seconds, "clips": [str(p) for p in paths]}
    (out / "index.json").write_text(json.dumps(index))
    return out


def load_cache(path: Path | str) -> SceneCache:
    """Open a cache folder (memory-mapped, read-only)."""
    path = Path(path)
    try:
        index = json.loads((path / "index.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a training cache ({exc})") from exc
    if index.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path / 'index.json'}: format is not {CACHE_FORMAT!r}")
    arrays = {k: np.load(path / f"{k}.npy", mmap_mode="r", allow_pickle=False)
              for k in ("frames", "pose", "pose_known", "audio", "visible_dominant")}
    counts = {k: len(a) for k, a in arrays.items()}
    if set(counts.values()) != {index["count"]}:
        raise ValueError(f"{path}: arrays disagree on the clip count {counts} (index says {index['count']})")
    return SceneCache(**arrays, fps=float(index["fps"]), sample_rate=int(index["sample_rate"]))


def process_pool(jobs: int):
    """`jobs` spawned worker processes (an executor), or for one job a stand-in with its map. Spawned:
    a forked copy of a process holding torch's threads can deadlock. concurrent.futures rather than
    multiprocessing.Pool: a worker that dies, or whose exception cannot be unpickled here, raises
    BrokenProcessPool instead of leaving Pool.imap waiting forever."""
    return ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) if jobs > 1 else _Serial()


class _Serial:
    """A one-process stand-in with the executor's map, so a single job needs no subprocess."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, items, chunksize=1):
        return map(fn, items)
