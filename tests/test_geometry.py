import numpy as np
import pytest

from engine.geometry import (PinholeCamera, head_relative, head_rotation, interpolate_ypr, lateral_angle,
                             quaternion_to_ypr, rotation_to_ypr, woodworth_itd, woodworth_lateral,
                             ypr_to_quaternion)


def test_yaw_toward_source_centres_it():
    az, el = head_relative(30.0, 0.0, 30.0, 0.0, 0.0)
    assert az == pytest.approx(0.0, abs=1e-9) and el == pytest.approx(0.0, abs=1e-9)


def test_turning_left_moves_source_right():
    az, _ = head_relative(0.0, 0.0, 40.0, 0.0, 0.0)
    assert az == pytest.approx(-40.0)


def test_pitch_up_lowers_source():
    _, el = head_relative(0.0, 20.0, 0.0, 20.0, 0.0)
    assert el == pytest.approx(0.0, abs=1e-9)
    _, el = head_relative(0.0, 0.0, 0.0, 30.0, 0.0)
    assert el == pytest.approx(-30.0)


def test_roll_left_ear_up():
    # positive roll raises the left ear, so a source on the world's left horizon ends up below it
    _, el = head_relative(90.0, 0.0, 0.0, 0.0, 90.0)
    assert el == pytest.approx(-90.0)


def test_rotation_and_quaternion_round_trip():
    rng = np.random.default_rng(0)
    ypr = np.column_stack([rng.uniform(-180, 180, 50), rng.uniform(-80, 80, 50), rng.uniform(-170, 170, 50)])
    np.testing.assert_allclose(rotation_to_ypr(head_rotation(*ypr.T)), ypr, atol=1e-9)
    np.testing.assert_allclose(quaternion_to_ypr(ypr_to_quaternion(*ypr.T)), ypr, atol=1e-7)
    rot = head_rotation(*ypr.T)
    np.testing.assert_allclose(rot @ np.swapaxes(rot, -1, -2), np.broadcast_to(np.eye(3), rot.shape), atol=1e-12)


def test_woodworth_inverse_and_sign():
    lat = np.linspace(-90, 90, 37)
    np.testing.assert_allclose(woodworth_lateral(woodworth_itd(lat, 0.0875), 0.0875), lat, atol=1e-6)
    assert woodworth_itd(90, 0.0875) == pytest.approx(0.000656, abs=2e-6)  # DESIGN.md: ~0.66 ms
    assert woodworth_itd(30, 0.0875) > 0  # left source: left ear leads


def test_lateral_angle_is_front_back_symmetric():
    assert lateral_angle(30, 0) == pytest.approx(lateral_angle(150, 0))
    assert lateral_angle(-90, 0) == pytest.approx(-90)


def test_camera_projects_left_sources_left():
    cam = PinholeCamera(128, 128, 90.0)
    from engine.geometry import unit_vector
    u, v, depth = cam.project(unit_vector(20.0, 10.0))
    assert u < 64 and v < 64 and depth > 0
    assert u == pytest.approx(64 - 64 * np.tan(np.radians(20)))
    rays = cam.pixel_rays()
    assert rays.shape == (128, 128, 3)
    uu, vv, _ = cam.project(rays[10, 100])
    assert (uu, vv) == (pytest.approx(100.5), pytest.approx(10.5))


def test_interpolate_ypr_unwraps_yaw():
    out = interpolate_ypr([0.0, 1.0], [[170.0, 0, 0], [-170.0, 0, 0]], [0.5])
    assert out[0, 0] == pytest.approx(180.0)
