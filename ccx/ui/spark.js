// A 60-second output-rate sparkline (bytes per second) drawn on a <canvas>.
export class Sparkline {
  constructor(canvas, label) {
    this.canvas = canvas;
    this.label = label;
    this.buckets = new Array(60).fill(0);
    this.timer = setInterval(() => this.tick(), 1000);
    this.draw();
  }

  add(bytes) {
    this.buckets[this.buckets.length - 1] += bytes;
  }

  tick() {
    this.buckets.shift();
    this.buckets.push(0);
    this.draw();
  }

  stop() {
    clearInterval(this.timer);
  }

  draw() {
    const { width, height } = this.canvas;
    const ctx = this.canvas.getContext('2d');
    ctx.clearRect(0, 0, width, height);
    const peak = Math.max(...this.buckets);
    const max = Math.max(1, peak);
    ctx.strokeStyle = '#58a6ff';
    ctx.beginPath();
    this.buckets.forEach((value, i) => {
      const x = (i / (this.buckets.length - 1)) * (width - 2) + 1;
      const y = height - 2 - (value / max) * (height - 4);
      if (i === 0) ctx.moveTo(x, y);
      else ctx.lineTo(x, y);
    });
    ctx.stroke();
    const last = this.buckets[this.buckets.length - 2];
    this.label.textContent = `${formatBytes(last)}/s (peak ${formatBytes(peak)}/s)`;
  }
}

export function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1024 ** 3) return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  return `${(n / 1024 ** 3).toFixed(2)} GiB`;
}
