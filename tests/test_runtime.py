"""The live runtime over real ZeroMQ sockets: live output equals offline rendering, faults are survived."""
import time

import numpy as np

from conftest import LOCAL_RUNTIME as LOCAL, running

def _clip(seconds=1.2, seed=0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (int(seconds * 25), 64, 64, 3), dtype=np.uint8)
    t = np.arange(len(frames)) / 25
    pose = np.column_stack([t, 40 * np.sin(2 * np.pi * t), np.zeros_like(t), np.zeros_like(t)])
    return frames, pose


def _play(client, frames, pose, origin_ns, drop=()):
    """Send a clip in real time (pose with each frame)."""
    start = time.monotonic()
    for i, frame in enumerate(frames):
        time.sleep(max(0.0, start + i / 25 - time.monotonic()))
        t_ns = origin_ns + int(round(pose[i, 0] * 1e9))
        if i not in drop:
            client.send_frame(frame, t_ns)
        client.send_pose(pose[i, 1:], t_ns)


def _collect(client, samples, timeout=5.0):
    chunks, got, t_first = [], 0, None
    deadline = time.monotonic() + timeout
    while got < samples and time.monotonic() < deadline:
        msg = client.receive(200)
        if msg is not None:
            t_first = msg.t_ns if t_first is None else t_first
            chunks.append(msg.pcm)
            got += len(msg.pcm)
    return np.concatenate(chunks)[:samples], t_first


def test_live_output_equals_offline_rendering(live):
    from engine.generate import generate
    from realtime.client import Client

    endpoints, model = live
    frames, pose = _clip()
    offline = generate(model, frames, 25.0, pose, seed=LOCAL.seed + 7)  # stream 7 draws seed + 7
    with Client(stream=7, endpoints=endpoints) as client:
        time.sleep(0.3)  # let the subscription reach the PUB socket
        origin = 10**12
        _play(client, frames, pose, origin)
        audio, t_first = _collect(client, offline.shape[1] + 320)
        stats = client.control("stats")["stats"]
    assert t_first == origin - int(round(320 * 1e9 / 16000))  # the decoder's one-hop lag, stamped
    live_audio = audio[320:].T
    # every hop whose frames and poses all arrived is identical to the offline render
    n = (len(frames) // 2 - 1) * 1280 - 320
    np.testing.assert_allclose(live_audio[:, :n], offline[:, :n], atol=1e-6)
    assert stats["streams"]["7"]["late_frames"] == 0 and stats["rejected_total"] == 0


def test_dropped_frames_and_malformed_messages_are_concealed_and_counted(live):
    import zmq

    from realtime.client import Client

    endpoints, _ = live
    frames, pose = _clip(seconds=1.6, seed=1)
    with Client(stream=1, endpoints=endpoints) as client:
        time.sleep(0.3)
        junk = zmq.Context.instance().socket(zmq.PUSH)
        junk.setsockopt(zmq.LINGER, 0)
        junk.connect(endpoints.frames)
        rng = np.random.default_rng(0)
        for _ in range(200):
            junk.send_multipart([rng.bytes(int(rng.integers(0, 40))) for _ in range(int(rng.integers(1, 4)))])
        drop = set(rng.choice(len(frames), size=len(frames) // 5, replace=False).tolist())  # 20% dropped
        _play(client, frames, pose, 5 * 10**11, drop=drop)
        audio, _ = _collect(client, (len(frames) // 2 - 1) * 1280)
        stats = client.control("stats")["stats"]
        junk.close(0)
    assert len(audio) == (len(frames) // 2 - 1) * 1280  # continuous: every hop came out
    assert np.isfinite(audio).all()
    assert stats["rejected_total"] == 200
    s = stats["streams"]["1"]
    assert s["held_frames"] + s["null_frames"] >= len(drop) - 2  # the last ones may still be pending


def test_stream_cli_plays_files_into_a_wav_and_stops_cleanly_on_sigterm(tiny_models, clip_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import soundfile as sf

    from export.steps import export_engine

    export_engine(tmp_path / "engine", tiny_models["student"])
    out = tmp_path / "live.wav"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "visaudio.cli", "stream", "--engine", str(tmp_path / "engine"),
                             "--backend", "onnxruntime", "--video", str(clip_dir), "--pose", str(clip_dir / "pose.jsonl"),
                             "--out", str(out), "--port", "0", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    time.sleep(6.0)  # start-up, then about two seconds of the clip
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr.decode()
    assert b"stopped:" in stdout
    audio, rate = sf.read(out, always_2d=True)
    assert rate == 16000 and audio.shape[1] == 2 and len(audio) >= 16000  # at least a second came out
    assert len(audio) % 1280 == 0  # whole hops, nothing torn


def test_curve_admits_only_known_clients_and_remote_binds_need_it(tiny_models, tmp_path):
    from dataclasses import replace

    import pytest
    import zmq

    from engine.hop import StreamGenerator
    from engine.model import load_model
    from realtime.client import Client
    from realtime.runtime import Runtime
    from visaudio.cli import main

    for folder, name in (("server", "runtime"), ("allowed", "game"), ("other", "stranger")):
        assert main(["keys", str(tmp_path / folder), name]) == 0
    model, _ = load_model(tiny_models["student"])
    runner = StreamGenerator(model, 4, 1)
    with pytest.raises(ValueError, match="not loopback"):
        Runtime(runner, 16000, replace(LOCAL, frames="tcp://0.0.0.0:*"))
    cfg = replace(LOCAL, curve_secret=str(tmp_path / "server" / "runtime.key_secret"),
                  curve_clients=str(tmp_path / "allowed"))
    with running(Runtime(runner, 16000, cfg, context=zmq.Context())) as (endpoints, _, _):
        server = str(tmp_path / "server" / "runtime.key")
        frame = np.zeros((64, 64, 3), np.uint8)
        with Client(1, endpoints, curve_secret=str(tmp_path / "other" / "stranger.key_secret"), curve_server=server) as bad:
            for i in range(5):
                bad.send_frame(frame, i * 40_000_000)
            time.sleep(0.5)
        with Client(0, endpoints, curve_secret=str(tmp_path / "allowed" / "game.key_secret"), curve_server=server) as good:
            time.sleep(0.3)
            for i in range(6):
                good.send_frame(frame, i * 40_000_000)
            assert good.receive(3000) is not None  # audio comes back, encrypted end to end
            stats = good.control("stats")["stats"]
        assert stats["counts"]["frames"] == 6 and list(stats["streams"]) == ["0"]  # the stranger never got in


def test_stream_cli_captures_a_camera_through_pyav(tiny_models, tmp_path):
    """A real libavdevice capture (FFmpeg's lavfi test source, paced by its `realtime` filter: this
    machine has no camera) -> the runtime -> a WAV; a camera that cannot be opened is refused by name."""
    import re
    import subprocess
    import sys

    import soundfile as sf

    from export.steps import export_engine

    export_engine(tmp_path / "engine", tiny_models["student"])
    out = tmp_path / "camera.wav"
    cmd = [sys.executable, "-m", "visaudio.cli", "stream", "--engine", str(tmp_path / "engine"), "--backend",
           "onnxruntime", "--quiet", "--out", str(out), "--seconds", "4", "--port", "0"]
    done = subprocess.run(cmd + ["--video", "camera:testsrc2=size=320x240:rate=25,realtime", "--camera-format", "lavfi"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    ports = re.findall(r"(?:frames|pose|control|audio) tcp://127\.0\.0\.1:(\d+)", done.stdout)  # --port 0: free ones
    assert len(set(ports)) == 4 and "0" not in ports, done.stdout
    hops = int(re.search(r"stopped: (\d+) hops", done.stdout).group(1))
    concealed = int(re.search(r"concealed frames (\d+)", done.stdout).group(1))
    audio, _ = sf.read(out, always_2d=True)
    assert hops >= 20 and len(audio) == hops * 1280 and np.abs(audio).max() > 0
    assert concealed <= 0.2 * hops * 2, done.stdout  # the camera's frames arrived (2 per 80 ms hop)
    bad = subprocess.run(cmd + ["--video", "camera:/dev/no-such-camera"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "/dev/no-such-camera" in bad.stderr
