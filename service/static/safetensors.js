// Reading a safetensors file in the browser: an 8-byte little-endian header length N, N
// bytes of JSON header ({name: {dtype, shape, data_offsets}, "__metadata__": {...}}), then
// the tensors' raw little-endian bytes, offsets counted from the end of the header.

/**
 * @typedef {Object} Tensor
 * @property {string} dtype As the file names it: "F32", "F16", "I64", ...
 * @property {Array<number>} shape
 * @property {Float32Array|Float64Array|Int32Array|BigInt64Array|Uint8Array} data Row-major;
 *   F16 is widened to a Float32Array; a dtype not listed in READERS stays raw bytes.
 */

/** Bytes per element and a reader, by safetensors dtype. */
const READERS = {
  F64: [8, (view, i) => view.getFloat64(i, true), Float64Array],
  F32: [4, (view, i) => view.getFloat32(i, true), Float32Array],
  F16: [2, (view, i) => halfToFloat(view.getUint16(i, true)), Float32Array],
  I64: [8, (view, i) => view.getBigInt64(i, true), BigInt64Array],
  I32: [4, (view, i) => view.getInt32(i, true), Int32Array],
};

/**
 * An IEEE 754 binary16 value (its 16 bits) as a number.
 * @param {number} bits
 * @returns {number}
 */
export function halfToFloat(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024); // subnormal or zero
  if (exponent === 0x1f) return fraction ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}

/**
 * Parse a whole safetensors file.
 * @param {ArrayBuffer} buffer
 * @returns {{tensors: Object<string, Tensor>, metadata: Object<string, string>}}
 */
export function parseSafetensors(buffer) {
  const view = new DataView(buffer);
  if (buffer.byteLength < 8) throw new Error("not a safetensors file: shorter than 8 bytes");
  const headerLength = Number(view.getBigUint64(0, true));
  if (headerLength > buffer.byteLength - 8) {
    throw new Error(`not a safetensors file: a ${headerLength}-byte header in ${buffer.byteLength} bytes`);
  }
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 8, headerLength)));
  const start = 8 + headerLength;
  const tensors = {};
  let metadata = {};
  for (const [name, entry] of Object.entries(header)) {
    if (name === "__metadata__") {
      metadata = entry || {};
      continue;
    }
    const [begin, end] = entry.data_offsets;
    if (start + end > buffer.byteLength || begin > end) {
      throw new Error(`tensor ${name}: data_offsets [${begin}, ${end}] lie outside the file`);
    }
    tensors[name] = { dtype: entry.dtype, shape: entry.shape, data: read(view, entry.dtype, start + begin, end - begin) };
  }
  return { tensors, metadata };
}

function read(view, dtype, offset, length) {
  const reader = READERS[dtype];
  if (!reader) return new Uint8Array(view.buffer, offset, length);
  const [size, get, Array_] = reader;
  // Element by element through the DataView: offsets need not be aligned, and the bytes
  // are little-endian whatever the machine's order.
  const out = new Array_(length / size);
  for (let i = 0; i < out.length; i++) out[i] = get(view, offset + i * size);
  return out;
}
