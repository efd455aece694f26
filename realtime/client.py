"""A client for game engines and capture tools: publish frames and poses, receive binaural audio.

    with Client(stream=0) as client:
        client.send_frame(rgb, t_ns)          # (H, W, 3) uint8, sender clock in integer ns
        client.send_pose((yaw, pitch, roll), t_ns)
        audio = client.receive(timeout_ms=200) # AudioMessage: pcm (n, 2), t_ns of its first sample
        client.control("stats")

Frames go out with a bounded send queue and never block the caller: when the runtime is away, the
oldest queued frames are kept and new ones are dropped (counted in `dropped`), as a live source should.
"""
from __future__ import annotations

import msgpack
import numpy as np
import zmq

from realtime.protocol import AudioMessage, decode_audio, encode_control, encode_frame, encode_pose
from realtime.runtime import RuntimeConfig


class Client:
    def __init__(self, stream: int = 0, endpoints: RuntimeConfig = RuntimeConfig(), context: zmq.Context | None = None,
                 hwm: int = 32, subscribe: bool = True, curve_secret: str | None = None, curve_server: str | None = None):
        """curve_secret: this client's secret certificate; curve_server: the runtime's public certificate
        (both from `visaudio keys`), for a runtime that requires CURVE."""
        self.stream, self.ctx = stream, context or zmq.Context.instance()
        self.curve = None
        if curve_secret or curve_server:
            from zmq.auth import load_certificate

            public, secret = load_certificate(curve_secret)
            server, _ = load_certificate(curve_server)
            self.curve = (public, secret, server)
        self.frames = self._socket(zmq.PUSH, endpoints.frames, hwm)
        self.pose = self._socket(zmq.PUSH, endpoints.pose, 4 * hwm)
        self.audio = self._socket(zmq.SUB, endpoints.audio, 4 * hwm)
        if subscribe:
            self.audio.setsockopt(zmq.SUBSCRIBE, f"audio.{stream}.".encode())
        self.endpoint_control = endpoints.control
        self.frame_seq = self.pose_seq = 0
        self.dropped = 0

    def _socket(self, kind: int, endpoint: str, hwm: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        if self.curve is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self.curve
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM if kind == zmq.PUSH else zmq.RCVHWM, hwm)
        sock.connect(endpoint)
        return sock

    def send_frame(self, pixels: np.ndarray, t_ns: int) -> bool:
        try:
            self.frames.send_multipart(encode_frame(self.stream, self.frame_seq, t_ns, pixels), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.dropped += 1
            return False
        self.frame_seq += 1
        return True

    def send_pose(self, ypr, t_ns: int) -> bool:
        try:
            self.pose.send(encode_pose(self.stream, self.pose_seq, t_ns, *ypr), zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        self.pose_seq += 1
        return True

    def receive(self, timeout_ms: int = 1000) -> AudioMessage | None:
        if not self.audio.poll(timeout_ms):
            return None
        parts = self.audio.recv_multipart()
        return decode_audio(parts[1:])

    def control(self, cmd: str, timeout_ms: int = 2000, **fields) -> dict:
        """One request/reply (a fresh REQ socket each time, so a lost reply never wedges the client)."""
        sock = self._socket(zmq.REQ, self.endpoint_control, 1)
        try:
            sock.send(encode_control(cmd, stream=self.stream, **fields))
            if not sock.poll(timeout_ms):
                raise TimeoutError(f"no reply to {cmd!r} from {self.endpoint_control} in {timeout_ms} ms")
            return msgpack.unpackb(sock.recv(), raw=False)
        finally:
            sock.close(0)

    def close(self) -> None:
        for sock in (self.frames, self.pose, self.audio):
            sock.close(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
