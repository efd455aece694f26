// ViSAudio-RT protocol v1 client for Node.js (docs/PROTOCOL.md), written from the protocol document only.
import * as zmq from "zeromq";
import { encode, decode } from "@msgpack/msgpack";

export const VERSION = 1;

export class VisaudioClient {
  constructor({ stream = 0, frames = "tcp://127.0.0.1:5560", pose = "tcp://127.0.0.1:5561",
                control = "tcp://127.0.0.1:5562", audio = "tcp://127.0.0.1:5563" } = {}) {
    this.stream = stream;
    this.controlEndpoint = control;
    this.frames = new zmq.Push({ linger: 0, sendHighWaterMark: 32, sendTimeout: 0 });
    this.pose = new zmq.Push({ linger: 0, sendHighWaterMark: 128, sendTimeout: 0 });
    this.audio = new zmq.Subscriber({ linger: 0 });
    this.frames.connect(frames);
    this.pose.connect(pose);
    this.audio.connect(audio);
    this.audio.subscribe(`audio.${stream}.`);
    this.frameSeq = 0;
    this.poseSeq = 0;
    this.dropped = 0;
  }

  header(seq, tNs) {
    return { v: VERSION, stream: this.stream, seq, t_ns: tNs };
  }

  // pixels: Uint8Array of height * width * 3 (rgb24, rows top to bottom); tNs: BigInt or integer nanoseconds
  async sendFrame(pixels, width, height, tNs) {
    const head = { ...this.header(this.frameSeq, tNs), width, height, format: "rgb24" };
    try {
      await this.frames.send([encode(head, { useBigInt64: true }), pixels]);
      this.frameSeq += 1;
      return true;
    } catch (err) {
      if (err.code === "EAGAIN") { this.dropped += 1; return false; }
      throw err;
    }
  }

  async sendPose(yaw, pitch, roll, tNs) {
    const msg = { ...this.header(this.poseSeq, tNs), yaw, pitch, roll };
    try {
      await this.pose.send(encode(msg, { useBigInt64: true }));
      this.poseSeq += 1;
      return true;
    } catch (err) {
      if (err.code === "EAGAIN") { this.dropped += 1; return false; }
      throw err;
    }
  }

  // -> { stream, seq, tNs, sampleRate, pcm: Float32Array interleaved (channel 0 = left) }
  async receive() {
    const [, head, pcm] = await this.audio.receive();
    const h = decode(head, { useBigInt64: true });
    const bytes = new Uint8Array(pcm);
    const samples = new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
    if (h.v !== VERSION || h.channels !== 2 || samples.length !== Number(h.frames) * 2) {
      throw new Error("audio message does not follow protocol v1");
    }
    return { stream: Number(h.stream), seq: Number(h.seq), tNs: BigInt(h.t_ns), sampleRate: Number(h.sample_rate), pcm: samples };
  }

  async control(cmd, fields = {}) {
    const req = new zmq.Request({ linger: 0, receiveTimeout: 2000 });
    req.connect(this.controlEndpoint);
    try {
      await req.send(encode({ v: VERSION, cmd, stream: this.stream, ...fields }));
      const [reply] = await req.receive();
      return decode(reply);
    } finally {
      req.close();
    }
  }

  close() {
    this.frames.close();
    this.pose.close();
    this.audio.close();
  }
}
