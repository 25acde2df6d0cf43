// A sparkline of the last minutes of one symbol's price: a bucketed time series and its SVG polyline.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 100;
const HEIGHT = 26;

/** Prices by time over a sliding window, at most one point per bucket (the newest price in it). */
export class Series {
  constructor(windowMs = 15 * 60_000, bucketMs = 10_000) {
    this.windowMs = windowMs;
    this.bucketMs = bucketMs;
    this.points = []; // [timeMs, price], oldest first
  }

  add(timeMs, price) {
    if (!Number.isFinite(timeMs) || !Number.isFinite(price)) return;
    const points = this.points;
    const last = points[points.length - 1];
    if (last && timeMs < last[0]) return; // late: the window already has newer points
    if (last && Math.floor(last[0] / this.bucketMs) === Math.floor(timeMs / this.bucketMs)) {
      last[0] = timeMs;
      last[1] = price;
    } else {
      points.push([timeMs, price]);
    }
    this.trim(timeMs);
  }

  /** Older points (e.g. the closes of 1-minute klines) before the first live one. */
  prepend(history) {
    const first = this.points[0];
    const older = history.filter(([t, p]) => Number.isFinite(t) && Number.isFinite(p) && (!first || t < first[0]));
    this.points = [...older.sort((a, b) => a[0] - b[0]), ...this.points];
    const newest = this.points[this.points.length - 1];
    if (newest) this.trim(newest[0]);
  }

  trim(nowMs) {
    const cutoff = nowMs - this.windowMs;
    let drop = 0;
    while (drop < this.points.length - 1 && this.points[drop][0] < cutoff) drop++;
    if (drop) this.points.splice(0, drop);
  }
}

/** An empty sparkline element for a row. */
export function createSparkline() {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("class", "sparkline");
  svg.setAttribute("role", "img");
  svg.append(document.createElementNS(SVG, "polyline"));
  return svg;
}

/** Draw ``series`` over its window ending at ``nowMs``: green if the window ends higher than it started. */
export function drawSparkline(svg, series, nowMs) {
  const points = series.points;
  const polyline = svg.firstChild;
  if (points.length < 2) {
    polyline.setAttribute("points", "");
    return;
  }
  let low = Infinity;
  let high = -Infinity;
  for (const [, price] of points) {
    low = Math.min(low, price);
    high = Math.max(high, price);
  }
  const span = high - low || Math.abs(high) * 1e-6 || 1;
  const start = nowMs - series.windowMs;
  const coordinates = points.map(([time, price]) => {
    const x = Math.max(0, Math.min(WIDTH, ((time - start) / series.windowMs) * WIDTH));
    const y = 2 + (HEIGHT - 4) * (1 - (price - low) / span);
    return `${x.toFixed(2)},${y.toFixed(2)}`;
  });
  polyline.setAttribute("points", coordinates.join(" "));
  const first = points[0][1];
  const last = points[points.length - 1][1];
  svg.setAttribute("class", `sparkline ${last > first ? "up" : last < first ? "down" : ""}`.trim());
  svg.setAttribute("aria-label", `from ${first} to ${last} over the last ${Math.round(series.windowMs / 60000)} minutes`);
}
