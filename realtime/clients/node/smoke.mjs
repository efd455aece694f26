// Protocol check used by the test suite: send SECONDS of frames and a turning head in real time,
// count the audio that comes back, print a JSON summary. Usage: node smoke.mjs ENDPOINTS_JSON SECONDS
import { VisaudioClient } from "./visaudio_client.mjs";

const endpoints = JSON.parse(process.argv[2]);
const seconds = Number(process.argv[3] ?? "1.2");
const client = new VisaudioClient({ stream: 5, ...endpoints });
const received = [];
let receiving = true;
const reader = (async () => {
  while (receiving) {
    try { received.push(await client.receive()); } catch { break; }
  }
})();
await new Promise((r) => setTimeout(r, 300));  // let the subscription reach the publisher
const origin = 2_000_000_000_000n;
const frames = Math.round(seconds * 25);
const start = Date.now();
for (let k = 0; k < frames; k++) {
  const wait = start + k * 40 - Date.now();
  if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  const pixels = new Uint8Array(64 * 64 * 3).fill((k * 7) % 256);
  const tNs = origin + BigInt(k) * 40_000_000n;
  await client.sendFrame(pixels, 64, 64, tNs);
  await client.sendPose(30 * Math.sin(k / 10), 0, 0, tNs);
}
await new Promise((r) => setTimeout(r, 500));
const stats = await client.control("stats");
receiving = false;
client.close();
await reader.catch(() => {});
let contiguous = true;
for (let i = 1; i < received.length; i++) {
  const expected = received[i - 1].tNs + BigInt(Math.round(received[i - 1].pcm.length / 2 / 16000 * 1e9));
  if (received[i].tNs !== expected) contiguous = false;
}
console.log(JSON.stringify({
  messages: received.length,
  samples: received.reduce((n, m) => n + m.pcm.length / 2, 0),
  first_t_ns: received.length ? received[0].tNs.toString() : null,
  contiguous,
  finite: received.every((m) => m.pcm.every(Number.isFinite)),
  rejected: stats.stats.rejected_total,
  frames_received: stats.stats.streams["5"]?.frames ?? 0,
}));
