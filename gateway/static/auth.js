// Where the page's connection token comes from (PRICEGATE_AUTH=jwt), and what its claims allow.
//
// In order: a hook the embedding app sets, ``window.pricegateToken`` (a string, or a function returning a string or
// a promise of one: called again before the token expires and on every reconnect); a ``pricegate-token``
// attribute on <html> (or on any element; when the app changes it, the open connection is refreshed); the page's
// own URL, ``/?token=...``. No token: the gateway runs without authentication (or refuses, and the page says so).

const ATTRIBUTE = "pricegate-token";
const RENEW_BEFORE_MS = 30_000; // a hook's token is asked for again this long before it expires
let fromHook = null; // { hook, token, pending }: the hook function is not called for every request

/** The current token, or null. */
export async function currentToken() {
  const hook = window.pricegateToken;
  try {
    if (typeof hook === "function") {
      const token = await tokenFromHook(hook);
      if (token) return token;
    } else if (typeof hook === "string" && hook) {
      return hook;
    }
  } catch (error) {
    console.warn("pricegate: window.pricegateToken failed:", error);
  }
  const element = document.documentElement.hasAttribute(ATTRIBUTE)
    ? document.documentElement
    : document.querySelector(`[${ATTRIBUTE}]`);
  const attribute = element?.getAttribute(ATTRIBUTE);
  if (attribute) return attribute;
  return new URLSearchParams(location.search).get("token") || null;
}

async function tokenFromHook(hook) {
  if (fromHook?.hook === hook) {
    if (fromHook.pending) return fromHook.pending;
    const exp = claimsOf(fromHook.token)?.exp;
    if (fromHook.token && (!Number.isFinite(exp) || exp * 1000 - Date.now() > RENEW_BEFORE_MS)) return fromHook.token;
  }
  const entry = { hook, token: null, pending: null };
  fromHook = entry;
  entry.pending = Promise.resolve(hook()).then(
    (token) => {
      entry.token = token ? String(token) : null;
      entry.pending = null;
      return entry.token;
    },
    (error) => {
      fromHook = null;
      throw error;
    },
  );
  return entry.pending;
}

/** Can a fresh token appear without a reload (a hook function, or an attribute the app may change)? */
export function tokenCanChange() {
  return typeof window.pricegateToken === "function" || document.querySelector(`[${ATTRIBUTE}]`) !== null;
}

/** Call ``onChange`` when the embedding app changes a ``pricegate-token`` attribute. */
export function watchTokenAttribute(onChange) {
  const observer = new MutationObserver(() => onChange());
  observer.observe(document.documentElement, { attributes: true, subtree: true, attributeFilter: [ATTRIBUTE] });
  return observer;
}

/** The JWT's claims, read (not verified: the gateway verifies) to plan around ``exp`` and ``streams``. */
export function claimsOf(token) {
  if (!token) return null;
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const json = atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "="));
    const claims = JSON.parse(json);
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

/** A predicate over stream names: what the token's ``streams`` globs allow (everything without the claim). */
export function streamFilter(claims) {
  const patterns = claims?.streams;
  if (!Array.isArray(patterns)) return () => true;
  const regexes = patterns.filter((p) => typeof p === "string").map(globToRegExp);
  return (stream) => regexes.some((regex) => regex.test(stream.toLowerCase()));
}

/** Python's fnmatch, as the gateway applies the claim: * ? [seq] [!seq], case-insensitive. */
export function globToRegExp(glob) {
  let source = "";
  const text = glob.toLowerCase();
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === "*") source += ".*";
    else if (c === "?") source += ".";
    else if (c === "[") {
      const end = text.indexOf("]", i + 2);
      if (end < 0) {
        source += "\\[";
      } else {
        let set = text.slice(i + 1, end).replace(/\\/g, "\\\\");
        if (set.startsWith("!")) set = "^" + set.slice(1);
        source += `[${set}]`;
        i = end;
      }
    } else source += c.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
  }
  return new RegExp(`^(?:${source})$`);
}
