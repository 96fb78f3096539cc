// The agent's voice: an AudioWorkletProcessor that plays 16 kHz mono s16le
// PCM as it streams in, through a jitter buffer.
//
// Messages from the page: {pcm: ArrayBuffer} (append), "flush" (the
// utterance is complete: play what is queued without waiting for the
// buffer to fill), "clear" (the agent was interrupted: fade out and drop
// what is queued). It posts {played, queued, level} about 20 times a second
// (samples at 16 kHz played and waiting, RMS 0..1 of what it played).
//
// No clicks between frames: samples are one continuous stream whatever the
// frame boundaries, resampled to the context's rate by interpolation with
// a phase that carries across frames; when the queue runs dry the output
// fades from its last value to silence over a few milliseconds (and fades
// back in), and the buffer refills to TARGET before playing again.

const IN_RATE = 16000;
const TARGET = 1600; // 100 ms buffered before playing starts (or restarts after running dry)
const FADE = Math.max(1, Math.round(sampleRate * 0.004)); // 4 ms

class UpVootPlayer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = IN_RATE / sampleRate; // input samples per output sample
    this.chunks = []; // Float32Array pieces at 16 kHz
    this.head = 0; // read position in chunks[0]
    this.queued = 0;
    this.playing = false;
    this.flushing = false;
    this.phase = 0; // between prev and next
    this.prev = 0;
    this.next = 0;
    this.gain = 0;
    this.last = 0;
    this.played = 0;
    this.energy = 0;
    this.counted = 0;
    this.port.onmessage = (event) => this.message(event.data);
  }

  message(data) {
    if (data === "flush") {
      this.flushing = true;
    } else if (data === "clear") {
      this.chunks = [];
      this.head = 0;
      this.queued = 0;
      this.playing = false;
      this.flushing = false;
    } else if (data && data.pcm) {
      const ints = new Int16Array(data.pcm);
      const floats = new Float32Array(ints.length);
      for (let i = 0; i < ints.length; i++) floats[i] = ints[i] / 32768;
      if (floats.length) {
        this.chunks.push(floats);
        this.queued += floats.length;
      }
    }
  }

  take() { // the next 16 kHz sample, or null when the queue is empty
    while (this.chunks.length && this.head >= this.chunks[0].length) {
      this.chunks.shift();
      this.head = 0;
    }
    if (!this.chunks.length) return null;
    this.queued--;
    this.played++;
    return this.chunks[0][this.head++];
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.queued > 0 && (this.queued >= TARGET || this.flushing)) {
      this.playing = true;
    }
    for (let i = 0; i < out.length; i++) {
      let sample = 0;
      if (this.playing) {
        this.phase += this.step;
        while (this.phase >= 1) {
          const s = this.take();
          if (s === null) { // ran dry: fade out from where we were, refill before playing on
            this.playing = false;
            this.flushing = false;
            this.phase = 0;
            break;
          }
          this.prev = this.next;
          this.next = s;
          this.phase -= 1;
        }
        if (this.playing) {
          sample = this.prev + (this.next - this.prev) * this.phase;
          this.gain = Math.min(1, this.gain + 1 / FADE);
        }
      }
      if (!this.playing) {
        this.gain = Math.max(0, this.gain - 1 / FADE);
        sample = this.last;
        if (this.gain === 0) this.prev = this.next = 0;
      } else {
        this.last = sample;
      }
      out[i] = sample * this.gain;
      this.energy += out[i] * out[i];
    }
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    this.counted += out.length;
    if (this.counted >= sampleRate / 20) {
      this.port.postMessage({ played: this.played, queued: this.queued, level: Math.sqrt(this.energy / this.counted) });
      this.counted = 0;
      this.energy = 0;
    }
    return true;
  }
}

registerProcessor("upvoot-player", UpVootPlayer);
