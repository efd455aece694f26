"""The live runtime: frames and poses in over ZeroMQ, the hop scheduler, binaural audio out.

One loop (no locks): poll the sockets until the next hop is due, route every message to its stream's
`StreamInputs` (engine/inputs.py, the same assembly offline rendering uses), and run a hop for all
streams at once through the batched engine when each active stream either has all the hop's frames
or has reached its deadline (the hop's media end on the local clock + `max_wait_ms`; missing frames
are then concealed). Output goes to sinks: the audio PUB socket always, plus files or headphones.

Streams: the `stream` id of every message keys its state; a new id takes a free slot of the batch
(its engine state reset), `stop` frees it. A stream whose sender clock jumps back by more than
`restart_seconds` (a restarted producer) starts over. Malformed messages are counted by reason and
dropped; nothing a peer sends can stop the loop. Sockets: bounded HWMs, LINGER 0, MAXMSGSIZE; bind to
loopback by default (docs/PROTOCOL.md).
"""
from __future__ import annotations

import gc
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import zmq

from engine.config import JsonConfig
from engine.hop import HopRunner
from engine.inputs import StreamInputs
from realtime.protocol import ProtocolError, decode_control, decode_frame, decode_pose, encode_audio

# (stream, t_ns of the first sample, pcm (n, 2) float32, the hop's head yaw per latent or None); a sink
# may also have on_pose(stream, yaw) (called with every pose received) and close()
CLOCK_SAFETY_SECONDS = 0.010  # a hop forced by the output clock completes this long before the output runs dry
Sink = Callable[[int, int, np.ndarray, np.ndarray | None], None]


@dataclass(frozen=True)
class RuntimeConfig(JsonConfig):
    frames: str = "tcp://127.0.0.1:5560"  # PULL: [header, pixels] from producers (PUSH)
    pose: str = "tcp://127.0.0.1:5561"  # PULL: pose messages, drained to the newest each loop
    control: str = "tcp://127.0.0.1:5562"  # REP: start, stop, reset, stats, config
    audio: str = "tcp://127.0.0.1:5563"  # PUB: [topic, header, pcm] per stream and hop
    seed: int = 0  # stream s draws its noise from seed + s (same samples as `visaudio render --seed`)
    max_wait_ms: float = 20.0  # a hop waits this long past its media end for late frames, then conceals
    hold_seconds: float = 0.5  # a missing frame is replaced by the newest one at most this old, else null
    predict_ms: float = 60.0  # head pose extrapolated at most this far past the newest pose
    restart_seconds: float = 2.0  # frames this far behind their stream's timeline restart it
    hwm: int = 64  # messages queued per socket before ZeroMQ drops (PUB) or blocks the sender (PUSH)
    max_message_bytes: int = 64 << 20  # a 4096 x 4096 rgb24 frame is 48 MiB
    # CURVE (docs/PROTOCOL.md#security): the runtime's secret certificate and a folder of the public
    # certificates of the clients allowed in (`visaudio keys`). Required to bind beyond loopback.
    curve_secret: str = ""
    curve_clients: str = ""

    @classmethod
    def loopback(cls, port: int = 0, **options) -> "RuntimeConfig":
        """The four endpoints on 127.0.0.1 at ports port..port+3 (frames, pose, control, audio); port 0:
        free ports, which Runtime.endpoints() tells."""
        return cls(**{name: f"tcp://127.0.0.1:{port + i if port else '*'}"
                      for i, name in enumerate(("frames", "pose", "control", "audio"))}, **options)


class Runtime:
    def __init__(self, runner: HopRunner, sample_rate: int, cfg: RuntimeConfig = RuntimeConfig(),
                 sinks: list[Sink] = (), context: zmq.Context | None = None, clock=time.monotonic_ns):
        self.runner, self.g, self.cfg, self.clock = runner, runner.g, cfg, clock
        sys.setswitchinterval(0.001)  # other Python threads (the headphone feeder) wait ~1 ms for the GIL
        self.sample_rate = sample_rate
        self.hop_seconds = self.g.samples / sample_rate
        self.sinks = list(sinks)
        self.ctx = context or zmq.Context.instance()
        self.authenticator = self._secure() if cfg.curve_secret else None
        for name in ("frames", "pose", "control", "audio"):
            host = getattr(cfg, name).split("://", 1)[-1].rsplit(":", 1)[0]
            if not cfg.curve_secret and host not in ("127.0.0.1", "localhost", "[::1]", "::1") \
                    and not getattr(cfg, name).startswith(("ipc://", "inproc://")):
                raise ValueError(f"{name} endpoint {getattr(cfg, name)} is not loopback: set curve_secret and "
                                 f"curve_clients (visaudio keys) to accept remote peers")
        self.sockets = {name: self._socket(kind, getattr(cfg, name)) for name, kind in
                        (("frames", zmq.PULL), ("pose", zmq.PULL), ("control", zmq.REP), ("audio", zmq.PUB))}
        self.poller = zmq.Poller()
        for name in ("frames", "pose", "control"):
            self.poller.register(self.sockets[name], zmq.POLLIN)
        self.state = runner.init_state()
        self.slots: dict[int, int] = {}  # stream id -> batch slot
        self.inputs: list[StreamInputs | None] = [None] * self.g.batch
        self.noise: list[torch.Generator | None] = [None] * self.g.batch
        self.offset_ns: list[int | None] = [None] * self.g.batch  # local - sender clock (min over frames)
        self.seq = [0] * self.g.batch
        self.rejected: Counter = Counter()
        self.counts: Counter = Counter()
        self.hop_ms: deque = deque(maxlen=2000)
        self.compute_ms = 0.75 * self.hop_seconds * 1e3  # p95 of hop_ms once there are 10, for clock deadlines
        self.latency_ms: deque = deque(maxlen=2000)  # last input of a complete hop received -> its audio sent
        self.missed: deque = deque(maxlen=2000)  # (clock() when it finished, compute ms) of the last deadline misses
        self.last_arrival: list[int] = [0] * self.g.batch
        self.started_ns = clock()
        # What startup allocated (torch, onnxruntime, the engine: ~180k objects) leaves the cyclic
        # collector's view: a full collection over it held the GIL for ~100 ms, stopping the headphone
        # feeder and callback for longer than the device ring lasts (measured with gc.callbacks).
        gc.collect()
        gc.freeze()

    def _secure(self):
        """A ZAP authenticator admitting only the clients whose public certificates are in curve_clients."""
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        if not self.cfg.curve_clients:
            raise ValueError("curve_secret needs curve_clients: a folder of the allowed clients' public certificates")
        self.curve_public, self.curve_secret = zmq.auth.load_certificate(self.cfg.curve_secret)
        if self.curve_secret is None:
            raise ValueError(f"{self.cfg.curve_secret}: not a secret certificate")
        authenticator = ThreadAuthenticator(self.ctx)
        authenticator.start()
        authenticator.configure_curve(domain="*", location=self.cfg.curve_clients)
        return authenticator

    def _socket(self, kind: int, endpoint: str) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        if self.authenticator is not None:
            sock.curve_secretkey, sock.curve_publickey, sock.curve_server = self.curve_secret, self.curve_public, True
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.cfg.max_message_bytes)
        sock.setsockopt(zmq.RCVHWM if kind != zmq.PUB else zmq.SNDHWM, self.cfg.hwm)
        sock.bind(endpoint)
        return sock

    # ----------------------------------------------------------------------------------- streams
    def _slot(self, stream: int) -> int | None:
        slot = self.slots.get(stream)
        if slot is not None:
            return slot
        free = [i for i in range(self.g.batch) if self.inputs[i] is None]
        if not free:
            self.rejected["no free stream slot"] += 1
            return None
        slot = free[0]
        self._open(stream, slot)
        return slot

    def _open(self, stream: int, slot: int) -> None:
        g = self.g
        self.slots[stream] = slot
        self.inputs[slot] = StreamInputs(self.sample_rate / g.vae_hop / g.latents_per_frame,
                                         self.sample_rate / g.vae_hop, g.frame_size, g.hop_frames, g.hop,
                                         hold_seconds=self.cfg.hold_seconds,
                                         predict_seconds=self.cfg.predict_ms / 1e3)
        self.noise[slot] = torch.Generator().manual_seed(self.cfg.seed + stream)
        self.offset_ns[slot], self.seq[slot] = None, 0
        mask = torch.zeros(g.batch, dtype=torch.bool)
        mask[slot] = True
        self.state.reset(mask)
        self.counts["streams opened"] += 1

    def _close(self, stream: int) -> None:
        slot = self.slots.pop(stream, None)
        if slot is not None:
            self.inputs[slot] = None

    # ----------------------------------------------------------------------------------- input
    def _on_frame(self, parts) -> None:
        msg = decode_frame(parts)
        now = self.clock()
        slot = self._slot(msg.stream)
        if slot is None:
            return
        inputs = self.inputs[slot]
        if inputs.origin_ns is not None:
            behind = inputs.next_hop * self.hop_seconds - (msg.t_ns - inputs.origin_ns) / 1e9
            if behind > self.cfg.restart_seconds:  # the producer restarted with a new clock
                self.counts["stream restarts"] += 1
                self._open(msg.stream, slot)
                inputs = self.inputs[slot]
        offset = now - msg.t_ns
        self.offset_ns[slot] = offset if self.offset_ns[slot] is None else min(self.offset_ns[slot], offset)
        inputs.add_frame(msg.t_ns, msg.pixels)
        self.last_arrival[slot] = now
        self.counts["frames"] += 1

    def _on_pose(self, parts) -> None:
        msg = decode_pose(parts)
        slot = self._slot(msg.stream)
        if slot is not None:
            self.inputs[slot].add_pose(msg.t_ns, msg.ypr)
            self.last_arrival[slot] = self.clock()
            self.counts["poses"] += 1
            for sink in self.sinks:
                if hasattr(sink, "on_pose"):
                    sink.on_pose(msg.stream, msg.ypr[0])

    def _on_control(self, parts) -> dict:
        try:
            msg = decode_control(parts)
        except ProtocolError as exc:
            self.rejected[str(exc).split(":")[0]] += 1
            return {"ok": False, "error": str(exc)}
        cmd, stream = msg["cmd"], msg.get("stream", 0)
        if cmd == "stats":
            return {"ok": True, "stats": self.stats()}
        if cmd == "config":
            return {"ok": True, "config": self.cfg.to_json(), "batch": self.g.batch, "hop_seconds": self.hop_seconds,
                    "sample_rate": self.sample_rate}
        if cmd == "start":
            return {"ok": self._slot(stream) is not None}
        if cmd == "stop":
            self._close(stream)
            return {"ok": True}
        slot = self.slots.get(stream)  # reset
        if slot is not None:
            self._open(stream, slot)
        return {"ok": True}

    def _drain(self, name: str, handler) -> None:
        sock = self.sockets[name]
        while True:
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handler(parts)
            except ValueError as exc:  # ProtocolError, or a frame size the engine cannot take
                self.rejected[str(exc).split(":")[0][:80]] += 1

    # ----------------------------------------------------------------------------------- hops
    def _deadline(self, slot: int) -> float:
        inputs, offset = self.inputs[slot], self.offset_ns[slot]
        if inputs.origin_ns is None or offset is None:
            return float("inf")
        media_end_ns = (inputs.next_hop + 1) * self.hop_seconds * 1e9
        return inputs.origin_ns + offset + media_end_ns + self.cfg.max_wait_ms * 1e6

    def next_due(self) -> float | None:
        """Local time (ns) at which the next hop must run, or None without active streams; -inf = now.

        A hop runs as soon as every active stream has its inputs. Otherwise it waits for late frames
        until its deadline: with a clocked output (a sink with `slack()`, the headphones) the audio
        clock is the master, so the last moment the hop can still be computed before the output runs
        dry; without one, the hop's media end on the local clock + max_wait_ms."""
        active = [i for i, s in enumerate(self.inputs) if s is not None and s.origin_ns is not None]
        if not active:
            return None
        if all(self.inputs[i].complete(self.inputs[i].next_hop) for i in active):
            return -np.inf
        slack = [s.slack() for s in self.sinks if hasattr(s, "slack")]
        slack = [x for x in slack if x is not None]
        if slack:
            return self.clock() + (min(slack) - self.compute_ms / 1e3 - CLOCK_SAFETY_SECONDS) * 1e9
        return min(self._deadline(i) for i in active)

    def run_hop(self) -> None:
        g = self.g
        started = self.clock()
        frames = np.zeros((g.batch, g.hop_frames, g.frame_size, g.frame_size, 3), np.uint8)
        present = np.zeros((g.batch, g.hop_frames), np.float32)
        pose = np.zeros((g.batch, g.hop, 3), np.float32)
        pose_present = np.zeros((g.batch, g.hop), np.float32)
        noise = torch.zeros(g.batch, g.ears, g.hop, g.latent_dim)
        hops = {}
        for slot, inputs in enumerate(self.inputs):
            if inputs is None or inputs.origin_ns is None:
                continue
            hops[slot] = (inputs.next_hop, inputs.complete(inputs.next_hop))
            frames[slot], present[slot], pose[slot], pose_present[slot] = inputs.take_hop()
            noise[slot] = torch.randn(g.ears, g.hop, g.latent_dim, generator=self.noise[slot])
        device = self.runner.device
        audio = self.runner.hop(self.state, torch.from_numpy(frames).to(device), torch.from_numpy(present).to(device),
                                torch.from_numpy(pose).to(device), torch.from_numpy(pose_present).to(device),
                                noise.to(device)).cpu().numpy()
        done = self.clock()
        self.hop_ms.append((done - started) / 1e6)
        if len(self.hop_ms) >= 10:  # once per hop, not on every poll
            self.compute_ms = float(np.percentile(self.hop_ms, 95))
        self.counts["hops"] += 1
        if done - started > self.hop_seconds * 1e9:  # slower than real time: the output will fall behind
            self.counts["deadline misses"] += 1
            self.missed.append((done, (done - started) / 1e6))
        streams = {slot: stream for stream, slot in self.slots.items()}
        for slot, (hop, complete) in hops.items():
            stream, inputs = streams[slot], self.inputs[slot]
            # sample 0 of hop 0 is media time -vae_hop (the decoder's one-hop lag)
            t_ns = inputs.origin_ns + int(round((hop * g.samples - g.vae_hop) * 1e9 / self.sample_rate))
            pcm = np.ascontiguousarray(audio[slot].T)
            self.sockets["audio"].send_multipart([f"audio.{stream}.".encode(),
                                                  *encode_audio(stream, self.seq[slot], t_ns, self.sample_rate, pcm)],
                                                 copy=False)
            self.seq[slot] += 1
            yaw = pose[slot, :, 0] if pose_present[slot].any() else None
            for sink in self.sinks:
                sink(stream, t_ns, pcm, yaw)
            if complete:  # concealed hops did not wait for a frame
                self.latency_ms.append((self.clock() - self.last_arrival[slot]) / 1e6)

    # ----------------------------------------------------------------------------------- loop
    def poll_once(self, max_wait_ms: float = 50.0) -> None:
        due = self.next_due()
        if due is None:
            timeout = max_wait_ms
        else:
            timeout = min(max_wait_ms, max(0.0, (due - self.clock()) / 1e6))
        self.poller.poll(timeout)
        self._take_input()
        give_back = self.clock() + max_wait_ms * 1e6
        while (due := self.next_due()) is not None and due <= self.clock():
            self.run_hop()
            self._take_input()  # what arrived meanwhile (after a stall: everything) before the next hop
            if self.clock() >= give_back:  # an engine slower than real time is always due: let the caller stop us
                break

    def _take_input(self) -> None:
        self._drain("frames", self._on_frame)
        self._drain("pose", self._on_pose)
        self._serve_control()

    def _serve_control(self) -> None:
        import msgpack

        sock = self.sockets["control"]
        while True:
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            sock.send(msgpack.packb(self._on_control(parts), default=str))

    def run(self, stop: Callable[[], bool]) -> None:
        while not stop():
            self.poll_once()

    def stats(self) -> dict:
        def pct(values):
            if not values:
                return None
            v = np.asarray(values)
            return {"p50": float(np.median(v)), "p95": float(np.percentile(v, 95)), "p99": float(np.percentile(v, 99))}

        streams = {}
        for stream, slot in self.slots.items():
            streams[str(stream)] = self.inputs[slot].stats.as_dict() | {"hops": self.seq[slot]}
        return {"uptime_s": (self.clock() - self.started_ns) / 1e9, "counts": dict(self.counts),
                "rejected": dict(self.rejected), "rejected_total": sum(self.rejected.values()),
                "hop_ms": pct(self.hop_ms), "frame_to_audio_ms": pct(self.latency_ms), "streams": streams}

    def endpoints(self) -> RuntimeConfig:
        """The bound addresses (a "tcp://host:*" endpoint binds a free port)."""
        from dataclasses import replace

        return replace(self.cfg, **{name: sock.getsockopt_string(zmq.LAST_ENDPOINT)
                                    for name, sock in self.sockets.items()})

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(0)
        if self.authenticator is not None:
            self.authenticator.stop()
