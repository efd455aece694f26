"""Datasets: a folder of clips plus index.json; building one from random scenes; training windows.

`build_dataset` renders clip_000000 ... in parallel, each clip written atomically, so an interrupted
run resumes where it stopped. `WindowDataset` is map-style (len / getitem, usable by a torch DataLoader)
and yields fixed-length windows of frames, binaural audio, head pose and per-frame metadata.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.geometry import interpolate_ypr
from training.clips import Clip, ClipError, read_clip

DATASET_FORMAT = "visaudio-dataset/1"
INDEX_NAME = "index.json"


def clip_name(i: int) -> str:
    return f"clip_{i:06d}"


def render_clip(seed: int, out_dir: Path, duration: float = 8.0, num_sources: int | None = None) -> Path:
    """Render the random scene of a seed into a clip folder."""
    from training.render import render_scene
    from training.sampler import random_scene
    from training.scene_spec import parse_scene

    spec = parse_scene(random_scene(seed, duration=duration, num_sources=num_sources))
    return render_scene(spec).write(out_dir)


def _render_job(args) -> str:
    seed, out_dir, duration = args
    render_clip(seed, Path(out_dir), duration)
    return out_dir


def write_index(root: Path, names: list[str], extra: dict | None = None) -> Path:
    """Write index.json atomically."""
    index = {"format": DATASET_FORMAT, "clips": sorted(names), **(extra or {})}
    tmp = root / f".{INDEX_NAME}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, root / INDEX_NAME)
    return root / INDEX_NAME


def build_dataset(root: Path | str, count: int, jobs: int = 1, seed: int = 0, duration: float = 8.0,
                  progress: bool = True) -> Path:
    """Render `count` random clips (seed + i) into root; clips already present are kept (resume)."""
    from tqdm import tqdm

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".clip_*"):  # temporary folders of an interrupted run
        shutil.rmtree(leftover, ignore_errors=True)
    todo = [(seed + i, str(root / clip_name(i)), duration) for i in range(count)
            if not (root / clip_name(i) / "meta.json").exists()]
    bar = tqdm(total=count, initial=count - len(todo), desc="rendering clips", unit="clip", disable=not progress)
    if jobs > 1 and todo:
        import multiprocessing as mp

        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")  # inherited by the spawned workers: one core each
        with mp.get_context("spawn").Pool(jobs) as pool:
            for _ in pool.imap_unordered(_render_job, todo):
                bar.update()
    else:
        for job in todo:
            _render_job(job)
            bar.update()
    bar.close()
    names = [clip_name(i) for i in range(count)]
    return write_index(root, names, {"seed": seed, "duration": duration})


def dataset_clips(root: Path | str) -> list[Path]:
    """Clip folders of a dataset: those listed in index.json, or every sub-folder holding a clip.mp4."""
    root = Path(root)
    index = root / INDEX_NAME
    if index.exists():
        try:
            data = json.loads(index.read_text())
        except json.JSONDecodeError as exc:
            raise ClipError(index, f"not valid JSON ({exc})") from exc
        if data.get("format") != DATASET_FORMAT or not isinstance(data.get("clips"), list):
            raise ClipError(index, f"format is not {DATASET_FORMAT!r} with a 'clips' list")
        missing = [n for n in data["clips"] if not (root / n).is_dir()]
        if missing:
            raise ClipError(index, f"lists {len(missing)} clip(s) that are not there, e.g. {missing[0]}")
        return [root / n for n in data["clips"]]
    clips = sorted(p.parent for p in root.glob("*/clip.mp4"))
    if not clips:
        raise ClipError(root, "no index.json and no clip folders (*/clip.mp4)")
    return clips


@dataclass
class Window:
    """A training window: everything the model sees and must produce for [start, start + seconds)."""

    clip: str
    start: float
    frames: np.ndarray  # (F, H, W, 3) uint8
    audio: np.ndarray  # (2, N) float32
    pose: np.ndarray  # (F, 3) yaw, pitch, roll at the frame times (zeros when unknown)
    pose_known: bool
    frame_meta: list | None  # per-frame metadata of our renders


class WindowDataset:
    """Fixed-length windows over the clips of a dataset (map-style: len() and [i])."""

    def __init__(self, root: Path | str, seconds: float = 2.0, hop: float | None = None,
                 sample_rate: int = 16000, cache_clips: int = 2):
        self.clips = dataset_clips(root)
        self.seconds, self.hop, self.sample_rate = seconds, hop or seconds, sample_rate
        self._load = functools.lru_cache(maxsize=cache_clips)(lambda p: read_clip(p, sample_rate))
        durations = [self._duration(p) for p in self.clips]
        self.index = [(c, k * self.hop) for c, d in enumerate(durations)
                      for k in range(int(np.floor((d - seconds) / self.hop + 1e-9)) + 1) if d >= seconds]

    def _duration(self, path: Path) -> float:
        meta = path / "meta.json"
        if meta.exists():
            try:
                m = json.loads(meta.read_text())
                return m["num_samples"] / m["sample_rate"]
            except (json.JSONDecodeError, KeyError, TypeError, ZeroDivisionError) as exc:
                raise ClipError(meta, f"unreadable clip length ({exc})") from exc
        return self._load(path).duration

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Window:
        c, start = self.index[i]
        return window_of(self._load(self.clips[c]), start, self.seconds)


def window_of(clip: Clip, start: float, seconds: float) -> Window:
    """Cut a window out of a loaded clip; the pose is interpolated at the window's frame times."""
    f0 = int(round(start * clip.fps))
    nf = int(round(seconds * clip.fps))
    s0 = int(round(start * clip.sample_rate))
    ns = int(round(seconds * clip.sample_rate))
    if f0 + nf > len(clip.frames) or s0 + ns > clip.audio.shape[1]:
        raise ValueError(f"{clip.path}: window [{start}, {start + seconds}) s runs past the clip end")
    times = (f0 + np.arange(nf)) / clip.fps
    if clip.pose is not None:
        pose, known = interpolate_ypr(clip.pose[:, 0], clip.pose[:, 1:], times).astype(np.float32), True
    else:
        pose, known = np.zeros((nf, 3), np.float32), False
    frame_meta = clip.meta["frames"][f0:f0 + nf] if clip.meta is not None else None
    return Window(clip.path.name, start, clip.frames[f0:f0 + nf], clip.audio[:, s0:s0 + ns], pose, known, frame_meta)
