"""Angle conventions shared by every part of ViSAudio-RT (SOFA-style, degrees).

Axes: x forward, y left, z up (right-handed). Azimuth is counter-clockwise from straight ahead
(positive = to the listener's left), elevation positive up. Head orientation is yaw/pitch/roll:
yaw positive turns the nose to the left, pitch positive tilts the nose up, roll positive is a
right-handed rotation about the forward axis (left ear up, head tilting toward the right shoulder).
The head (= camera) rotation is R = Rz(yaw) @ Ry(-pitch) @ Rx(roll); a world vector v is seen by the
head as R.T @ v.
"""
from __future__ import annotations

import numpy as np

SPEED_OF_SOUND = 343.0  # m/s at 20 degrees C
# Effective Woodworth radius of the shipped HRTF: least-squares fit of its low-band ITD over lateral
# angles (the anatomical 8.75 cm describes onset ITDs; low-frequency ITDs are larger)
HEAD_RADIUS = 0.102


def unit_vector(azimuth_deg, elevation_deg) -> np.ndarray:
    """Unit direction vectors (..., 3) from azimuth/elevation in degrees."""
    az = np.radians(np.asarray(azimuth_deg, dtype=np.float64))
    el = np.radians(np.asarray(elevation_deg, dtype=np.float64))
    return np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=-1)


def to_spherical(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(azimuth deg in (-180, 180], elevation deg, norm) of vectors (..., 3)."""
    v = np.asarray(vectors, dtype=np.float64)
    norm = np.linalg.norm(v, axis=-1)
    safe = np.maximum(norm, 1e-12)
    az = np.degrees(np.arctan2(v[..., 1], v[..., 0]))
    el = np.degrees(np.arcsin(np.clip(v[..., 2] / safe, -1.0, 1.0)))
    return az, el, norm


def head_rotation(yaw_deg, pitch_deg, roll_deg) -> np.ndarray:
    """Head-to-world rotation matrices (..., 3, 3) for yaw/pitch/roll in degrees."""
    y, p, r = (np.radians(np.asarray(a, dtype=np.float64)) for a in (yaw_deg, pitch_deg, roll_deg))
    y, p, r = np.broadcast_arrays(y, p, r)
    cy, sy, cp, sp, cr, sr = np.cos(y), np.sin(y), np.cos(p), np.sin(p), np.cos(r), np.sin(r)
    # Rz(y) @ Ry(-p) @ Rx(r), written out.
    return np.stack([
        np.stack([cy * cp, -sy * cr - cy * sp * sr, sy * sr - cy * sp * cr], -1),
        np.stack([sy * cp, cy * cr - sy * sp * sr, -cy * sr - sy * sp * cr], -1),
        np.stack([sp, cp * sr, cp * cr], -1),
    ], -2)


def rotation_to_ypr(rotation: np.ndarray) -> np.ndarray:
    """Inverse of head_rotation: (..., 3) yaw, pitch, roll in degrees."""
    m = np.asarray(rotation, dtype=np.float64)
    yaw = np.arctan2(m[..., 1, 0], m[..., 0, 0])
    pitch = np.arcsin(np.clip(m[..., 2, 0], -1.0, 1.0))
    roll = np.arctan2(m[..., 2, 1], m[..., 2, 2])
    return np.degrees(np.stack([yaw, pitch, roll], -1))


def quaternion_to_ypr(q) -> np.ndarray:
    """Unit quaternion(s) [w, x, y, z] (head-to-world, our axes) -> yaw, pitch, roll degrees."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    m = np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)
    return rotation_to_ypr(m)


def ypr_to_quaternion(yaw_deg, pitch_deg, roll_deg) -> np.ndarray:
    """Yaw/pitch/roll degrees -> unit quaternion(s) [w, x, y, z] of head_rotation."""
    hy, hp, hr = (np.radians(np.asarray(a, dtype=np.float64)) / 2 for a in (yaw_deg, -np.asarray(pitch_deg), roll_deg))
    cy, sy, cp, sp, cr, sr = np.cos(hy), np.sin(hy), np.cos(hp), np.sin(hp), np.cos(hr), np.sin(hr)
    return np.stack([
        cy * cp * cr + sy * sp * sr,
        cy * cp * sr - sy * sp * cr,
        cy * sp * cr + sy * cp * sr,
        sy * cp * cr - cy * sp * sr,
    ], -1)


def head_relative(world_azimuth, world_elevation, yaw, pitch, roll):
    """Direction of a world-frame source as seen by the head: (azimuth, elevation) degrees."""
    v = unit_vector(world_azimuth, world_elevation)
    rot = head_rotation(yaw, pitch, roll)
    local = np.einsum("...ji,...j->...i", rot, v)
    az, el, _ = to_spherical(local)
    return az, el


def lateral_angle(azimuth_deg, elevation_deg) -> np.ndarray:
    """Angle from the median plane, degrees in [-90, 90] (positive = left): what ITD/ILD can tell."""
    return np.degrees(np.arcsin(np.clip(unit_vector(azimuth_deg, elevation_deg)[..., 1], -1.0, 1.0)))


def woodworth_itd(lateral_deg, head_radius: float, c: float = SPEED_OF_SOUND) -> np.ndarray:
    """Woodworth spherical-head ITD in seconds (positive = left ear leads): (a/c)(theta + sin theta)."""
    th = np.radians(np.asarray(lateral_deg, dtype=np.float64))
    return (head_radius / c) * (th + np.sin(th))


def woodworth_lateral(itd_seconds, head_radius: float, c: float = SPEED_OF_SOUND) -> np.ndarray:
    """Invert woodworth_itd (monotonic on [-90, 90] degrees) by Newton's method; clips beyond +-90."""
    itd = np.asarray(itd_seconds, dtype=np.float64)
    target = np.clip(np.abs(itd) * c / head_radius, 0.0, np.pi / 2 + 1.0)
    theta = target / 2
    for _ in range(30):
        theta = theta - (theta + np.sin(theta) - target) / (1 + np.cos(theta) + 1e-9)
        theta = np.clip(theta, 0.0, np.pi / 2)
    return np.sign(itd) * np.degrees(theta)


class PinholeCamera:
    """The head is the camera: perspective projection of head-relative directions to pixels.

    Pixel coordinates are continuous with (0, 0) at the top-left corner of the top-left pixel;
    u grows to the right, v downward.
    """

    def __init__(self, width: int, height: int, fov_deg: float):
        self.width, self.height, self.fov = width, height, fov_deg
        self.focal = (width / 2) / np.tan(np.radians(fov_deg) / 2)

    def project(self, local_vectors: np.ndarray):
        """(u, v, depth) of head-frame vectors (..., 3); depth <= 0 means behind the camera."""
        v = np.asarray(local_vectors, dtype=np.float64)
        depth = v[..., 0]
        safe = np.where(depth > 1e-9, depth, 1e-9)
        u = self.width / 2 - self.focal * v[..., 1] / safe
        w = self.height / 2 - self.focal * v[..., 2] / safe
        return u, w, depth

    def pixel_rays(self) -> np.ndarray:
        """Unit head-frame rays through every pixel centre, (H, W, 3)."""
        u = np.arange(self.width) + 0.5
        w = np.arange(self.height) + 0.5
        uu, ww = np.meshgrid(u, w)
        rays = np.stack([np.full_like(uu, self.focal), self.width / 2 - uu, self.height / 2 - ww], -1)
        return rays / np.linalg.norm(rays, axis=-1, keepdims=True)


def interpolate_ypr(times_src, ypr_src, times) -> np.ndarray:
    """Linear interpolation of yaw/pitch/roll samples (P, 3) at `times`, unwrapping yaw and roll."""
    ypr = np.asarray(ypr_src, dtype=np.float64).copy()
    for axis in (0, 2):
        ypr[:, axis] = np.degrees(np.unwrap(np.radians(ypr[:, axis])))
    return np.stack([np.interp(times, times_src, ypr[:, k]) for k in range(3)], -1)
