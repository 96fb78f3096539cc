// The microphone, as UpVoot hears it: an AudioWorkletProcessor that mixes
// its input to mono, resamples it from the context's rate (44.1, 48 kHz,
// ...) to 16 kHz with a windowed-sinc low-pass (polyphase table), and posts
// 20 ms frames of 16-bit signed little-endian PCM (320 samples, 640 bytes)
// to the page: {pcm: ArrayBuffer, level: RMS 0..1}. Its output is silence.

const OUT_RATE = 16000;
const FRAME = 320; // 20 ms at 16 kHz
const HALF = 16; // taps on each side of the output instant
const PHASES = 64; // fractional positions in the table

function blackman(x) { // x in [-1, 1]
  return 0.42 + 0.5 * Math.cos(Math.PI * x) + 0.08 * Math.cos(2 * Math.PI * x);
}

class UpVootMic extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ratio = sampleRate / OUT_RATE; // input samples per output sample
    const cutoff = Math.min(0.5, 0.45 / this.ratio); // of the input rate; 7.2 kHz at 16 kHz out
    this.kernels = [];
    for (let p = 0; p <= PHASES; p++) {
      const frac = p / PHASES;
      const k = new Float32Array(2 * HALF);
      let sum = 0;
      for (let j = 0; j < 2 * HALF; j++) {
        const d = j - HALF + 1 - frac; // distance from the output instant, in input samples
        const sinc = d === 0 ? 1 : Math.sin(2 * Math.PI * cutoff * d) / (2 * Math.PI * cutoff * d);
        k[j] = sinc * blackman(Math.max(-1, Math.min(1, d / HALF)));
        sum += k[j];
      }
      for (let j = 0; j < k.length; j++) k[j] /= sum; // unity gain at DC
      this.kernels.push(k);
    }
    this.buf = new Float32Array(4096);
    this.len = 0;
    this.pos = HALF; // next output instant, in buffer samples
    this.frame = new Int16Array(FRAME);
    this.filled = 0;
    this.energy = 0;
    this.running = true;
    this.port.onmessage = (event) => {
      if (event.data === "stop") this.running = false;
    };
  }

  append(samples) {
    if (this.len + samples.length > this.buf.length) {
      const bigger = new Float32Array(Math.max(this.buf.length * 2, this.len + samples.length));
      bigger.set(this.buf.subarray(0, this.len));
      this.buf = bigger;
    }
    this.buf.set(samples, this.len);
    this.len += samples.length;
  }

  resample() {
    const buf = this.buf;
    while (Math.floor(this.pos) + HALF < this.len) {
      const i = Math.floor(this.pos);
      const kernel = this.kernels[Math.round((this.pos - i) * PHASES)];
      const first = i - HALF + 1;
      let acc = 0;
      for (let j = 0; j < kernel.length; j++) acc += buf[first + j] * kernel[j];
      acc = Math.max(-1, Math.min(1, acc));
      this.energy += acc * acc;
      this.frame[this.filled++] = acc < 0 ? Math.round(acc * 32768) : Math.round(acc * 32767);
      if (this.filled === FRAME) this.emit();
      this.pos += this.ratio;
    }
    const drop = Math.floor(this.pos) - HALF; // samples no output instant needs any more
    if (drop > 0) {
      buf.copyWithin(0, drop, this.len);
      this.len -= drop;
      this.pos -= drop;
    }
  }

  emit() {
    const pcm = this.frame.buffer.slice(0); // Int16Array is little-endian on every browser platform
    this.port.postMessage({ pcm, level: Math.sqrt(this.energy / FRAME) }, [pcm]);
    this.filled = 0;
    this.energy = 0;
  }

  process(inputs) {
    if (!this.running) return false;
    const input = inputs[0];
    if (input && input.length) {
      let mono = input[0];
      if (input.length > 1) {
        mono = new Float32Array(input[0].length);
        for (const channel of input) for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / input.length;
      }
      this.append(mono);
      this.resample();
    }
    return true;
  }
}

registerProcessor("upvoot-mic", UpVootMic);
