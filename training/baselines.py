"""The two baselines of issue 3, built on the mono model (same backbone, ears = 1, same training budget).

(a) mono copied to both ears.
(b) two-stage: mono generation, then HRTF spatialisation at the direction a visual localiser finds in
    the frames. The localiser is a colour detector for the scene engine's source looks (palette of
    `training.sounds.KINDS`, lit and dimmed): it sees only pixels, never the metadata. The largest
    matching colour class gives the pixel centroid, the pinhole camera turns it into a head-relative
    direction, held while nothing is detected (front before the first detection). Colour classes
    spread over the frame are background, not a source. Known weakness: grey and white looks
    (engine, wind, noise_burst) can still match small patches of mountain, fog or sky.
"""
from __future__ import annotations

import numpy as np

from engine.geometry import PinholeCamera, to_spherical, unit_vector
from training.sounds import KINDS

MATCH_DISTANCE = 24.0  # RGB distance to a palette colour that counts as a match
MIN_PIXELS = 3
MAX_SPREAD = 0.18  # a source blob's pixel spread (std, fraction of the width); larger = background
BLOCK = 64  # samples per direction update of the spatialiser (4 ms, as the scene engine)


def _palette() -> np.ndarray:
    colours = []
    for kind in KINDS.values():
        c = np.array(kind.look.color, dtype=np.float64)
        colours += [c, c * 0.55]  # active and idle shading of the scene engine
    return np.array(colours)


def localise(frames: np.ndarray, fov: float = 90.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame (azimuth, elevation, detected) of the most prominent source-coloured blob."""
    count, height, width, _ = frames.shape
    camera = PinholeCamera(width, height, fov)
    rays = camera.pixel_rays()
    palette = _palette()
    az, el, found = np.zeros(count), np.zeros(count), np.zeros(count, bool)
    last = (0.0, 0.0)
    for f in range(count):
        pix = frames[f].reshape(-1, 3).astype(np.float64)
        dist = np.linalg.norm(pix[:, None, :] - palette[None], axis=-1)  # (P, C)
        nearest, best = dist.argmin(axis=1), dist.min(axis=1)
        hits = best < MATCH_DISTANCE
        counts = np.bincount(nearest[hits] // 2, minlength=len(palette) // 2)
        for cls in np.argsort(counts)[::-1]:
            if counts[cls] < MIN_PIXELS:
                break
            sel = hits & (nearest // 2 == cls)
            spread = np.hypot(*(np.std(np.nonzero(sel.reshape(height, width)), axis=1)))
            if spread <= MAX_SPREAD * width:  # a compact blob, not a stretch of sky or ground
                a, e, _ = to_spherical(rays.reshape(-1, 3)[sel].mean(axis=0))
                last, found[f] = (float(a), float(e)), True
                break
        az[f], el[f] = last
    return az, el, found


def spatialise(mono: np.ndarray, azimuth: np.ndarray, elevation: np.ndarray, fps: float, sample_rate: int) -> np.ndarray:
    """Render a mono signal through the HRTFs at per-frame head-relative directions -> (2, N)."""
    from training.hrtf import load_hrtf
    from training.render import render_path

    n = len(mono)
    blocks = -(-n // BLOCK) + 1  # boundaries of ceil(n / BLOCK) blocks
    t = np.arange(blocks) * BLOCK / sample_rate
    frame = np.clip(np.floor(t * fps).astype(int), 0, len(azimuth) - 1)
    positions = unit_vector(azimuth[frame], elevation[frame])  # 1 m away: unit gain
    return render_path(mono, positions, np.zeros((blocks, 3)), load_hrtf(sample_rate=sample_rate), BLOCK)
