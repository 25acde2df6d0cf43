// The symbol picker: which of the market's symbols the page shows and subscribes, remembered in this browser and
// shareable as /?symbols=BTCUSDT,ETHUSDT.

const STORAGE_KEY = "pricegate:symbols";
export const MAX_PICKED = 500; // two streams each: the gateway allows 1024 streams per connection
const SHOW_ALL_UP_TO = 60; // a market this small is shown whole at first; a larger one starts with its first 30

function storage() {
  try {
    return window.localStorage;
  } catch {
    return null; // storage disabled (some embedded or private contexts)
  }
}

/** The symbols to show first: the URL's ?symbols=, else this browser's last choice, else the market's first ones. */
export function initialSelection(all, search = location.search) {
  const known = new Set(all);
  const saved = new URLSearchParams(search).get("symbols") ?? storage()?.getItem(STORAGE_KEY);
  if (saved) {
    const picked = saved
      .split(",")
      .map((s) => s.trim().toUpperCase())
      .filter((s) => known.has(s));
    if (picked.length) return [...new Set(picked)].slice(0, MAX_PICKED);
  }
  return all.length <= SHOW_ALL_UP_TO ? all.slice() : all.slice(0, 30);
}

export class Picker {
  constructor({ details, list, count, pickAll, pickNone, symbols, selected, onChange }) {
    this.details = details;
    this.list = list;
    this.count = count;
    this.symbols = symbols;
    this.selected = new Set(selected);
    this.onChange = onChange;
    this.boxes = new Map();
    this.timer = null;
    for (const symbol of symbols) {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.value = symbol;
      box.checked = this.selected.has(symbol);
      box.addEventListener("change", () => this.#toggle(symbol, box));
      label.append(box, symbol);
      this.boxes.set(symbol, { label, box });
      list.append(label);
    }
    pickAll.addEventListener("click", () => this.#setAll(true));
    pickNone.addEventListener("click", () => this.#setAll(false));
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape") details.open = false;
    });
    document.addEventListener("click", (event) => {
      if (details.open && !details.contains(event.target)) details.open = false;
    });
    this.#showCount();
  }

  /** Show only the symbols containing ``text`` in the list (the toolbar's filter applies here too). */
  filter(text) {
    const needle = text.trim().toUpperCase();
    for (const [symbol, { label }] of this.boxes) label.hidden = needle !== "" && !symbol.includes(needle);
  }

  #toggle(symbol, box) {
    if (box.checked && this.selected.size >= MAX_PICKED) {
      box.checked = false;
      return;
    }
    if (box.checked) this.selected.add(symbol);
    else this.selected.delete(symbol);
    this.#changed();
  }

  #setAll(on) {
    this.selected = new Set(on ? this.symbols.filter((s) => !this.boxes.get(s).label.hidden).slice(0, MAX_PICKED) : []);
    for (const [symbol, { box }] of this.boxes) box.checked = this.selected.has(symbol);
    this.#changed();
  }

  #changed() {
    this.#showCount();
    try {
      storage()?.setItem(STORAGE_KEY, [...this.selected].join(","));
    } catch {
      // full or disabled: the choice lasts for this visit only
    }
    clearTimeout(this.timer); // several clicks in a row make one SUBSCRIBE / UNSUBSCRIBE
    this.timer = setTimeout(() => this.onChange(this.symbols.filter((s) => this.selected.has(s))), 250);
  }

  #showCount() {
    this.count.textContent = `(${this.selected.size}/${this.symbols.length})`;
  }
}
