"""The eval's floor: what a renderer that knows everything in a scene but its late tail's noise (and
its sources' exact waveforms) can reach on the cue metrics (training.evaluate.cue_floor)."""
import numpy as np
import pytest

from training.evaluate import EvalScene, another_tail, cue_floor, score


def _scene(seed: int, room: bool) -> EvalScene:
    from training.render import render_scene
    from training.sampler import random_scene
    from training.scene_spec import parse_scene

    r = render_scene(parse_scene(random_scene(seed, duration=4.0, num_sources=1, room=room)))
    return EvalScene("single", r.frames, r.pose, r.audio, r.meta, r.spec.fps, r.spec.sample_rate, seed)


def _row(floor: dict, draws: int, estimate: str) -> dict:
    (row,) = [r for r in floor.values() if r["draws"] == draws and r["estimate"] == estimate]
    return row


def test_the_cue_floor_is_bracketed_and_its_over_estimate_falls_as_the_median_takes_more_draws():
    """With one draw the over-estimate scores exactly as the reference with another tail does, and the
    lower bound (the median of the reference and that draw: their midpoint where both sound, the
    reference where only it does) at most half of it, and nearly half in rooms (a tail seldom silences a
    frame or band); an
    anechoic scene has no tail and scores 0; in rooms the median of four draws is nearer the
    reference's cues than one draw is (against an unknown draw the median is the least expected
    absolute error), and the lower bound stays below the over-estimate. A floor that scored one draw,
    averaged the draws' errors instead of taking the median cue, or left the reference out of the
    lower bound's median would fail."""
    scenes = [_scene(seed, room=True) for seed in (1, 5, 6)] + [_scene(2, room=False)]
    floor = cue_floor(scenes, 4, progress=False)
    assert sorted({row["draws"] for row in floor.values()}) == [1, 2, 4]
    assert not any(row["sound_redrawn"] for row in floor.values())
    one, four = _row(floor, 1, "over-estimate"), _row(floor, 4, "over-estimate")
    other = score(another_tail(scenes), scenes)
    for key in ("itd_error_us_in_view", "ild_error_db_in_view", "itd_error_us_direct", "ild_error_db_direct"):
        assert one[key] == pytest.approx(other[key], rel=1e-12)
        assert 0.8 * one[key] / 2 <= _row(floor, 1, "lower bound")[key] <= one[key] / 2 + 1e-9
    anechoic, rooms_one, rooms_four = one["by_acoustics"]["anechoic"], one["by_acoustics"]["room"], four["by_acoustics"]["room"]
    assert anechoic["frames_in_view"] > 0 and anechoic["itd_error_us_in_view"] == 0 and anechoic["ild_error_db_in_view"] == 0
    assert rooms_one["scenes_in_view"] == 3
    assert rooms_four["itd_error_us_in_view"] < 0.95 * rooms_one["itd_error_us_in_view"]
    assert rooms_four["ild_error_db_in_view"] < 0.95 * rooms_one["ild_error_db_in_view"]
    for k in (2, 4):
        lower = _row(floor, k, "lower bound")["by_acoustics"]["room"]
        over = _row(floor, k, "over-estimate")["by_acoustics"]["room"]
        assert lower["itd_error_us_in_view"] < over["itd_error_us_in_view"]
        assert lower["ild_error_db_in_view"] < over["ild_error_db_in_view"]


def test_a_sound_draw_is_another_instance_of_the_same_sound_on_the_same_path():
    """sound_draw 0 is the reference to the bit; another draw is another waveform, silent where the
    reference's events are (same kind, events and gain), at the same level, and in an anechoic scene
    at the same place: its per-frame ITD stays within a few microseconds, so the anechoic floor with
    the sound redrawn is small but not 0."""
    from training.render import render_audio
    from training.scene_spec import parse_scene

    scene = _scene(2, room=False)
    spec = parse_scene(scene.meta["scene"])
    reference = render_audio(spec)
    assert np.array_equal(render_audio(spec, sound_draw=0), reference)
    other = render_audio(spec, sound_draw=1)
    assert not np.allclose(other, reference)
    silent = np.abs(reference).max(axis=0) == 0
    assert silent.any() and np.all(other[:, silent] == 0)
    level = lambda x: 10 * np.log10(np.mean(x ** 2))
    assert abs(level(other) - level(reference)) < 1.0
    anechoic = _row(cue_floor([scene], 2, sound=True, progress=False), 2, "over-estimate")
    assert anechoic["sound_redrawn"]
    assert 0 < anechoic["itd_error_us_in_view"] < 10


def test_eval_floor_only_writes_the_floor_and_refuses_bad_counts(tmp_path, capsys):
    import json

    from visaudio.cli import main

    assert main(["eval", "--floor-only", "--tail-draws", "-1", "--out", str(tmp_path)]) == 2
    assert "--tail-draws" in capsys.readouterr().err
    assert main(["eval", "--floor-only", "--tail-draws", "2", "--jobs", "0", "--out", str(tmp_path)]) == 2
    assert "--jobs" in capsys.readouterr().err
    # held-out scene 20000 is in a room, 20001 is not; two processes render the draws
    assert main(["eval", "--floor-only", "--tail-draws", "2", "--scenes", "2", "--seed", "20000", "--jobs", "2",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["scenes"] == {"single": 2, "head_turn": 0}
    rows = list(report["systems"].values())
    assert [(r["draws"], r["estimate"]) for r in rows] == [(1, "over-estimate"), (1, "lower bound"),
                                                           (2, "over-estimate"), (2, "lower bound")]
    assert all(r["by_acoustics"]["room"]["scenes"] == 1 and r["by_acoustics"]["anechoic"]["itd_error_us_in_view"] == 0
               for r in rows)
    assert rows[0]["by_acoustics"]["room"]["itd_error_us_in_view"] > 0
