"""The wire protocol: round trips over real ZeroMQ sockets, and malformed input always named, never a crash."""
import msgpack
import numpy as np
import pytest
import zmq

from realtime.protocol import (ProtocolError, decode_audio, decode_control, decode_frame, decode_pose, encode_audio,
                               encode_control, encode_frame, encode_pose)


def test_frame_pose_audio_round_trip_over_zeromq():
    ctx = zmq.Context.instance()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    for s in (pull, push):
        s.setsockopt(zmq.LINGER, 0)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    pixels = np.random.default_rng(0).integers(0, 256, (128, 96, 3), dtype=np.uint8)
    push.send_multipart(encode_frame(3, 7, 123_456_789, pixels), copy=False)
    frame = decode_frame(pull.recv_multipart(copy=False))
    assert (frame.stream, frame.seq, frame.t_ns) == (3, 7, 123_456_789)
    np.testing.assert_array_equal(frame.pixels, pixels)
    push.send_multipart([encode_pose(3, 8, 5, yaw=30.0, pitch=-5.0, roll=2.0)])
    pose = decode_pose(pull.recv_multipart())
    assert pose.ypr == (30.0, -5.0, 2.0)
    from engine.geometry import ypr_to_quaternion

    push.send_multipart([encode_pose(3, 9, 6, quaternion=ypr_to_quaternion(40.0, 10.0, -20.0))])
    np.testing.assert_allclose(decode_pose(pull.recv_multipart()).ypr, (40.0, 10.0, -20.0), atol=1e-9)
    pcm = np.random.default_rng(1).normal(size=(1280, 2)).astype(np.float32)
    push.send_multipart(encode_audio(3, 1, 99, 16000, pcm), copy=False)
    audio = decode_audio(pull.recv_multipart())
    np.testing.assert_array_equal(audio.pcm, pcm)
    assert decode_control([encode_control("reset", stream=3)])["cmd"] == "reset"
    pull.close()
    push.close()


GOOD_FRAME = encode_frame(0, 0, 0, np.zeros((4, 4, 3), np.uint8))


@pytest.mark.parametrize("parts, field", [
    ([GOOD_FRAME[0]], "expected 2 parts"),
    ([b"\xc1", b""], "not valid msgpack"),
    ([msgpack.packb([1, 2]), b""], "must be a map"),
    ([msgpack.packb({"v": 2, "stream": 0, "seq": 0, "t_ns": 0}), b""], "protocol version"),
    ([msgpack.packb({"v": 1, "stream": -1, "seq": 0, "t_ns": 0}), b""], "frame.stream"),
    ([msgpack.packb({"v": 1, "stream": 0, "seq": 0, "t_ns": 0.5}), b""], "frame.t_ns"),
    ([msgpack.packb({"v": 1, "stream": 0, "seq": 0, "t_ns": 0, "format": "yuv"}), b""], "frame.format"),
    ([msgpack.packb({"v": 1, "stream": 0, "seq": 0, "t_ns": 0, "format": "rgb24", "width": 4, "height": 1e9}),
      b""], "frame.height"),
    ([GOOD_FRAME[0], bytes(47)], "needs 48"),
])
def test_bad_frames_name_the_problem(parts, field):
    with pytest.raises(ProtocolError, match=field):
        decode_frame(parts)


@pytest.mark.parametrize("msg, field", [
    ({"v": 1, "stream": 0, "seq": 0, "t_ns": 0, "yaw": float("nan"), "pitch": 0, "roll": 0}, "pose.yaw"),
    ({"v": 1, "stream": 0, "seq": 0, "t_ns": 0, "yaw": 0, "pitch": 91, "roll": 0}, "pose.pitch"),
    ({"v": 1, "stream": 0, "seq": 0, "t_ns": 0, "yaw": 0, "pitch": 0}, "pose.roll"),
    ({"v": 1, "stream": 0, "seq": 0, "t_ns": 0, "q": [1, 0, 0]}, "pose.q"),
    ({"v": 1, "stream": 0, "seq": 0, "t_ns": 0, "q": [3, 0, 0, 0]}, "unit quaternion"),
    ({"v": 1, "stream": True, "seq": 0, "t_ns": 0, "yaw": 0, "pitch": 0, "roll": 0}, "pose.stream"),
])
def test_bad_poses_name_the_problem(msg, field):
    with pytest.raises(ProtocolError, match=field):
        decode_pose([msgpack.packb(msg)])


def test_ten_thousand_fuzzed_messages_are_all_rejected_cleanly():
    """Random bytes, truncations, bit flips and type swaps of valid messages: every one either decodes
    to a valid message or raises ProtocolError; nothing else escapes."""
    rng = np.random.default_rng(0)
    valid = {"frame": GOOD_FRAME, "pose": [encode_pose(1, 2, 3, 10.0, 0.0, 0.0)],
             "audio": encode_audio(1, 2, 3, 16000, np.zeros((8, 2), np.float32)),
             "control": [encode_control("stats")]}
    decoders = {"frame": decode_frame, "pose": decode_pose, "audio": decode_audio,
                "control": decode_control}
    rejected = 0
    for i in range(10_000):
        kind = list(valid)[i % 4]
        parts = [bytes(p) for p in valid[kind]]
        how = rng.integers(5)
        k = rng.integers(len(parts))
        if how == 0:
            parts[k] = rng.bytes(int(rng.integers(0, 64)))
        elif how == 1:
            parts[k] = parts[k][:int(rng.integers(0, max(1, len(parts[k]))))]
        elif how == 2 and parts[k]:
            b = bytearray(parts[k])
            b[rng.integers(len(b))] ^= 1 << int(rng.integers(8))
            parts[k] = bytes(b)
        elif how == 3:
            parts = parts + [b"extra"] if rng.random() < 0.5 else parts[:-1]
        else:
            head = msgpack.unpackb(parts[0])
            key = list(head)[rng.integers(len(head))]
            head[key] = [None, "x", -1, 1e300, [1, 2], {"a": 1}, True][rng.integers(7)]
            parts[0] = msgpack.packb(head)
        try:
            decoders[kind](parts)
        except ProtocolError:
            rejected += 1
    assert rejected > 8000  # most mutations are invalid, and every invalid one was a ProtocolError
