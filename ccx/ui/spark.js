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
    if (!this.drawQueued) {  // redraw soon, not on every chunk
      this.drawQueued = true;
      setTimeout(() => { this.drawQueued = false; this.draw(); }, 250);
    }
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
    const points = this.buckets.map((value, i) => [
      (i / (this.buckets.length - 1)) * (width - 2) + 1,
      height - 2 - (value / max) * (height - 4),
    ]);
    ctx.beginPath();
    ctx.moveTo(1, height - 1);
    for (const [x, y] of points) ctx.lineTo(x, y);
    ctx.lineTo(width - 1, height - 1);
    ctx.closePath();
    ctx.fillStyle = 'rgba(88, 166, 255, 0.25)';
    ctx.fill();
    ctx.beginPath();
    points.forEach(([x, y], i) => (i === 0 ? ctx.moveTo(x, y) : ctx.lineTo(x, y)));
    ctx.strokeStyle = peak > 0 ? '#58a6ff' : '#30363d';
    ctx.stroke();
    // The last whole second, or the current one while it is busier (a short burst).
    const last = Math.max(...this.buckets.slice(-2));
    this.label.textContent = `${formatBytes(last)}/s (peak ${formatBytes(peak)}/s)`;
  }
}

export function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1024 ** 3) return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  return `${(n / 1024 ** 3).toFixed(2)} GiB`;
}
