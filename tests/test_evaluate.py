"""The eval's floor: what a renderer that knows everything in a scene but its late tail's noise can
reach on the cue metrics (training.evaluate.median_tail_cues)."""
import pytest

from training.evaluate import EvalScene, another_tail, median_tail_cues, score


def _scene(seed: int, room: bool) -> EvalScene:
    from training.render import render_scene
    from training.sampler import random_scene
    from training.scene_spec import parse_scene

    r = render_scene(parse_scene(random_scene(seed, duration=4.0, num_sources=1, room=room)))
    return EvalScene("single", r.frames, r.pose, r.audio, r.meta, r.spec.fps, r.spec.sample_rate, seed)


def test_the_cue_floor_starts_at_another_tail_and_falls_as_the_median_takes_more_draws():
    """With one draw the floor scores exactly as the reference with another tail does; an anechoic scene
    has no tail and scores 0; and in rooms the median of four draws is nearer the reference's cues than
    one draw is (against an unknown draw the median is the least expected absolute error). A floor that
    scored one draw, or averaged the draws' errors instead of taking the median cue, would fail."""
    scenes = [_scene(seed, room=True) for seed in (1, 5, 6)] + [_scene(2, room=False)]
    floor = median_tail_cues(scenes, 4, progress=False)
    assert [row["tail_draws"] for row in floor.values()] == [1, 2, 4]
    one, four = floor["truth, median cues (tail draws: 1)"], floor["truth, median cues (tail draws: 4)"]
    other = score(another_tail(scenes), scenes)
    for key in ("itd_error_us_in_view", "ild_error_db_in_view", "itd_error_us_direct", "ild_error_db_direct"):
        assert one[key] == pytest.approx(other[key], rel=1e-12)
    anechoic, rooms_one, rooms_four = one["by_acoustics"]["anechoic"], one["by_acoustics"]["room"], four["by_acoustics"]["room"]
    assert anechoic["frames_in_view"] > 0 and anechoic["itd_error_us_in_view"] == 0 and anechoic["ild_error_db_in_view"] == 0
    assert rooms_one["scenes_in_view"] == 3
    assert rooms_four["itd_error_us_in_view"] < 0.95 * rooms_one["itd_error_us_in_view"]
    assert rooms_four["ild_error_db_in_view"] < 0.95 * rooms_one["ild_error_db_in_view"]


def test_eval_floor_only_writes_the_floor_and_refuses_a_negative_draw_count(tmp_path, capsys):
    import json

    from visaudio.cli import main

    assert main(["eval", "--floor-only", "--tail-draws", "-1", "--out", str(tmp_path)]) == 2
    assert "--tail-draws" in capsys.readouterr().err
    # held-out scene 20000 is in a room, 20001 is not
    assert main(["eval", "--floor-only", "--tail-draws", "2", "--scenes", "2", "--seed", "20000", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["scenes"] == {"single": 2, "head_turn": 0}
    rows = list(report["systems"].values())
    assert [r["tail_draws"] for r in rows] == [1, 2]
    assert all(r["by_acoustics"]["room"]["scenes"] == 1 and r["by_acoustics"]["anechoic"]["itd_error_us_in_view"] == 0
               for r in rows)
    assert rows[0]["by_acoustics"]["room"]["itd_error_us_in_view"] > 0
