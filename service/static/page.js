// The page at `/`: one form, one job at a time, everything through inversion-client.js.

import { InversionClient, InversionError } from "/static/inversion-client.js";
import { parseSafetensors } from "/static/safetensors.js";

/** sessionStorage, not localStorage: the key is gone when the tab closes. */
const KEY_STORAGE = "inversion.apiKey";

const $ = (id) => document.getElementById(id);
const form = $("submit-form");
const keyInput = $("api_key");
/** Object URLs of the current job's images and file, released when the next job starts. */
let jobUrls = [];
/** The object URL of the chosen image's preview, released when another is chosen. */
let previewUrl = null;
/** The job shown, while it may still be canceled. */
let running = null;

function client() {
  return new InversionClient({ apiKey: keyInput.value.trim() || null });
}

// -- the API key: this tab only, never in a URL ---------------------------------------

keyInput.value = sessionStorage.getItem(KEY_STORAGE) || "";
keyInput.addEventListener("input", () => {
  const key = keyInput.value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
});

// -- the image: picked or dropped ------------------------------------------------------

const imageInput = $("image");
const dropZone = $("drop-zone");

function showInput() {
  const file = imageInput.files[0];
  const preview = $("input-preview");
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = null;
  if (!file) {
    preview.hidden = true;
    return;
  }
  previewUrl = URL.createObjectURL(file);
  preview.src = previewUrl;
  preview.hidden = false;
  $("drop-hint").textContent = file.name;
}

imageInput.addEventListener("change", showInput);
dropZone.addEventListener("dragover", (event) => {
  event.preventDefault();
  dropZone.classList.add("over");
});
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("over"));
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropZone.classList.remove("over");
  if (event.dataTransfer.files.length) {
    imageInput.files = event.dataTransfer.files;
    showInput();
  }
});

// -- the model field: shown where the gateway lists its models -------------------------

client()
  .models()
  .then((models) => {
    if (!models) return;
    const list = $("models");
    for (const model of models) {
      const option = document.createElement("option");
      option.value = typeof model === "string" ? model : model.name;
      list.append(option);
    }
    document.querySelector('[data-field="model"]').hidden = false;
  })
  .catch(() => {}); // the list is a convenience: the field works without it

// -- errors by their field -------------------------------------------------------------

function clearErrors() {
  for (const element of document.querySelectorAll(".field-error, #form-error")) {
    element.hidden = true;
    element.textContent = "";
  }
  for (const element of form.querySelectorAll("[aria-invalid]")) {
    element.removeAttribute("aria-invalid");
  }
}

/**
 * Show a problem next to the field it names (`scheduler.steps_offset` -> `scheduler`),
 * a 401 next to the key, anything else above the buttons.
 * @param {Error} error
 */
function showError(error) {
  const problem = error instanceof InversionError;
  let field = problem ? error.field : null;
  if (problem && error.code === "unauthorized") field = "api_key";
  showAt(field, problem ? error.detail : String(error.message || error));
}

/**
 * @param {string|null} field A form field's name, or a dotted path below one.
 * @param {string} text
 */
function showAt(field, text) {
  const name = field ? field.split(".")[0] : null;
  const slot = name && document.querySelector(`[data-error-for="${CSS.escape(name)}"]`);
  if (slot && !slot.parentElement.closest("[hidden]")) {
    slot.textContent = text;
    slot.hidden = false;
    const input = document.getElementById(name);
    if (input) {
      input.setAttribute("aria-invalid", "true");
      input.focus();
    }
  } else {
    $("form-error").textContent = field ? `${field}: ${text}` : text;
    $("form-error").hidden = false;
  }
}

// -- submitting and following a job ----------------------------------------------------

/** @returns {import("./inversion-client.js").SubmitParams} */
function params() {
  const out = {};
  for (const element of form.elements) {
    const name = element.name;
    if (!name || name === "image" || element.closest("[hidden]")) continue;
    if (element.type === "checkbox") out[name] = element.checked;
    else if (element.value.trim() === "") continue; // absent: the service's default
    else out[name] = element.type === "number" ? Number(element.value) : element.value.trim();
  }
  return out;
}

function track(url) {
  jobUrls.push(url);
  return url;
}

function resetJob() {
  for (const url of jobUrls) URL.revokeObjectURL(url);
  jobUrls = [];
  $("job").hidden = true;
  $("result").hidden = true;
  $("reconstruction-figure").hidden = true;
  $("channels").replaceChildren();
  $("progress").value = 0;
  $("progress").max = 1;
  $("progress-text").textContent = "";
  $("job-detail").textContent = "";
  for (const id of ["psnr", "latent-error", "latents-shape"]) $(id).textContent = "–";
}

function setStatus(view) {
  $("job-status").textContent = view.status;
  $("job").dataset.status = view.status;
  let detail = "";
  if (view.status === "queued" && view.queue_position != null) {
    detail = `(position ${view.queue_position + 1} in the queue)`;
  }
  if (view.error) detail = `${view.error.code}: ${view.error.message}`;
  $("job-detail").textContent = detail;
  if (view.progress) setProgress(view.progress);
}

function setProgress({ step, total }) {
  $("progress").max = total;
  $("progress").value = step;
  $("progress-text").textContent = `step ${step} of ${total}`;
}

// A method's own fields show with it only: a hidden field is not sent (see params()).
function showMethodFields() {
  const method = $("method").value;
  for (const field of form.querySelectorAll("[data-methods]")) {
    field.hidden = !field.dataset.methods.split(" ").includes(method);
  }
}
$("method").addEventListener("change", showMethodFields);
showMethodFields();

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors();
  const image = imageInput.files[0];
  if (!image) {
    showAt("image", "pick or drop an image first");
    return;
  }
  resetJob();
  $("submit").disabled = true;
  const api = client();
  try {
    const accepted = await api.submit(image, params());
    running = accepted.id;
    $("cancel").disabled = false;
    $("job").hidden = false;
    $("job-id").textContent = accepted.id;
    setStatus(accepted);
    const view = await follow(api, accepted.id);
    running = null;
    $("cancel").disabled = true;
    if (view.status === "succeeded") await showResult(api, view, image);
  } catch (error) {
    showError(error);
  } finally {
    running = null;
    $("cancel").disabled = true;
    $("submit").disabled = false;
  }
});

/** The job's events until it ends (the stream is opened again if it drops before); its
 * final status. */
async function follow(api, id) {
  for (;;) {
    for await (const { event: name, data } of api.events(id)) {
      if (name === "status") setStatus(data);
      else if (name === "progress") setProgress(data);
      else if (name === "end") break;
    }
    const view = await api.status(id);
    setStatus(view);
    if (!["queued", "running"].includes(view.status)) return view;
  }
}

$("cancel").addEventListener("click", async () => {
  if (!running) return;
  $("cancel").disabled = true;
  try {
    await client().cancel(running); // the event stream then ends with `canceled`
  } catch (error) {
    showError(error);
  }
});

// -- the result ------------------------------------------------------------------------

async function showResult(api, view, image) {
  const result = view.result;
  const aspect = `${result.width} / ${result.height}`;
  const input = $("result-input");
  input.src = track(URL.createObjectURL(image));
  // The job's resize_mode crops the centre by default: cover shows the same box.
  input.style.aspectRatio = aspect;
  input.classList.toggle("stretch", view.params?.resize_mode === "stretch");

  const file = await api.download(view.id);
  const download = $("download");
  download.href = track(URL.createObjectURL(file));
  download.download = `${view.id}.safetensors`;
  const { tensors } = parseSafetensors(await file.arrayBuffer());
  showChannels(tensors.latents);
  $("latents-shape").textContent = `${result.latents_shape.join(" × ")} ${result.dtype}`;
  $("metadata").textContent = JSON.stringify(result, null, 2);

  if (result.reconstruction_psnr != null) {
    $("psnr").textContent = `${result.reconstruction_psnr.toFixed(2)} dB`;
    $("latent-error").textContent = result.reconstruction_latent_error.toExponential(3);
    const png = await api.reconstruction(view.id);
    const reconstruction = $("reconstruction");
    reconstruction.src = track(URL.createObjectURL(png));
    reconstruction.style.aspectRatio = aspect;
    await reconstruction.decode();
    $("reconstruction-figure").hidden = false;
  }
  $("result").hidden = false;
}

/**
 * Each channel of the (1, C, H, W) latents as a grayscale image, scaled to its own min..max.
 * @param {import("./safetensors.js").Tensor} latents
 */
function showChannels(latents) {
  const [, channels, height, width] = latents.shape;
  const box = $("channels");
  for (let c = 0; c < channels; c++) {
    const plane = latents.data.subarray(c * height * width, (c + 1) * height * width);
    let low = Infinity;
    let high = -Infinity;
    for (const v of plane) {
      if (v < low) low = v;
      if (v > high) high = v;
    }
    const span = high - low || 1;
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const context = canvas.getContext("2d");
    const pixels = context.createImageData(width, height);
    for (let i = 0; i < plane.length; i++) {
      const gray = Math.round((255 * (plane[i] - low)) / span);
      pixels.data.set([gray, gray, gray, 255], i * 4);
    }
    context.putImageData(pixels, 0, 0);
    const figure = document.createElement("figure");
    const caption = document.createElement("figcaption");
    caption.textContent = `channel ${c} (${low.toFixed(2)} … ${high.toFixed(2)})`;
    figure.append(canvas, caption);
    box.append(figure);
  }
}
