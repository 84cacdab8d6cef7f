"use strict";
// aptp-serve's page: drives the A1111 API of the same server (no third-party code, no inline script).
const $ = (id) => document.getElementById(id);
const experts = {};   // expert key -> {macs_ratio, share, bytes}
const HISTORY = 10;
let defaults = {};

async function getJSON(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    throw new Error(body && body.detail ? body.detail : `${response.status} ${response.statusText}`);
  }
  return body;
}

function percent(ratio) { return ratio == null ? "?" : `${(100 * ratio).toFixed(1)} %`; }
function megabytes(bytes) { return bytes == null ? "?" : `${(bytes / 1048576).toFixed(2)} MiB`; }

async function init() {
  try {
    const [models, samplers] = await Promise.all([getJSON("/sdapi/v1/sd-models"), getJSON("/sdapi/v1/samplers")]);
    const model = models[0];
    $("model").textContent = model.title;
    defaults = model.aptp.defaults;
    const names = [];
    for (const e of model.aptp.experts) {
      experts[String(e.expert)] = e;
      names.push(`${e.expert}: ${percent(e.macs_ratio)} MACs, ${megabytes(e.bytes)}`);
    }
    $("experts").textContent = `Experts (${names.length}): ${names.join(" · ")}`;
    $("steps").value = defaults.steps;
    $("cfg").value = defaults.cfg_scale;
    for (const s of samplers) {
      const option = document.createElement("option");
      option.value = option.textContent = s.name;
      option.selected = s.name === defaults.sampler_name;
      $("sampler").appendChild(option);
    }
  } catch (err) {
    $("error").textContent = `cannot read the server's model: ${err.message}`;
  }
}

// The generation whose progress the bar shows (0: none). A poll still in flight when its request
// ends must not overwrite the finished bar with the server's reset progress.
let showing = 0;
let generations = 0;

async function pollProgress(generation) {
  try {
    const p = await getJSON("/sdapi/v1/progress");
    if (generation !== showing) return;
    $("bar").value = p.progress;
    const state = p.state || {};
    $("progress-text").textContent = state.sampling_steps
      ? `step ${state.sampling_step}/${state.sampling_steps}, ETA ${p.eta_relative.toFixed(1)} s` : "";
  } catch (err) { /* the next poll tries again */ }
}

function remember(prompt, image, latency) {
  const row = document.createElement("tr");
  for (const text of [prompt.length > 40 ? prompt.slice(0, 40) + "…" : prompt, String(image.expert),
                      percent(image.macs_ratio), `${latency.toFixed(2)} s`]) {
    const cell = document.createElement("td");
    cell.textContent = text;
    row.appendChild(cell);
  }
  const body = $("history").tBodies[0];
  body.insertBefore(row, body.firstChild);
  while (body.rows.length > HISTORY) body.deleteRow(body.rows.length - 1);
}

async function generate(event) {
  event.preventDefault();
  $("error").textContent = "";
  $("generate").disabled = true;
  $("bar").value = 0;
  const prompt = $("prompt").value;
  const request = {
    prompt, negative_prompt: $("negative").value, sampler_name: $("sampler").value,
    steps: Number($("steps").value), cfg_scale: Number($("cfg").value), seed: Number($("seed").value),
    width: defaults.width, height: defaults.height,
  };
  const started = performance.now();
  const generation = showing = ++generations;
  const timer = setInterval(() => pollProgress(generation), 250);
  try {
    const response = await getJSON("/sdapi/v1/txt2img", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(request),
    });
    const latency = (performance.now() - started) / 1000;
    const info = JSON.parse(response.info);
    const image = info.aptp.images[0];
    if (!image) throw new Error("interrupted: no image");
    $("image").src = `data:image/png;base64,${response.images[0]}`;
    $("expert").textContent = String(image.expert);
    $("macs").textContent = percent(image.macs_ratio);
    $("size").textContent = megabytes(image.expert_bytes);
    $("seed-used").textContent = String(image.seed);
    $("provider").textContent = image.provider || "?";
    $("latency").textContent = `${latency.toFixed(2)} s`;
    $("bar").value = 1;
    $("progress-text").textContent = `done: ${info.steps} ${info.sampler_name} steps`;
    remember(prompt, image, latency);
  } catch (err) {
    $("error").textContent = err.message;
    $("progress-text").textContent = "";
  } finally {
    clearInterval(timer);
    if (showing === generation) showing = 0;
    $("generate").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", generate);
  init();
});
