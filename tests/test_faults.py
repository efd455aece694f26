"""Fault injection over real sockets: every case keeps the output continuous and loses nothing accepted."""
import threading
import time

import msgpack
import numpy as np
import zmq

from realtime.client import Client
from realtime.protocol import encode_frame, encode_pose

from test_runtime import _clip, _collect


def _junk_sender(endpoint, count, done, kind):
    sock = zmq.Context.instance().socket(zmq.PUSH if kind != "control" else zmq.REQ)
    sock.setsockopt(zmq.LINGER, 10_000)  # deliver everything queued before closing
    sock.connect(endpoint)
    rng = np.random.default_rng(kind.__hash__() % 1000)
    good = {"frames": encode_frame(0, 0, 0, np.zeros((64, 64, 3), np.uint8)),
            "pose": [encode_pose(0, 0, 0, 1.0, 0.0, 0.0)]}
    for i in range(count):
        if kind == "control":
            sock.send(rng.bytes(int(rng.integers(0, 30))))
            sock.recv()  # the runtime answers every request, malformed or not
            continue
        parts = [bytes(p) for p in good[kind]]
        if i % 2:
            parts[0] = rng.bytes(int(rng.integers(1, 30)))
        else:
            head = msgpack.unpackb(parts[0])
            head[list(head)[int(rng.integers(len(head)))]] = [None, "x", 1e300, [1]][int(rng.integers(4))]  # never valid
            parts[0] = msgpack.packb(head)
        sock.send_multipart(parts)
        if i % 500 == 0:
            time.sleep(0.01)
    sock.close()
    done.set()


def test_ten_thousand_malformed_messages_leave_the_audio_untouched(live):
    """10,000 malformed frames, poses and control requests while a stream plays: all rejected and counted,
    and the stream's audio is sample for sample what the same inputs give offline."""
    from engine.generate import generate

    endpoints, model = live
    frames, pose = _clip(seconds=1.6, seed=2)
    offline = generate(model, frames, 25.0, pose, seed=3)
    done = [threading.Event() for _ in range(3)]
    senders = [threading.Thread(target=_junk_sender, args=(getattr(endpoints, k), n, d, k), daemon=True)
               for k, n, d in (("frames", 4500, done[0]), ("pose", 4500, done[1]), ("control", 1000, done[2]))]
    with Client(stream=3, endpoints=endpoints) as client:
        time.sleep(0.3)
        for s in senders:
            s.start()
        start = time.monotonic()
        for i, frame in enumerate(frames):
            time.sleep(max(0.0, start + i / 25 - time.monotonic()))
            client.send_frame(frame, int(round(pose[i, 0] * 1e9)))
            client.send_pose(pose[i, 1:], int(round(pose[i, 0] * 1e9)))
        audio, _ = _collect(client, offline.shape[1] + 320)
        for d in done:
            assert d.wait(30)
        deadline = time.monotonic() + 20  # queued junk may still be in flight: wait until it is all counted
        while (stats := client.control("stats")["stats"])["rejected_total"] < 10_000 and time.monotonic() < deadline:
            time.sleep(0.1)
    n = (len(frames) // 2 - 1) * 1280 - 320
    np.testing.assert_allclose(audio[320:].T[:, :n], offline[:, :n], atol=1e-6)
    assert stats["rejected_total"] == 10_000, stats
    assert stats["streams"]["3"]["late_frames"] == 0


def test_bursts_duplicates_reordering_drops_and_a_restarted_producer(live):
    endpoints, _ = live
    frames, pose = _clip(seconds=2.4, seed=4)
    rng = np.random.default_rng(0)
    order = np.arange(len(frames))
    for i in range(0, len(order) - 1, 5):  # swap neighbours: reordered frames
        order[i], order[i + 1] = order[i + 1], order[i]
    with Client(stream=9, endpoints=endpoints) as client:
        time.sleep(0.3)
        start = time.monotonic()
        for step, i in enumerate(order):
            time.sleep(max(0.0, start + step / 25 - time.monotonic()))
            t_ns = int(round(i / 25 * 1e9))
            if 20 <= step < 30:  # the producer "dies" for 0.4 s, then comes back with the same clock
                continue
            if rng.random() >= 0.2:  # 20% of frames dropped
                client.send_frame(frames[i], t_ns)
                if rng.random() < 0.2:
                    client.send_frame(frames[i], t_ns)  # duplicated
            for k in range(8):  # 200 Hz pose bursts, some duplicated
                t = t_ns + k * 5_000_000
                client.send_pose((float(10 * np.sin(t / 1e9)), 0.0, 0.0), t)
                if k == 3:
                    client.send_pose((float(10 * np.sin(t / 1e9)), 0.0, 0.0), t)
        hops = len(frames) // 2 - 1
        audio, _ = _collect(client, hops * 1280)
        stats = client.control("stats")["stats"]
    s = stats["streams"]["9"]
    assert len(audio) == hops * 1280 and np.isfinite(audio).all()  # continuous: every hop came out
    assert s["duplicate_frames"] > 0 and s["duplicate_poses"] > 0 and s["held_frames"] > 0
    assert stats["rejected_total"] == 0


def test_a_producer_with_a_new_clock_restarts_its_stream(live):
    endpoints, _ = live
    frames, pose = _clip(seconds=0.8, seed=5)
    with Client(stream=4, endpoints=endpoints) as client:
        time.sleep(0.3)
        for origin in (50 * 10**9, 10**9):  # second run: the sender's clock went back by 49 s
            start = time.monotonic()
            for i, frame in enumerate(frames):
                time.sleep(max(0.0, start + i / 25 - time.monotonic()))
                client.send_frame(frame, origin + int(i * 40e6))
                client.send_pose(pose[i, 1:], origin + int(i * 40e6))
        time.sleep(0.4)
        stats = client.control("stats")["stats"]
    assert stats["counts"]["stream restarts"] == 1 and stats["streams"]["4"]["late_frames"] == 0


def _delayed_runner(tiny_models, delay):
    """The tiny student's torch runner (hop 4, batch 1) that sleeps delay(call, hop_seconds) before each
    hop; runner.compute_seconds lists what each hop took without the sleep."""
    from engine.hop import StreamGenerator
    from engine.model import load_model

    model, _ = load_model(tiny_models["student"])
    runner = StreamGenerator(model, 4, 1)
    original, calls, hop_seconds = runner.hop, [0], runner.g.samples / 16000

    def delayed_hop(*args, **kwargs):
        calls[0] += 1
        time.sleep(delay(calls[0], hop_seconds))
        began = time.monotonic()
        try:
            return original(*args, **kwargs)
        finally:
            runner.compute_seconds.append(time.monotonic() - began)

    runner.hop, runner.compute_seconds = delayed_hop, []
    return runner


def test_a_500_ms_engine_stall_is_survived_and_caught_up(tiny_models):
    """One hop takes 500 ms: the runtime counts the miss, runs the hops that fell due, and the stream's
    output has no hole."""
    from realtime.runtime import Runtime

    from conftest import LOCAL_RUNTIME, running

    runner = _delayed_runner(tiny_models, lambda call, hop_seconds: 0.5 if call == 5 else 0.0)
    runtime = Runtime(runner, 16000, LOCAL_RUNTIME)
    with running(runtime) as (endpoints, _, _):
        frames, pose = _clip(seconds=1.6, seed=6)
        with Client(stream=0, endpoints=endpoints) as client:
            time.sleep(0.3)
            start = time.monotonic()
            for i, frame in enumerate(frames):
                time.sleep(max(0.0, start + i / 25 - time.monotonic()))
                client.send_frame(frame, int(i * 40e6))
                client.send_pose(pose[i, 1:], int(i * 40e6))
            hops = len(frames) // 2 - 1
            audio, _ = _collect(client, hops * 1280)
            stats = client.control("stats")["stats"]
    assert len(audio) == hops * 1280  # nothing lost
    # the stall is a miss; so is any hop the loaded host made slower than real time by itself (a CI run
    # counted 2), and the runtime times a little more than the hop call
    hop = runner.g.samples / 16000
    slow = np.array(runner.compute_seconds)
    assert 1 + np.sum(slow > hop) <= stats["counts"]["deadline misses"] <= 1 + np.sum(slow > 0.7 * hop), slow
    assert stats["streams"]["0"]["late_frames"] == 0
    # each miss is dated on the runtime's clock (monotonic), for benches to place it in a run
    missed, compute_ms = np.array(runtime.missed).T
    missed = missed / 1e9
    assert len(missed) >= stats["counts"]["deadline misses"]
    stall = (missed > start + 0.5) & (missed < start + 2.0) & (compute_ms >= 500)
    assert np.all(missed > start) and stall.sum() == 1, (missed - start, compute_ms)


def test_an_engine_slower_than_real_time_still_stops_when_asked(tiny_models):
    """Every hop takes 1.5 hops of time and the clocked output is always dry, so a hop is always due:
    the loop keeps answering control requests and returns soon after it is told to stop."""
    from realtime.runtime import Runtime

    from conftest import LOCAL_RUNTIME, running

    class DryOutput:
        def __call__(self, *hop):
            pass

        def slack(self):
            return 0.0

    runner = _delayed_runner(tiny_models, lambda call, hop_seconds: 1.5 * hop_seconds)
    with running(Runtime(runner, 16000, LOCAL_RUNTIME, [DryOutput()])) as (endpoints, stop, thread):
        frames, pose = _clip(seconds=0.4, seed=7)
        with Client(stream=0, endpoints=endpoints) as client:
            client.send_frame(frames[0], 0)
            time.sleep(1.0)
            stats = client.control("stats")["stats"]
        stop.set()
        thread.join(timeout=2.0)
        assert not thread.is_alive(), "the loop did not return within 2 s of being stopped"
    assert stats["counts"]["deadline misses"] >= 3
