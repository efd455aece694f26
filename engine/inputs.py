"""What one stream has received, and the inputs of one hop read from it: the part of the hop loop that
offline rendering and the live runtime share (so both give the same samples for the same inputs).

Media time: seconds since the stream's origin, the t_ns of its first message (sender clock). Frame
k is the one whose timestamp rounds to k / fps; hop n covers frames [n Fh, (n + 1) Fh) and latents
[n H, (n + 1) H) (latent l at l / latents_per_second).

Concealment (NetEq's "expand"): a frame missing when its hop runs is replaced by the newest earlier
frame if that is at most `hold_seconds` old, else by the null condition; frames that arrive after
their hop ran are dropped as late. Poses are interpolated at the latent times (yaw and roll
unwrapped); past the newest pose they are held, or predicted by linear extrapolation for at most
`predict_seconds` (the runtime predicts ahead by its output latency). Duplicates are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.generate import box_downsample
from engine.geometry import interpolate_ypr


@dataclass
class InputStats:
    frames: int = 0
    late_frames: int = 0  # arrived after their hop ran
    duplicate_frames: int = 0
    held_frames: int = 0  # concealed with an earlier frame
    null_frames: int = 0  # concealed with the null condition (nothing recent to hold)
    poses: int = 0
    duplicate_poses: int = 0
    stale_poses: int = 0  # older than everything kept

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class StreamInputs:
    fps: float
    latents_per_second: float
    frame_size: int
    hop_frames: int
    hop_latents: int
    hold_seconds: float = 0.5
    predict_seconds: float = 0.0
    pose_history: int = 512
    origin_ns: int | None = None
    end_frame: int | None = None  # frames from here on do not exist (the end of a file)
    next_hop: int = 0
    frames: dict = field(default_factory=dict)  # frame index -> (S, S, 3) uint8
    last_frame: tuple | None = None  # (index, pixels) of the newest frame used by a hop
    pose_t: list = field(default_factory=list)  # sorted media times
    pose_ypr: list = field(default_factory=list)
    stats: InputStats = field(default_factory=InputStats)

    def _media_time(self, t_ns: int) -> float:
        if self.origin_ns is None:
            self.origin_ns = t_ns
        return (t_ns - self.origin_ns) / 1e9

    def add_frame(self, t_ns: int, pixels: np.ndarray) -> bool:
        """Store a frame (any size that box-filters to frame_size); False if late or a duplicate."""
        index = int(round(self._media_time(t_ns) * self.fps))
        if index < self.next_hop * self.hop_frames:
            self.stats.late_frames += 1
            return False
        if index in self.frames:
            self.stats.duplicate_frames += 1
            return False
        small = pixels if pixels.shape[0] == self.frame_size and pixels.shape[1] == self.frame_size \
            else box_downsample(pixels, self.frame_size)
        self.frames[index] = small
        self.stats.frames += 1
        return True

    def add_pose(self, t_ns: int, ypr) -> bool:
        t = self._media_time(t_ns)
        if self.pose_t and t < self.pose_t[0] and len(self.pose_t) >= self.pose_history:
            self.stats.stale_poses += 1
            return False
        i = int(np.searchsorted(self.pose_t, t))
        if i < len(self.pose_t) and self.pose_t[i] == t:
            self.stats.duplicate_poses += 1
            return False
        self.pose_t.insert(i, t)
        self.pose_ypr.insert(i, tuple(float(a) for a in ypr))
        if len(self.pose_t) > self.pose_history:
            del self.pose_t[0], self.pose_ypr[0]
        self.stats.poses += 1
        return True

    def complete(self, hop: int) -> bool:
        """Every frame of the hop is here (or past the end of the stream), and, if the stream sends
        poses, one at or after the hop's last latent time (so no pose needs predicting)."""
        last = (hop + 1) * self.hop_frames - 1
        if self.end_frame is not None:
            last = min(last, self.end_frame - 1)
        if not all(i in self.frames for i in range(hop * self.hop_frames, last + 1)):
            return False
        last_latent = ((hop + 1) * self.hop_latents - 1) / self.latents_per_second
        return not self.pose_t or self.pose_t[-1] >= last_latent - 1e-9

    def take_hop(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Inputs of the next hop: frames (Fh, S, S, 3) uint8, frame_present (Fh,), pose (H, 3) degrees,
        pose_present (H,); consumes its frames."""
        n, fh, h = self.next_hop, self.hop_frames, self.hop_latents
        frames = np.zeros((fh, self.frame_size, self.frame_size, 3), np.uint8)
        present = np.zeros(fh, np.float32)
        for j, index in enumerate(range(n * fh, (n + 1) * fh)):
            if self.end_frame is not None and index >= self.end_frame:
                if self.last_frame is not None:
                    frames[j] = self.last_frame[1]
                continue
            pixels = self.frames.pop(index, None)
            if pixels is not None:
                self.last_frame = (index, pixels)
                frames[j], present[j] = pixels, 1.0
            elif self.last_frame is not None and (index - self.last_frame[0]) / self.fps <= self.hold_seconds:
                frames[j], present[j] = self.last_frame[1], 1.0
                self.stats.held_frames += 1
            else:
                self.stats.null_frames += 1
        for index in [i for i in self.frames if i < (n + 1) * fh]:  # stragglers below the hop
            del self.frames[index]
        pose, pose_present = self.pose_at(np.arange(n * h, (n + 1) * h) / self.latents_per_second)
        self.next_hop += 1
        return frames, present, pose, pose_present

    def pose_at(self, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Yaw/pitch/roll (len(times), 3) at media times, and whether a pose is known."""
        if not self.pose_t:
            return np.zeros((len(times), 3), np.float32), np.zeros(len(times), np.float32)
        t, ypr = np.array(self.pose_t), np.array(self.pose_ypr)
        out = interpolate_ypr(t, ypr, times)
        if self.predict_seconds > 0 and len(t) >= 2:
            ahead = np.clip(times - t[-1], 0.0, self.predict_seconds)
            unwrapped = interpolate_ypr(t[-2:], ypr[-2:], t[-2:])
            velocity = (unwrapped[1] - unwrapped[0]) / max(t[-1] - t[-2], 1e-3)
            out = out + ahead[:, None] * velocity[None, :] * (times > t[-1])[:, None]
        return out.astype(np.float32), np.ones(len(times), np.float32)
