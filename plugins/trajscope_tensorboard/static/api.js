// Data access for the trajscope dashboard: JSON routes of the plugin and typed-array decoding.
// URLs are resolved against this module (…/plugin/trajscope/static/), so the dashboard works
// whatever the iframe's <base> is.

const BASE = new URL("../", import.meta.url);

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

/** GET a plugin route; resolves to its JSON, rejects with ApiError carrying the server's one-line message. */
export async function getJSON(route, params = {}) {
  const url = new URL(route, BASE);
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null) url.searchParams.set(k, String(v));
  }
  let resp;
  try {
    resp = await fetch(url, { credentials: "same-origin" });
  } catch (e) {
    throw new ApiError(`cannot reach TensorBoard (${e.message})`, 0);
  }
  let body = null;
  try {
    body = await resp.json();
  } catch (_) {
    body = null;
  }
  if (!resp.ok) {
    throw new ApiError(body && body.error ? body.error : `${resp.status} ${resp.statusText}`, resp.status);
  }
  return body;
}

/** {dtype, shape, data: base64 little-endian} -> Uint8Array | Int32Array | Float32Array. */
export function decode(packed) {
  const bin = atob(packed.data);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  switch (packed.dtype) {
    case "uint8":
      return bytes;
    case "int32":
      return new Int32Array(bytes.buffer);
    case "float32":
      return new Float32Array(bytes.buffer);
    default:
      throw new Error(`unknown dtype ${packed.dtype}`);
  }
}
