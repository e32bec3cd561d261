// difflab serve: the page. Plain JS, no build step, nothing fetched from anywhere but this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  models: [], samplers: [], etaSamplers: [], limits: {}, model: null,
  job: null, abort: null, compare: { a: null, b: null }, wantB: false,
  inpaint: { uploadId: null, side: 0, channels: 1, pixels: null, mask: null, painting: false, sourceName: "" },
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c);
  return node;
}

async function api(path, options = {}) {
  const resp = await fetch(path, options);
  const type = resp.headers.get("content-type") || "";
  const body = type.includes("json") ? await resp.json() : await resp.text();
  if (!resp.ok) throw new Error((body && body.error) || `${resp.status} ${resp.statusText}`);
  return body;
}

function showError(message) {
  const box = $("form-error");
  box.textContent = message || "";
  box.hidden = !message;
}

// ---- models and the form ------------------------------------------------------------------------------

async function loadModels() {
  const info = await api("/api/models");
  Object.assign(state, { models: info.models, samplers: info.samplers, etaSamplers: info.eta_samplers,
                         limits: info.limits });
  const select = $("model");
  select.replaceChildren(...info.models.map((m) => el("option", { value: m.name, text: m.name })));
  $("n").max = info.limits.max_n;
  $("prompt").maxLength = info.limits.max_prompt;
  $("prompt-hint").textContent = `at most ${info.limits.max_prompt} characters`;
  selectModel(info.models[0].name);
}

function fillSamplers(select, value) {
  select.replaceChildren(...state.samplers.map((s) => el("option", { value: s, text: s })));
  select.value = value;
}

function selectModel(name) {
  const m = state.models.find((x) => x.name === name);
  state.model = m;
  $("model").value = name;
  const labels = m.num_classes !== null || m.classifiers.length > 0;
  const show = {
    text: m.text, labels, guidance: m.guidance, classifiers: m.classifiers.length > 0,
    single: m.kind !== "cascade", cascade: m.kind === "cascade", inpaint: m.inpaint !== null, eta: false,
  };
  for (const node of document.querySelectorAll("[data-when]")) node.hidden = !show[node.dataset.when];
  const chips = [`${m.side}\u00d7${m.side}`, m.channels === 1 ? "grey" : "RGB", `T = ${m.T}`];
  if (m.kind === "cascade") chips.unshift(`cascade of ${m.stages.length}`);
  if (m.converted) chips.unshift("converted");
  if (m.text) chips.push("text");
  if (m.num_classes !== null) chips.push(`${m.num_classes} classes`);
  if (m.guidance) chips.push("classifier-free guidance");
  if (m.inpaint) chips.push(`inpaints (${m.inpaint})`);
  $("model-info").replaceChildren(...chips.map((c) => el("span", { class: "chip", text: c })),
                                  el("span", { class: "chip plain", text: m.path, title: m.path }));
  const d = m.defaults;
  $("n").value = d.n;
  $("seed").value = d.seed;
  fillLabels(m.num_classes);
  if (m.kind !== "cascade") {
    fillSamplers($("sampler"), d.sampler);
    $("steps").value = typeof d.steps === "number" ? d.steps : parseInt(String(d.steps).replace(/^\D+/, ""), 10);
    $("steps").max = Math.min(m.T, state.limits.max_steps);
    $("eta").value = d.eta;
    $("guidance").value = d.guidance;
    $("classifier").replaceChildren(el("option", { value: "", text: "none" }),
                                    ...m.classifiers.map((c) => el("option", { value: c, text: c })));
    updateEta();
  } else {
    buildStages(m);
  }
  if (m.inpaint) {
    $("inpaint-rule-hint").textContent = m.inpaint === "glide" ? "(an inpainting model: GLIDE's rule)"
      : "(any model: replacement)";
    resetInpaint(m);
  }
}

function fillLabels(numClasses) {
  const select = $("label");
  const k = numClasses !== null ? numClasses : 10;  // a classifier-guided model: the classifier's classes
  const options = [el("option", { value: "all", text: "all (cycling)" })];
  for (let i = 0; i < k; i++) options.push(el("option", { value: String(i), text: String(i) }));
  select.replaceChildren(...options);
}

function updateEta() {
  const on = state.etaSamplers.includes($("sampler").value);
  document.querySelector('[data-when="eta"]').hidden = !on;
}

function buildStages(m) {
  const box = $("stages");
  box.replaceChildren(...m.stages.map((st, k) => {
    const sampler = el("select", { id: `stage-${k}-sampler` });
    fillSamplers(sampler, st.defaults.sampler);
    const steps = typeof st.defaults.steps === "number" ? st.defaults.steps
      : parseInt(String(st.defaults.steps).replace(/^\D+/, ""), 10);
    const fields = [
      el("div", { class: "field wide" }, el("label", { text: "Sampler" }), sampler),
      el("div", { class: "field" }, el("label", { text: "Steps" }),
         el("input", { id: `stage-${k}-steps`, type: "number", min: 1, max: st.T, value: steps })),
      el("div", { class: "field" }, el("label", { text: "Guidance" }),
         el("input", { id: `stage-${k}-guidance`, type: "number", min: 0, step: 0.5, value: st.defaults.guidance || 0 })),
    ];
    if (st.low_res && st.noise_aug) {
      fields.push(el("div", { class: "field" }, el("label", { text: "Aug. level s" }),
                     el("input", { id: `stage-${k}-aug`, type: "number", min: 0, max: st.aug_steps,
                                   value: st.defaults.aug_level || 0 })));
    }
    const title = `Stage ${k + 1}: ${st.run.split("/").pop()} (${st.side}\u00d7${st.side}${st.truncated ? ", truncated" : ""})`;
    return el("fieldset", { class: "stage" }, el("legend", { text: title }), el("div", { class: "row" }, ...fields));
  }));
}

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

async function buildRequest() {
  const m = state.model;
  const req = { model: m.name, n: numberOrNull("n"), seed: numberOrNull("seed") };
  if (m.text) req.prompt = $("prompt").value;
  if (m.num_classes !== null || ($("classifier").value && m.kind !== "cascade")) req.label = $("label").value;
  if (m.kind === "cascade") {
    req.stages = m.stages.map((st, k) => {
      const out = { sampler: $(`stage-${k}-sampler`).value, steps: numberOrNull(`stage-${k}-steps`),
                    guidance: numberOrNull(`stage-${k}-guidance`) };
      if ($(`stage-${k}-aug`)) out.aug_level = numberOrNull(`stage-${k}-aug`);
      return out;
    });
    return req;
  }
  req.sampler = $("sampler").value;
  req.steps = numberOrNull("steps");
  if (state.etaSamplers.includes(req.sampler)) req.eta = numberOrNull("eta");
  if (m.guidance) req.guidance = numberOrNull("guidance");
  if (m.classifiers.length && $("classifier").value) {
    req.classifier = $("classifier").value;
    req.classifier_scale = numberOrNull("classifier-scale");
  }
  if (m.inpaint && $("inpaint-on").checked) {
    if (!state.inpaint.uploadId) throw new Error("inpaint: choose an image first (a file, or Inpaint on a gallery result)");
    const maskId = await uploadMask();
    req.inpaint = { image: state.inpaint.uploadId, mask: maskId };
    if ($("inpaint-rule").value) req.inpaint.rule = $("inpaint-rule").value;
  }
  return req;
}

// ---- a job: POST, then its event stream -------------------------------------------------------------------

function parseEvents(buffer, onEvent) {
  let cut;
  while ((cut = buffer.indexOf("\n\n")) >= 0) {
    const block = buffer.slice(0, cut);
    buffer = buffer.slice(cut + 2);
    let name = "message", data = "";
    for (const line of block.split("\n")) {
      if (line.startsWith("event: ")) name = line.slice(7);
      else if (line.startsWith("data: ")) data += line.slice(6);
    }
    if (data) onEvent(name, JSON.parse(data));
  }
  return buffer;
}

function setJobUI(active) {
  $("sample").disabled = active;
  $("sample-b").disabled = active || !state.compare.a;
  $("cancel").disabled = !active;
}

function fmtSeconds(s) {
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 90) return `${s.toFixed(1)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

async function runJob(asB = false) {
  showError("");
  let req;
  try {
    req = await buildRequest();
    if (asB) req.seed = state.compare.a.settings.seed;
  } catch (e) { showError(e.message); return; }
  state.wantB = asB;
  const abort = new AbortController();
  state.abort = abort;
  setJobUI(true);
  $("job-idle").hidden = true;
  $("job").hidden = false;
  $("result").hidden = true;
  document.querySelector(".previews").hidden = false;
  $("cancel").hidden = false;
  $("preview").removeAttribute("src");
  $("job-bar").style.width = "0";
  $("job-status").textContent = "Sending\u2026";
  $("job-eta").textContent = "";
  document.body.dataset.events = "0";
  let resp;
  try {
    resp = await fetch("/api/sample", { method: "POST", headers: { "Content-Type": "application/json" },
                                        body: JSON.stringify(req), signal: abort.signal });
  } catch (e) { finishJob(); showError(`the server did not answer: ${e.message}`); return; }
  if (!resp.ok) {
    let message = `${resp.status} ${resp.statusText}`;
    try { message = (await resp.json()).error || message; } catch (_) { /* not JSON */ }
    finishJob();
    $("job").hidden = true;
    $("job-idle").hidden = false;
    showError(message);
    return;
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = parseEvents(buffer + decoder.decode(value, { stream: true }), onJobEvent);
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(`the event stream broke: ${e.message}`);
  }
  finishJob();
}

function finishJob() {
  state.job = null;
  state.abort = null;
  setJobUI(false);
  pollStatus();
}

window.difflabEvents = [];  // the names of the events received (the browser tests read them)

function onJobEvent(name, data) {
  window.difflabEvents.push(name);
  document.body.dataset.events = String(Number(document.body.dataset.events || 0) + 1);
  const status = $("job-status");
  if (name === "job") {
    state.job = data.id;
    status.textContent = data.ahead ? `Waiting: ${data.ahead} job${data.ahead > 1 ? "s" : ""} ahead` : "Starting\u2026";
  } else if (name === "queued") {
    status.textContent = data.ahead ? `Waiting: ${data.ahead} job${data.ahead > 1 ? "s" : ""} ahead` : "Next in line\u2026";
  } else if (name === "started") {
    status.textContent = "Loading and sampling\u2026";
  } else if (name === "progress") {
    const parts = [`Step ${data.step} / ${data.steps}`];
    if (data.batches > 1) parts.push(`batch ${data.batch} / ${data.batches}`);
    if (data.stages > 1) parts.push(`stage ${data.stage} / ${data.stages}`);
    status.textContent = parts.join(" \u00b7 ");
    $("job-bar").style.width = `${(100 * data.fraction).toFixed(1)}%`;
    const what = data.eta_exact ? "" : " (this stage)";
    $("job-eta").textContent = `ETA ${fmtSeconds(data.eta_s)}${what}`;
    $("job-eta").dataset.eta = data.eta_s;
  } else if (name === "preview") {
    $("preview").src = data.image;
    $("preview").dataset.step = data.step;
  } else if (name === "done") {
    status.textContent = `Done in ${fmtSeconds(data.entry.seconds)}`;
    $("job-bar").style.width = "100%";
    $("job-eta").textContent = "";
    document.querySelector(".previews").hidden = true;  // the result below replaces the last x0^
    $("cancel").hidden = true;
    showResult(data.entry);
    addToGallery(data.entry);
    if (state.wantB) setCompare("b", data.entry);
  } else if (name === "failed") {
    status.textContent = "Failed";
    showError(data.error);
  } else if (name === "cancelled") {
    status.textContent = "Cancelled";
    $("job-eta").textContent = "";
  }
}

$("cancel").addEventListener("click", async () => {
  const abort = state.abort;  // this job's stream, not the next one's
  if (state.job) {
    try { await api(`/api/jobs/${state.job}/cancel`, { method: "POST" }); } catch (_) { /* gone already */ }
  }
  // the stream says "cancelled" at the job's next step; if it has not ended by then, closing it cancels too
  setTimeout(() => { if (abort && state.abort === abort) abort.abort(); }, 3000);
});

// ---- results and the gallery ------------------------------------------------------------------------------

function fileUrl(entry, name) { return `/api/gallery/${entry.id}/${name}`; }

function describe(entry) {
  const s = entry.settings;
  const parts = [];
  if (s.stages) parts.push(s.stages.map((st) => `${st.sampler} ${st.steps}`).join(" \u2192 "));
  else parts.push(`${s.sampler}, ${s.steps} steps`);
  parts.push(`seed ${s.seed}`, `n ${s.n}`);
  if (s.label !== null && s.label !== undefined) parts.push(`label ${s.label}`);
  if (s.guidance) parts.push(`w ${s.guidance}`);
  if (s.classifier) parts.push(`${s.classifier} s ${s.classifier_scale}`);
  if (s.inpaint_rule) parts.push(`inpaint (${s.inpaint_rule})`);
  return parts.join(" \u00b7 ");
}

function showResult(entry) {
  $("result").hidden = false;
  $("result-grid").src = fileUrl(entry, "grid.png");
  $("result-grid").dataset.entry = entry.id;
  $("result-meta").replaceChildren();
  $("result-meta").append(el("div", { text: `${entry.model} \u00b7 ${describe(entry)}` }));
  if (entry.settings.prompt) $("result-meta").append(el("div", { class: "prompt", text: `\u201c${entry.settings.prompt}\u201d` }));
  $("result-cmd").textContent = entry.command;
  $("result-links").replaceChildren(
    el("a", { href: fileUrl(entry, "images.npz"), text: "images.npz" }),
    el("a", { href: fileUrl(entry, "settings.json"), target: "_blank", text: "settings.json" }),
    el("a", { href: fileUrl(entry, "grid.png"), target: "_blank", text: "grid.png" }));
}

$("copy-cmd").addEventListener("click", async () => {
  try { await navigator.clipboard.writeText($("result-cmd").textContent); $("copy-cmd").textContent = "Copied"; }
  catch (_) { $("copy-cmd").textContent = "Select it"; }
  setTimeout(() => { $("copy-cmd").textContent = "Copy"; }, 1500);
});

function tile(entry) {
  const img = el("img", { src: fileUrl(entry, "grid.png"), alt: entry.id, loading: "lazy",
                          onclick: () => showResult(entry) });
  const info = el("div", { class: "info" }, el("b", { text: entry.model }), el("br"),
                  el("span", { text: describe(entry) }));
  if (entry.settings.prompt) info.append(el("br"), el("span", { class: "prompt", text: `\u201c${entry.settings.prompt}\u201d` }));
  const buttons = el("div", { class: "buttons" },
    el("button", { type: "button", class: "ghost", text: "A", title: "compare: left", onclick: () => setCompare("a", entry) }),
    el("button", { type: "button", class: "ghost", text: "B", title: "compare: right", onclick: () => setCompare("b", entry) }),
    el("button", { type: "button", class: "ghost", text: "Settings", title: "put these settings in the form",
                   onclick: () => applySettings(entry) }));
  const m = state.models.find((x) => x.name === entry.model);
  if (m && m.inpaint && entry.side === m.side) {
    buttons.append(el("button", { type: "button", class: "ghost", text: "Inpaint", title: "inpaint its first image",
                                  onclick: () => inpaintFromEntry(entry) }));
  }
  buttons.append(el("button", { type: "button", class: "ghost", text: "\u2715", title: "delete",
                                onclick: () => deleteEntry(entry) }));
  return el("div", { class: "tile", "data-entry": entry.id }, img, info, buttons);
}

function addToGallery(entry) {
  const box = $("gallery");
  box.prepend(tile(entry));
  countGallery();
}

async function loadGallery() {
  const { entries } = await api("/api/gallery");
  $("gallery").replaceChildren(...entries.map(tile));
  countGallery();
}

function countGallery() {
  const box = $("gallery"), n = box.querySelectorAll(".tile").length;
  $("gallery-count").textContent = `${n} result${n === 1 ? "" : "s"}`;
  const empty = box.querySelector(".empty");
  if (!n && !empty) box.append(el("div", { class: "empty", text: "No results yet: every finished job lands here, "
                                           + "with its settings and the command that draws it again." }));
  if (n && empty) empty.remove();
}

async function deleteEntry(entry) {
  try { await api(`/api/gallery/${entry.id}`, { method: "DELETE" }); } catch (e) { showError(e.message); return; }
  const node = document.querySelector(`.tile[data-entry="${entry.id}"]`);
  if (node) node.remove();
  countGallery();
}

function applySettings(entry) {
  if (!state.models.find((x) => x.name === entry.model)) return;
  selectModel(entry.model);
  const s = entry.settings;
  $("seed").value = s.seed;
  $("n").value = s.n;
  if (s.prompt !== null && s.prompt !== undefined) $("prompt").value = s.prompt;
  if (s.label !== null && s.label !== undefined) $("label").value = String(s.label);
  if (s.stages) {
    s.stages.forEach((st, k) => {
      $(`stage-${k}-sampler`).value = st.sampler;
      if (typeof st.steps === "number") $(`stage-${k}-steps`).value = st.steps;
      $(`stage-${k}-guidance`).value = st.guidance || 0;
      if ($(`stage-${k}-aug`)) $(`stage-${k}-aug`).value = st.aug_level || 0;
    });
    return;
  }
  $("sampler").value = s.sampler;
  if (typeof s.steps === "number") $("steps").value = s.steps;
  if (s.eta !== null && s.eta !== undefined) $("eta").value = s.eta;
  $("guidance").value = s.guidance || 0;
  $("classifier").value = s.classifier || "";
  $("classifier-scale").value = s.classifier_scale || 0;
  updateEta();
}

// ---- compare ----------------------------------------------------------------------------------------------

function setCompare(side, entry) {
  state.compare[side] = entry;
  for (const node of document.querySelectorAll(`.tile.pick-${side}`)) node.classList.remove(`pick-${side}`);
  const node = document.querySelector(`.tile[data-entry="${entry.id}"]`);
  if (node) node.classList.add(`pick-${side}`);
  $("sample-b").disabled = !state.compare.a || !!state.job;
  const { a, b } = state.compare;
  $("compare-card").hidden = false;
  $("compare-a").src = a ? fileUrl(a, "grid.png") : "";
  $("compare-b").src = b ? fileUrl(b, "grid.png") : "";
  const rows = [["model", (e) => e.model]];
  const keys = new Set();
  for (const e of [a, b]) if (e) Object.keys(e.settings).forEach((k) => keys.add(k));
  const shown = (v) => (v === null || v === undefined ? "\u2013" : typeof v === "string" ? v : JSON.stringify(v));
  for (const k of keys) rows.push([k, (e) => shown(e.settings[k])]);
  rows.push(["seconds", (e) => String(e.seconds)]);
  const table = $("compare-table");
  table.replaceChildren(el("tr", {}, el("th", { text: "" }), el("th", { text: "A" }), el("th", { text: "B" })));
  for (const [k, get] of rows) {
    const va = a ? get(a) : "", vb = b ? get(b) : "";
    const differs = a && b && va !== vb && k !== "seconds";
    table.append(el("tr", { class: differs ? "diff" : "" }, el("th", { text: k }), el("td", { text: va }),
                    el("td", { text: vb })));
  }
  $("compare-seed").textContent = a && b ? (a.settings.seed === b.settings.seed ? `same seed ${a.settings.seed}`
    : "different seeds") : "pick A and B in the gallery";
}

$("sample-b").addEventListener("click", () => runJob(true));

// ---- inpainting: the source image and the mask painted on a canvas ----------------------------------------

function resetInpaint(m) {
  Object.assign(state.inpaint, { side: m.side, channels: m.channels, mask: new Uint8Array(m.side * m.side),
                                 pixels: null, uploadId: null });
  $("brush").max = Math.max(1, Math.round(m.side / 4));
  $("brush").value = Math.max(1, Math.round(m.side / 10));
  $("inpaint-on").checked = false;
  drawCanvas();
}

function drawCanvas() {
  const canvas = $("mask-canvas"), ctx = canvas.getContext("2d");
  const { side, pixels, mask } = state.inpaint;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!side) return;
  const cell = canvas.width / side;
  const image = ctx.createImageData(side, side);
  for (let i = 0; i < side * side; i++) {
    const v = pixels ? [pixels[4 * i], pixels[4 * i + 1], pixels[4 * i + 2]] : [40, 44, 60];
    const painted = mask[i] === 1;
    image.data[4 * i] = painted ? Math.round(v[0] * 0.35 + 255 * 0.65) : v[0];
    image.data[4 * i + 1] = painted ? Math.round(v[1] * 0.35 + 60 * 0.65) : v[1];
    image.data[4 * i + 2] = painted ? Math.round(v[2] * 0.35 + 90 * 0.65) : v[2];
    image.data[4 * i + 3] = 255;
  }
  const small = document.createElement("canvas");
  small.width = small.height = side;
  small.getContext("2d").putImageData(image, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(small, 0, 0, side * cell, side * cell);
}

function paintAt(event) {
  const canvas = $("mask-canvas"), rect = canvas.getBoundingClientRect();
  const { side, mask } = state.inpaint;
  const x = ((event.clientX - rect.left) / rect.width) * side, y = ((event.clientY - rect.top) / rect.height) * side;
  const r = Number($("brush").value) / 2;
  for (let row = Math.floor(y - r); row <= Math.ceil(y + r); row++) {
    for (let col = Math.floor(x - r); col <= Math.ceil(x + r); col++) {
      if (row < 0 || col < 0 || row >= side || col >= side) continue;
      if ((col + 0.5 - x) ** 2 + (row + 0.5 - y) ** 2 <= Math.max(r, 0.5) ** 2 + 0.25) mask[row * side + col] = 1;
    }
  }
  $("inpaint-on").checked = true;
  drawCanvas();
}

const canvas = $("mask-canvas");
canvas.addEventListener("pointerdown", (e) => {
  e.preventDefault();  // no text selection while painting
  state.inpaint.painting = true;
  canvas.setPointerCapture(e.pointerId);
  paintAt(e);
});
canvas.addEventListener("pointermove", (e) => { if (state.inpaint.painting) paintAt(e); });
canvas.addEventListener("pointerup", () => { state.inpaint.painting = false; });
$("mask-clear").addEventListener("click", () => { state.inpaint.mask.fill(0); drawCanvas(); });
$("mask-invert").addEventListener("click", () => {
  const m = state.inpaint.mask;
  for (let i = 0; i < m.length; i++) m[i] = 1 - m[i];
  drawCanvas();
});

async function useSourceBlob(blob, name) {
  showError("");
  const bitmap = await createImageBitmap(blob);
  const { side } = state.inpaint;
  if (bitmap.width !== side || bitmap.height !== side) {
    showError(`inpaint: the image is ${bitmap.width}\u00d7${bitmap.height}; this model takes ${side}\u00d7${side}`);
    return;
  }
  const off = document.createElement("canvas");
  off.width = off.height = side;
  const ctx = off.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  state.inpaint.pixels = ctx.getImageData(0, 0, side, side).data;
  try {
    const up = await api("/api/uploads", { method: "POST", headers: { "Content-Type": blob.type || "image/png" }, body: blob });
    state.inpaint.uploadId = up.id;
    state.inpaint.sourceName = name;
    document.body.dataset.inpaintSource = up.id;
  } catch (e) { showError(`upload: ${e.message}`); return; }
  $("inpaint-box").open = true;
  drawCanvas();
}

$("inpaint-file").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (file) useSourceBlob(file, file.name);
});

async function inpaintFromEntry(entry) {
  if (state.model.name !== entry.model) selectModel(entry.model);  // the same model keeps the form as it is
  const blob = await (await fetch(fileUrl(entry, "image_0.png"))).blob();
  $("inpaint-box").open = true;
  $("inpaint-box").scrollIntoView({ block: "nearest" });
  await useSourceBlob(blob, `${entry.id}/image_0.png`);
}

async function uploadMask() {
  const { side, mask } = state.inpaint;
  if (!mask.some((v) => v === 1)) throw new Error("inpaint: paint the region to fill in first");
  const off = document.createElement("canvas");
  off.width = off.height = side;
  const ctx = off.getContext("2d");
  const image = ctx.createImageData(side, side);
  for (let i = 0; i < side * side; i++) {
    const v = mask[i] === 1 ? 0 : 255;  // white = keep, black = fill in (difflab inpaint's mask)
    image.data.set([v, v, v, 255], 4 * i);
  }
  ctx.putImageData(image, 0, 0);
  const blob = await new Promise((resolve) => off.toBlob(resolve, "image/png"));
  const up = await api("/api/uploads", { method: "POST", headers: { "Content-Type": "image/png" }, body: blob });
  return up.id;
}

// ---- queue status and start -------------------------------------------------------------------------------

async function pollStatus() {
  try {
    const s = await api("/api/status");
    const waiting = Object.values(s.waiting).reduce((a, b) => a + b, 0);
    const running = Object.keys(s.running).length;
    $("queue-info").textContent = `${running} running \u00b7 ${waiting} waiting`;
  } catch (_) { $("queue-info").textContent = "server unreachable"; }
}

$("model").addEventListener("change", (e) => selectModel(e.target.value));
$("sampler").addEventListener("change", updateEta);
$("dice").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 2 ** 31); });
$("form").addEventListener("submit", (e) => { e.preventDefault(); runJob(false); });

(async () => {
  try {
    await loadModels();
    await loadGallery();
    document.body.dataset.ready = "1";
  } catch (e) { showError(`could not load the models: ${e.message}`); }
  pollStatus();
  setInterval(pollStatus, 2000);
})();
