"""Malformed scene files are rejected with the field named, and nothing is written."""
import json

import pytest

from training.scene_spec import SceneSpecError, parse_scene
from visaudio.cli import main

GOOD = {"duration": 1.0, "sources": [{"kind": "bell", "trajectory": [{"t": 0, "azimuth": 10, "distance": 2}]}]}


def with_change(path, value):
    spec = json.loads(json.dumps(GOOD))
    target = spec
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return spec


CASES = [
    (("duration",), KeyError, "duration"),
    (("sources",), KeyError, "sources"),
    (("duration",), "8", "duration"),
    (("duration",), float("nan"), "duration"),
    (("duration",), -1, "duration"),
    (("sample_rate",), 16000.5, "sample_rate"),
    (("frame_size",), [127, 128], "frame_size"),
    (("sources", 0, "kind"), "trumpet", "sources[0].kind"),
    (("sources", 0, "kind"), KeyError, "sources[0].kind"),
    (("sources", 0, "trajectory"), [], "sources[0].trajectory"),
    (("sources", 0, "trajectory", 0, "azimuth"), float("inf"), "sources[0].trajectory[0].azimuth"),
    (("sources", 0, "trajectory", 0, "distance"), 0, "sources[0].trajectory[0].distance"),
    (("sources", 0, "trajectory", 0, "distance"), KeyError, "sources[0].trajectory[0].distance"),
    (("sources", 0, "trajectory"), [{"t": 1, "azimuth": 0, "distance": 1}, {"t": 0.5, "azimuth": 0, "distance": 1}],
     "sources[0].trajectory[1].t"),
    (("sources", 0, "events"), [{"t": 0.5, "duration": 0.3}, {"t": 0.6, "duration": 0.1}], "sources[0].events[1].t"),
    (("sources", 0, "events"), [{"t": 0.5}], "sources[0].events[0].duration"),
    (("sources", 0, "visible"), "yes", "sources[0].visible"),
    (("sources", 0, "wav"), "no_such_file.wav", "sources[0].wav"),
    (("sources", 0, "colour"), "red", "sources[0].colour"),
    (("head",), [{"t": 0, "yaw": 0}, {"t": 0, "yaw": 10}], "head[1].t"),
    (("head",), [{"t": 0, "pitch": 120}], "head[0].pitch"),
    (("room",), {"size": [5, 5], "rt60": 0.3}, "room.size"),
    (("room",), {"size": [5, 5, 3], "rt60": 0.3, "listener": [6, 1, 1]}, "room.listener[0]"),
    (("fov",), None, "fov"),
]


@pytest.mark.parametrize("path,value,field", CASES, ids=[c[2] + "-" + repr(c[1])[:12] for c in CASES])
def test_bad_field_is_named(path, value, field, tmp_path):
    spec = with_change(path, value)
    with pytest.raises(SceneSpecError) as err:
        parse_scene(spec, tmp_path)
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")


def test_cli_rejects_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(with_change(("sources", 0, "wav"), "missing.wav")))
    out = tmp_path / "out"
    assert main(["scene", str(bad), "--out", str(out)]) == 2
    assert "sources[0].wav" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_cli_rejects_invalid_json(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"duration": 1, ')
    assert main(["scene", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_good_spec_round_trips_through_json():
    spec = parse_scene(GOOD)
    assert parse_scene(json.loads(json.dumps(spec.to_json()))) == spec
    assert parse_scene(spec.to_json()) == spec  # plain JSON already (the eval re-renders from clip metadata)
