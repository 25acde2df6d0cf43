// Reconnect delays: exponential backoff with jitter, so a gateway restart does not bring every page back at once.

/**
 * The delay before reconnect attempt ``attempt`` (0 = the first retry): a ceiling that doubles from ``baseMs`` up to
 * ``maxMs``, and a random point in its upper half ("equal jitter": never zero, never in lockstep with other pages).
 */
export function backoffDelay(attempt, { baseMs = 500, maxMs = 15000, random = Math.random } = {}) {
  const ceiling = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 30));
  return ceiling / 2 + random() * (ceiling / 2);
}
