// Number formatting for the live page: prices at the symbol's tick size, signed percentages, milliseconds.

/** Decimal places of an exchangeInfo tick size ("0.01000000" -> 2, "1.00000000" -> 0); null if unknown. */
export function decimalsOf(tickSize) {
  if (typeof tickSize !== "string" || !/^\d+(\.\d+)?$/.test(tickSize) || Number(tickSize) <= 0) return null;
  const fraction = (tickSize.split(".")[1] || "").replace(/0+$/, "");
  return fraction.length;
}

/** A price in the reader's locale, at ``decimals`` places (or a guess from its size). */
export function formatPrice(value, decimals = null) {
  const n = Number(value);
  if (value === undefined || value === null || value === "" || !Number.isFinite(n)) return "–";
  const digits = decimals ?? (n >= 1000 ? 2 : n >= 1 ? 4 : 6);
  return n.toLocaleString(undefined, { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

/** "+1.23 %" / "-0.50 %", and the direction for colouring. */
export function formatPercent(value) {
  const n = Number(value);
  if (value === undefined || value === null || value === "" || !Number.isFinite(n)) return { text: "–", sign: 0 };
  return { text: `${n > 0 ? "+" : ""}${n.toFixed(2)} %`, sign: Math.sign(n) };
}

/** Whole milliseconds, no grouping (the readout is parsed by tests and scripts). */
export function formatMs(ms) {
  return Number.isFinite(ms) ? String(Math.max(0, Math.round(ms))) : "–";
}

/** Percentiles over the newest ``size`` samples (lag readout). */
export class Samples {
  constructor(size = 256) {
    this.size = size;
    this.values = [];
    this.next = 0;
  }

  add(value) {
    if (!Number.isFinite(value)) return;
    if (this.values.length < this.size) this.values.push(value);
    else this.values[this.next] = value;
    this.next = (this.next + 1) % this.size;
  }

  percentile(p) {
    if (!this.values.length) return NaN;
    const sorted = [...this.values].sort((a, b) => a - b);
    return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
  }
}
