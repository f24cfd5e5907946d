// A browser client of the DDIM inversion API: an ES module without dependencies that front
// ends may import from the gateway (`/static/inversion-client.js`) or copy as it is.
//
// The key travels only in the `Authorization` header, never in a URL: that is why events()
// reads the SSE stream with fetch() instead of EventSource, which cannot send headers.
//
// The typedefs below follow the gateway's OpenAPI schema (`/openapi.json`), property by
// property; tests/service/test_client_types.py fails when the two drift apart.

/**
 * The parameters of a submission, the fields of `POST /v1/inversions` (OpenAPI: either
 * request body, multipart or JSON, less `image`). Absent or null: the service's default.
 * @typedef {Object} SubmitParams
 * @property {string} prompt The text the image is inverted under.
 * @property {string|null} [negative_prompt] Unconditional prompt for guidance.
 * @property {number|null} [num_inference_steps] DDIM inversion steps.
 * @property {number|null} [guidance_scale] 1.0: no guidance.
 * @property {string|null} [resolution] N or WxH, multiples of 64.
 * @property {string|null} [resize_mode] center_crop or stretch.
 * @property {string|null} [encode_mode] mean, or sample (needs seed).
 * @property {number|null} [seed] Seed of encode_mode=sample and of method ddpm's noise.
 * @property {boolean|null} [return_trajectory] Also keep every step's latent.
 * @property {string|null} [result_dtype] float32 or float16.
 * @property {string|null} [inverse_scheduler] ddim, or dpmsolver (DPM-Solver++ multistep).
 * @property {string|Object<string, *>|null} [scheduler] Inverse scheduler overrides:
 *   an object (the form body sends its JSON text; a string goes to the form body only).
 * @property {number|null} [refine_iterations] Fixed-point refinement iterations per step.
 * @property {number|null} [refine_tolerance] Relative change that ends a step's refinement.
 * @property {string|null} [method] ddim, null_text (needs guidance_scale > 1),
 *   negative_prompt, edict or ddpm.
 * @property {number|null} [edict_mixing] edict: the mixing coefficient p (absent: 0.93).
 * @property {number|null} [eta] ddpm: the sampler's eta (absent: 1.0).
 * @property {number|null} [null_text_inner_steps] null_text: Adam iterations per step.
 * @property {number|null} [null_text_learning_rate] null_text: Adam learning rate.
 * @property {number|null} [null_text_early_stop] null_text: MSE that ends a step.
 * @property {boolean|null} [verify] Sample back and decode: error, PSNR, reconstruction.
 * @property {string|null} [prompt_2] SDXL: the second text encoder's prompt.
 * @property {string|null} [negative_prompt_2] SDXL: the second text encoder's negative prompt.
 * @property {string|Array<number>|null} [original_size] SDXL: height,width.
 * @property {string|Array<number>|null} [crops_coords_top_left] SDXL: top,left.
 * @property {string|Array<number>|null} [target_size] SDXL: height,width.
 * @property {string|null} [model] The model the job runs on (models() lists them).
 * @property {string|null} [webhook_url] POSTed the job's end (allowed hosts only).
 */

/**
 * Where to poll, download and cancel, relative to the gateway's base URL.
 * @typedef {Object} JobUrls
 * @property {string} self
 * @property {string} latents
 * @property {string} cancel
 */

/**
 * The answer to a submission (202): the job exists and waits in the queue.
 * @typedef {Object} JobAccepted
 * @property {string} id
 * @property {JobStatus} [status]
 * @property {string} created_at
 * @property {JobUrls} urls
 */

/** @typedef {"queued"|"running"|"succeeded"|"failed"|"canceled"} JobStatus */

/**
 * @typedef {Object} Progress
 * @property {number} step
 * @property {number} total
 */

/**
 * @typedef {Object} Timings
 * @property {string|null} [queued_at]
 * @property {string|null} [started_at]
 * @property {string|null} [finished_at]
 * @property {number|null} [queue_wait_s]
 * @property {number|null} [run_s]
 */

/**
 * @typedef {Object} JobError
 * @property {string} code A stable error code, e.g. "timeout" or "canceled".
 * @property {string} message
 */

/**
 * The parameters as the job records them, plus what they resolved to.
 * @typedef {Object} JobParams
 * @property {string} prompt
 * @property {string} [negative_prompt]
 * @property {number} [num_inference_steps]
 * @property {number} [guidance_scale]
 * @property {Array<number>|null} [resolution] [width, height]
 * @property {string} [resize_mode]
 * @property {string} [encode_mode]
 * @property {number|null} [seed]
 * @property {boolean} [return_trajectory]
 * @property {string} [result_dtype]
 * @property {string} [inverse_scheduler]
 * @property {Object<string, *>} [scheduler]
 * @property {number} [refine_iterations]
 * @property {number} [refine_tolerance]
 * @property {string} [method]
 * @property {number|null} [edict_mixing]
 * @property {number|null} [eta]
 * @property {number} [null_text_inner_steps]
 * @property {number} [null_text_learning_rate]
 * @property {number} [null_text_early_stop]
 * @property {boolean} [verify]
 * @property {string|null} [prompt_2]
 * @property {string|null} [negative_prompt_2]
 * @property {Array<number>|null} [original_size] [height, width]
 * @property {Array<number>|null} [crops_coords_top_left] [top, left]
 * @property {Array<number>|null} [target_size] [height, width]
 * @property {string|null} [model] The model the job ran on.
 * @property {Array<number>|null} [resolved_resolution] [width, height]
 * @property {Object<string, *>|null} [resolved_scheduler_config]
 */

/**
 * What the result file's header and the job status say about the latents.
 * @typedef {Object} ResultMetadata
 * @property {string} model
 * @property {number} width
 * @property {number} height
 * @property {string} prompt
 * @property {string} negative_prompt
 * @property {number} guidance_scale
 * @property {number} token_count
 * @property {boolean} truncated
 * @property {string} encode_mode
 * @property {number|null} [seed]
 * @property {number} num_inference_steps
 * @property {Array<number>} timesteps
 * @property {Object<string, *>} scheduler_config
 * @property {Array<number>} latents_shape
 * @property {Array<number>|null} [trajectory_shape]
 * @property {string} dtype
 * @property {string} [engine_version]
 * @property {Array<number>|null} [refine_iterations]
 * @property {Array<number>|null} [refine_residuals]
 * @property {Array<number>|null} [refine_unconverged_steps] Refinement: the steps still above
 *   refine_tolerance after refine_iterations; [] when all converged.
 * @property {string} [method]
 * @property {string} [inverse_scheduler]
 * @property {number|null} [edict_mixing] edict: the p that sampling back must use.
 * @property {number|null} [eta] ddpm: the eta the noise maps were made for.
 * @property {Array<number>|null} [null_text_losses]
 * @property {Object<string, *>|null} [sdxl_conditioning] SDXL: prompt_2, negative_prompt_2,
 *   original_size, crops_coords_top_left, target_size as the SDXL pipeline takes them.
 * @property {number|null} [reconstruction_latent_error] verify: ||x_rec - x0|| / ||x0||.
 * @property {number|null} [reconstruction_psnr] verify: PSNR (dB) against the input.
 */

/**
 * Everything a client may know about one job (`GET /v1/inversions/{id}`).
 * @typedef {Object} JobView
 * @property {string} id
 * @property {JobStatus} status
 * @property {string} created_at
 * @property {number|null} [queue_position] 0-based, while queued.
 * @property {number|null} [estimated_wait_s]
 * @property {number|null} [live_workers] While queued: live workers of its model; 0: none.
 * @property {Progress|null} [progress] While running.
 * @property {Timings} timings
 * @property {JobParams|null} [params]
 * @property {ResultMetadata|null} [result] Once succeeded.
 * @property {JobError|null} [error] Once failed or canceled.
 * @property {JobUrls} urls
 */

/**
 * One event of `GET /v1/inversions/{id}/events`: `status` (a JobView), `progress`
 * (`{step, total}`), then `end` (`{id, status}`; `{status: null, code, detail}` when the
 * job vanished) as the last event of the stream.
 * @typedef {{event: "status", data: JobView}
 *   | {event: "progress", data: Progress}
 *   | {event: "end", data: {id?: string, status: JobStatus|null, code?: string, detail?: string}}
 * } JobEvent
 */

/**
 * An RFC 9457 problem (`application/problem+json`) the gateway answered.
 * @typedef {Object} Problem
 * @property {string} type
 * @property {string} title
 * @property {number} status
 * @property {string} detail
 * @property {string} code A stable code: validation_error, unauthorized, not_found, ...
 * @property {string|null} [instance] The request's path.
 * @property {string|null} [field] The parameter that caused it, when one did.
 */

/** A refused request: the problem's fields, as the gateway sent them. */
export class InversionError extends Error {
  /** @param {Problem} problem */
  constructor(problem) {
    super(problem.detail);
    this.name = "InversionError";
    /** @type {number} */ this.status = problem.status;
    /** @type {string} */ this.code = problem.code;
    /** @type {string} */ this.detail = problem.detail;
    /** @type {string|null} */ this.field = problem.field ?? null;
    /** @type {Problem} */ this.problem = problem;
  }
}

/**
 * The bytes of a Blob as base64 (standard alphabet, padded), in slices: spreading a whole
 * image into String.fromCharCode would overflow the call stack.
 * @param {Blob} blob
 * @returns {Promise<string>}
 */
async function base64Of(blob) {
  const bytes = new Uint8Array(await blob.arrayBuffer());
  let binary = "";
  for (let start = 0; start < bytes.length; start += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(start, start + 0x8000));
  }
  return btoa(binary);
}

/** @param {Object<string, *>} params @returns {Array<[string, *]>} those given */
const given = (params) =>
  Object.entries(params).filter(([, value]) => value !== undefined && value !== null);

/**
 * How a submission's body is built, by encoding name, chosen with `submit(..., {body})`:
 * `form` (multipart, the image as a file; an object parameter as its JSON text) or `json`
 * (the image as base64; the parameters as JSON values). Both carry the same fields.
 * An encoder may be async (reading the image's bytes is).
 * @type {Object<string, function(Blob, SubmitParams):
 *   (FormData|{body: string, type: string}|Promise<{body: string, type: string}>)>}
 */
const BODY_ENCODERS = {
  form: (image, params) => {
    const form = new FormData();
    form.append("image", image, image.name || "image");
    for (const [name, value] of given(params)) {
      form.append(name, typeof value === "object" ? JSON.stringify(value) : String(value));
    }
    return form;
  },
  json: async (image, params) => {
    const fields = Object.fromEntries(given(params));
    fields.image = await base64Of(image);
    return { body: JSON.stringify(fields), type: "application/json" };
  },
};

export class InversionClient {
  /**
   * @param {Object} [options]
   * @param {string} [options.baseUrl] The gateway, e.g. "https://inversion.example.com";
   *   "" (the default): the origin the page came from.
   * @param {string|null} [options.apiKey] Sent as `Authorization: Bearer <key>`; null when
   *   the gateway runs without auth.
   * @param {typeof fetch} [options.fetch] A fetch implementation (tests, polyfills).
   */
  constructor({ baseUrl = "", apiKey = null, fetch = globalThis.fetch.bind(globalThis) } = {}) {
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    this.apiKey = apiKey || null;
    this._fetch = fetch;
  }

  /**
   * Submit an image for inversion.
   * @param {Blob} image A File or Blob: PNG, JPEG, WEBP, BMP, TIFF or GIF.
   * @param {SubmitParams} params
   * @param {Object} [options]
   * @param {string} [options.idempotencyKey] The same key and payload: the same job.
   * @param {"form"|"json"} [options.body] How the body is encoded (see BODY_ENCODERS):
   *   multipart (the default) or JSON with the image as base64.
   * @param {AbortSignal} [options.signal]
   * @returns {Promise<JobAccepted|JobView>} 202's acceptance, or the status body (200)
   *   when an Idempotency-Key replays a job that ended.
   */
  async submit(image, params, { idempotencyKey, body = "form", signal } = {}) {
    const encode = BODY_ENCODERS[body];
    if (!encode) {
      throw new TypeError(`unknown body encoding ${body}; valid: ${Object.keys(BODY_ENCODERS)}`);
    }
    const encoded = await encode(image, params);
    const headers = idempotencyKey ? { "Idempotency-Key": idempotencyKey } : {};
    const init = { method: "POST", headers, signal };
    if (encoded instanceof FormData) {
      init.body = encoded; // fetch sets the multipart Content-Type with its boundary
    } else {
      init.body = encoded.body;
      headers["Content-Type"] = encoded.type;
    }
    return (await this._request("/v1/inversions", init)).json();
  }

  /**
   * The state of a job: queue position, progress, result metadata or error.
   * @param {string} id
   * @param {{signal?: AbortSignal}} [options]
   * @returns {Promise<JobView>}
   */
  async status(id, { signal } = {}) {
    return (await this._request(`/v1/inversions/${encodeURIComponent(id)}`, { signal })).json();
  }

  /**
   * The job's Server-Sent Events until it ends: `for await (const e of client.events(id))`.
   * Breaking out of the loop, or aborting `signal`, closes the stream.
   * @param {string} id
   * @param {{signal?: AbortSignal}} [options]
   * @returns {AsyncGenerator<JobEvent, void, void>}
   */
  async *events(id, { signal } = {}) {
    const response = await this._request(`/v1/inversions/${encodeURIComponent(id)}/events`, {
      headers: { Accept: "text/event-stream" },
      signal,
    });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = new SseParser();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const message of parser.push(value)) {
          yield { event: message.event, data: JSON.parse(message.data) };
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  /**
   * Cancel a queued or running job (its status, 202), or delete an ended one with its
   * result (null, 204).
   * @param {string} id
   * @returns {Promise<JobView|null>}
   */
  async cancel(id) {
    const response = await this._request(`/v1/inversions/${encodeURIComponent(id)}`, {
      method: "DELETE",
    });
    return response.status === 204 ? null : response.json();
  }

  /**
   * The result file of a succeeded job: safetensors (see safetensors.js to read it in the
   * browser), or the latents alone as `.npy`.
   * @param {string} id
   * @param {{format?: "safetensors"|"npy", signal?: AbortSignal}} [options]
   * @returns {Promise<Blob>}
   */
  async download(id, { format = "safetensors", signal } = {}) {
    const path = `/v1/inversions/${encodeURIComponent(id)}/latents?format=${format}`;
    return (await this._request(path, { signal })).blob();
  }

  /**
   * The reconstruction PNG of a succeeded job submitted with `verify: true`.
   * @param {string} id
   * @param {{signal?: AbortSignal}} [options]
   * @returns {Promise<Blob>}
   */
  async reconstruction(id, { signal } = {}) {
    const path = `/v1/inversions/${encodeURIComponent(id)}/reconstruction`;
    return (await this._request(path, { signal })).blob();
  }

  /**
   * The models the pool serves, from `GET /v1/models` (name, family, native_resolution,
   * live_workers, ready, queued, ...); null where this gateway has no such route.
   * @returns {Promise<Array<Object>|null>}
   */
  async models() {
    try {
      const body = await (await this._request("/v1/models", {})).json();
      return Array.isArray(body) ? body : (body.models ?? body.data ?? null);
    } catch (error) {
      if (error instanceof InversionError && error.status === 404) return null;
      throw error;
    }
  }

  /**
   * One request with the key; a refusal becomes an InversionError.
   * @param {string} path
   * @param {RequestInit & {headers?: Object<string, string>}} init
   * @returns {Promise<Response>}
   */
  async _request(path, init) {
    const headers = { ...(init.headers || {}) };
    if (this.apiKey) headers.Authorization = `Bearer ${this.apiKey}`;
    const response = await this._fetch(this.baseUrl + path, { ...init, headers });
    if (!response.ok) throw new InversionError(await readProblem(response));
    return response;
  }
}

/**
 * The problem of a refused response; one made up from the status when the body is not
 * problem+json (a proxy's error page, say).
 * @param {Response} response
 * @returns {Promise<Problem>}
 */
async function readProblem(response) {
  const text = await response.text();
  try {
    const problem = JSON.parse(text);
    if (problem && typeof problem.detail === "string") return problem;
  } catch {
    // not JSON: described below
  }
  return {
    type: "about:blank",
    title: response.statusText,
    status: response.status,
    detail: `${response.status} ${response.statusText}`.trim(),
    code: "http_error",
  };
}

/**
 * An incremental parser of the `text/event-stream` format (the WHATWG HTML standard's
 * "event stream interpretation"): feed it text as it arrives, get whole messages back.
 */
export class SseParser {
  constructor() {
    this._buffer = "";
    this._event = "";
    this._data = [];
  }

  /**
   * @param {string} chunk The next piece of the stream, cut anywhere.
   * @returns {Array<{event: string, data: string}>} The messages it completed.
   */
  push(chunk) {
    this._buffer += chunk;
    const out = [];
    // A line ends at CRLF, LF or CR; the last piece may be incomplete (a CR at the very
    // end may be the first half of a CRLF) and waits for the next chunk.
    const lines = this._buffer.split(/\r\n|\n|\r(?!$)/);
    this._buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (this._data.length) {
          out.push({ event: this._event || "message", data: this._data.join("\n") });
        }
        this._event = "";
        this._data = [];
        continue;
      }
      if (line.startsWith(":")) continue; // a comment: keep-alive
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") this._event = value;
      else if (field === "data") this._data.push(value);
    }
    return out;
  }
}
