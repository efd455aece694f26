"""Clip folders: write/read, real mp4-only clips, determinism, and clear errors for bad files."""
import json
import shutil

import numpy as np
import pytest

from training.clips import ClipError, read_clip, read_pose
from training.data import WindowDataset, build_dataset, dataset_clips, window_of
from visaudio.cli import main


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_clip_round_trip(clip_dir):
    clip = read_clip(clip_dir)
    meta = json.loads((clip_dir / "meta.json").read_text())
    assert clip.audio.shape == (2, 32000) and clip.audio.dtype == np.float32
    assert clip.frames.shape == (50, 128, 128, 3) and clip.fps == 25.0
    assert clip.pose.shape == (50, 4)
    assert len(meta["frames"]) == 50 and set(meta["frames"][0]["sources"][0]) >= {
        "azimuth", "elevation", "distance", "visible", "active"}
    # the video is H.264: close to, not equal to, the rendered frames; re-render to compare
    from training.render import render_frames
    from training.scene_spec import parse_scene
    frames, pose, _ = render_frames(parse_scene(meta["scene"]))
    assert np.abs(clip.frames.astype(float) - frames).mean() < 4.0
    np.testing.assert_allclose(clip.pose, pose, atol=1e-4)


def test_same_seed_same_bytes(clip_dir, tmp_path):
    again = tmp_path / "again"
    assert main(["scene", "--seed", "5", "--duration", "2", "--out", str(again)]) == 0
    for name in ("clip.mp4", "binaural.wav", "pose.jsonl", "meta.json"):
        assert (again / name).read_bytes() == (clip_dir / name).read_bytes(), name
    other = tmp_path / "other"
    assert main(["scene", "--seed", "6", "--duration", "2", "--out", str(other)]) == 0
    assert (other / "binaural.wav").read_bytes() != (clip_dir / "binaural.wav").read_bytes()


def test_real_clip_with_only_mp4(clip_dir, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    shutil.copy(clip_dir / "clip.mp4", real / "clip.mp4")
    clip = read_clip(real)
    ours = read_clip(clip_dir)
    assert clip.pose is None and clip.meta is None
    assert abs(clip.audio.shape[1] - ours.audio.shape[1]) < 1024
    n = min(clip.audio.shape[1], ours.audio.shape[1])
    # AAC is lossy but aligned: the decoded track correlates with the exact one at lag 0
    a, b = clip.audio[:, :n], ours.audio[:, :n]
    corr = np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b))
    assert corr > 0.9
    w = window_of(clip, 0.5, 1.0)
    assert not w.pose_known and w.frames.shape[0] == 25 and w.audio.shape == (2, 16000)


def test_pose_quaternions_and_errors(tmp_path):
    from engine.geometry import ypr_to_quaternion
    path = tmp_path / "pose.jsonl"
    q = ypr_to_quaternion(30.0, 10.0, -5.0).tolist()
    path.write_text(json.dumps({"t": 0.0, "q": q}) + "\n" + json.dumps({"t": 0.1, "yaw": 1, "pitch": 2, "roll": 3}))
    np.testing.assert_allclose(read_pose(path), [[0.0, 30.0, 10.0, -5.0], [0.1, 1, 2, 3]], atol=1e-9)
    for text, message in [('{"t": 0, "yaw": 1}', "missing pitch"), ('{"t": 0, "q": [1, 0]}', "'q'"),
                          ('{"t": 1, "yaw": 0, "pitch": 0, "roll": 0}\n{"t": 0.5, "yaw": 0, "pitch": 0, "roll": 0}',
                           "increase"), ("not json", "not valid JSON"), ('{"t": 0, "yaw": NaN, "pitch": 0, "roll": 0}',
                                                                         "finite")]:
        path.write_text(text)
        with pytest.raises(ClipError, match=message) as err:
            read_pose(path)
        assert "pose.jsonl" in str(err.value)


@pytest.mark.parametrize("damage,file,message", [
    ("truncate_wav", "binaural.wav", "samples"),
    ("mono_wav", "binaural.wav", "channel"),
    ("rate_wav", "binaural.wav", "sample rate"),
    ("corrupt_mp4", "clip.mp4", "clip.mp4"),
    ("truncate_mp4", "clip.mp4", "clip.mp4"),
    ("bad_meta", "meta.json", "JSON"),
    ("no_mp4", "clip.mp4", "missing"),
])
def test_damaged_clips_name_the_file(clip_dir, tmp_path, damage, file, message):
    import soundfile as sf

    bad = copy(clip_dir, tmp_path / "bad")
    target = bad / file
    if damage == "truncate_wav":
        data, sr = sf.read(target)
        sf.write(target, data[:-500], sr, subtype="FLOAT")
    elif damage == "mono_wav":
        data, sr = sf.read(target)
        sf.write(target, data[:, 0], sr, subtype="FLOAT")
    elif damage == "rate_wav":
        data, sr = sf.read(target)
        sf.write(target, data, 22050, subtype="FLOAT")
    elif damage == "corrupt_mp4":
        target.write_bytes(b"\x00" * 100 + target.read_bytes()[100:2000])
    elif damage == "truncate_mp4":
        target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    elif damage == "bad_meta":
        target.write_text("{oops")
    elif damage == "no_mp4":
        target.unlink()
    with pytest.raises(ClipError) as err:
        read_clip(bad)
    assert file in str(err.value) and message in str(err.value)


def test_dataset_build_resume_and_windows(tmp_path):
    root = tmp_path / "ds"
    build_dataset(root, 2, jobs=1, duration=2.0, progress=False)
    first = (root / "clip_000001" / "binaural.wav").stat().st_mtime_ns
    (root / ".clip_000002.leftover").mkdir()  # an interrupted run's temporary folder
    build_dataset(root, 3, jobs=2, duration=2.0, progress=False)
    assert (root / "clip_000001" / "binaural.wav").stat().st_mtime_ns == first  # kept, not re-rendered
    assert not (root / ".clip_000002.leftover").exists()
    assert [p.name for p in dataset_clips(root)] == ["clip_000000", "clip_000001", "clip_000002"]
    ds = WindowDataset(root, seconds=1.0, hop=0.5)
    assert len(ds) == 3 * 3
    w = ds[4]
    assert w.clip == "clip_000001" and w.start == 0.5
    assert w.frames.shape == (25, 128, 128, 3) and w.audio.shape == (2, 16000) and w.pose.shape == (25, 3)
    assert w.pose_known and len(w.frame_meta) == 25
    clip = read_clip(root / "clip_000001")
    np.testing.assert_array_equal(w.audio, clip.audio[:, 8000:24000])
    np.testing.assert_allclose(w.pose, clip.pose[12:37, 1:], atol=1e-4)
    # an index that lists a missing clip is rejected with the index named
    shutil.rmtree(root / "clip_000002")
    with pytest.raises(ClipError, match="index.json"):
        dataset_clips(root)


def test_folder_of_real_clips_without_index(clip_dir, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        shutil.copy(clip_dir / "clip.mp4", tmp_path / name / "clip.mp4")
    ds = WindowDataset(tmp_path, seconds=1.0)
    assert len(ds) == 4 and not ds[0].pose_known and ds[0].frame_meta is None
