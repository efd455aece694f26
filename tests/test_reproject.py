"""Late head-rotation correction on known binaural signals."""
import numpy as np

from engine.geometry import HEAD_RADIUS, woodworth_itd
from realtime.reproject import LateRotation


def _binaural(lateral_deg, seconds=1.0, seed=0):
    """Noise with the Woodworth ITD of a source at `lateral_deg` (right ear later for a source on the left)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    x = rng.standard_normal(n + 200)
    shift = woodworth_itd(lateral_deg, HEAD_RADIUS) * 16000
    t = np.arange(n) + 100
    right = np.interp(t - shift, np.arange(n + 200), x)
    return np.stack([x[100:100 + n], right], 1).astype(np.float32)


def _run(signal, yaw_change, block=80):
    rot = LateRotation()
    out = np.concatenate([rot.process(signal[i:i + block], yaw_change(i)) for i in range(0, len(signal), block)])
    return out, rot


def test_turning_toward_a_source_centres_it_and_away_moves_it_aside():
    signal = _binaural(30.0)
    probe = LateRotation()
    assert abs(probe.measure_lateral(signal[-1024:].astype(np.float64)) - 30.0) < 3.0
    for change, expected in ((30.0, 0.0), (-30.0, 60.0), (0.0, 30.0)):
        out, _ = _run(signal, lambda i: change)
        measured = LateRotation().measure_lateral(out[-1024:].astype(np.float64))
        assert abs(measured - expected) < 4.0, (change, measured)


def test_level_follows_the_turn_and_delay_changes_are_smooth():
    signal = _binaural(0.0, seconds=2.0)
    out, _ = _run(signal, lambda i: 0.0 if i < 16000 else 60.0)  # head turns 60 deg left: source goes right
    left, right = (np.sqrt(np.mean(out[-8000:, e] ** 2)) for e in (0, 1))
    assert right > left * 1.3  # ILD toward the right ear
    jumps = np.abs(np.diff(out, axis=0)).max(axis=0)
    steady = np.abs(np.diff(out[:15000], axis=0)).max(axis=0)
    assert (jumps <= 1.5 * steady + 1e-6).all()  # no click where the correction switched on
