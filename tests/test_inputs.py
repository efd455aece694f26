"""Per-stream input assembly: concealment, late/duplicate/out-of-order messages, pose interpolation."""
import numpy as np

from engine.inputs import StreamInputs


def _inputs(**kw):
    return StreamInputs(fps=25.0, latents_per_second=50.0, frame_size=4, hop_frames=2, hop_latents=4, **kw)


def _frame(value):
    return np.full((4, 4, 3), value, np.uint8)


def test_missing_frames_are_held_then_nulled_and_late_ones_dropped():
    s = _inputs(hold_seconds=0.1)
    ns = lambda k: int(k * 40e6)  # noqa: E731  frame k at k / 25 s
    s.add_frame(ns(0), _frame(10))
    s.add_frame(ns(1), _frame(11))
    assert not s.add_frame(ns(1), _frame(99)) and s.stats.duplicate_frames == 1
    frames, present, _, _ = s.take_hop()
    assert frames[:, 0, 0, 0].tolist() == [10, 11] and present.tolist() == [1, 1]
    s.add_frame(ns(3), _frame(13))  # frame 2 never comes
    assert s.complete(1) is False
    frames, present, _, _ = s.take_hop()
    assert frames[:, 0, 0, 0].tolist() == [11, 13] and present.tolist() == [1, 1] and s.stats.held_frames == 1
    assert not s.add_frame(ns(2), _frame(12)) and s.stats.late_frames == 1  # its hop already ran
    frames, present, _, _ = s.take_hop()  # frames 4, 5 missing: 4 is 40 ms after 3 (held), 5 is 80 ms (held)
    assert present.tolist() == [1, 1]
    frames, present, _, _ = s.take_hop()  # 6, 7: more than 100 ms after frame 3: null condition
    assert present.tolist() == [0, 0] and s.stats.null_frames == 2


def test_poses_interpolate_in_any_arrival_order_and_predict_only_when_asked():
    s = _inputs(predict_seconds=0.05)
    s.add_frame(0, _frame(0))  # the origin
    for t, yaw in [(0.08, 40.0), (0.0, 0.0), (0.04, 20.0)]:  # out of order
        s.add_pose(int(t * 1e9), (yaw, 0.0, 0.0))
    assert not s.add_pose(int(0.04 * 1e9), (99.0, 0, 0)) and s.stats.duplicate_poses == 1
    pose, known = s.pose_at(np.array([0.02, 0.06, 0.10, 0.20]))
    np.testing.assert_allclose(pose[:, 0], [10.0, 30.0, 50.0, 65.0], atol=1e-4)  # 500 deg/s, capped at +50 ms
    assert known.all()
    held = _inputs()
    held.add_pose(0, (0.0, 0.0, 0.0))
    held.add_pose(int(0.04e9), (20.0, 0.0, 0.0))
    assert held.pose_at(np.array([0.2]))[0][0, 0] == 20.0
    assert not _inputs().pose_at(np.array([0.0]))[1].any()  # no pose yet: unknown


def test_yaw_interpolates_across_the_wrap():
    s = _inputs()
    s.add_pose(0, (170.0, 0.0, 0.0))
    s.add_pose(int(0.04e9), (-170.0, 0.0, 0.0))
    yaw = s.pose_at(np.array([0.02]))[0][0, 0]
    assert abs(abs(yaw) - 180.0) < 1e-3  # halfway through the short way round, not through 0
