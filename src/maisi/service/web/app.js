// The page of `maisi serve`: a request form, the job list (polled), and a NiiVue viewer of a finished job.
// NiiVue (vendor/niivue.umd.js, window.niivue) renders; this file only wires the UI to the /v1 routes.
"use strict";

// CT windows as [level, width] in HU (the usual radiology presets).
const PRESETS = { lung: [-600, 1500], soft: [40, 400], bone: [400, 1800] };
const VIEWABLE = [".nii.gz", ".nii", ".nrrd"];  // what NiiVue reads by URL (a DICOM series comes in the zip)
const TOKEN_KEY = "maisi-token";
const $ = (id) => document.getElementById(id);

// ---- the API, with the bearer token when the server has one ------------------------------------------
function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(path, options = {}) {
  const reply = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (reply.status === 401) {
    $("token-form").hidden = false;
    throw new Error("this server needs a bearer token: enter it above");
  }
  const body = (reply.headers.get("content-type") || "").includes("json") ? await reply.json() : await reply.blob();
  if (!reply.ok) throw new Error(body.detail ? `${reply.status}: ${JSON.stringify(body.detail)}` : `${reply.status}`);
  return body;
}

function say(text) { $("status").textContent = text; }

// ---- the form -------------------------------------------------------------------------------------------
async function loadInfo() {
  const info = await api("/v1/maisi/info");
  $("token-form").hidden = true;
  $("server-info").textContent = `maisi ${info.version} · ${info.model.config} · ${info.devices.join(", ")}`;
  $("regions").replaceChildren(...info.body_regions.map((r) => {
    const label = document.createElement("label");
    label.innerHTML = `<input type="checkbox" name="body_region" value="${r}"> ${r}`;
    return label;
  }));
  for (const [name, exts] of [["image_output_ext", info.image_output_ext], ["label_output_ext", info.label_output_ext]]) {
    $("job-form").elements[name].replaceChildren(...exts.map((e) => new Option(e, e)));
  }
  return info;
}

function payload() {
  const f = $("job-form").elements;
  const list = (s) => s.split(",").map((x) => x.trim()).filter(Boolean);
  const triple = (prefix, parse) => {
    const v = ["x", "y", "z"].map((a) => f[`${prefix}_${a}`].value);
    return v.every((x) => x === "") ? undefined : v.map(parse);
  };
  const body = {
    num_output_samples: parseInt(f.num_output_samples.value, 10),
    body_region: [...document.querySelectorAll("input[name=body_region]:checked")].map((e) => e.value),
    anatomy_list: list(f.anatomy_list.value), tumour: list(f.tumour.value),
    output_size: triple("size", (x) => parseInt(x, 10)), spacing: triple("spacing", parseFloat),
    seed: parseInt(f.seed.value || "0", 10), steps: f.steps.value ? parseInt(f.steps.value, 10) : undefined,
    image_output_ext: f.image_output_ext.value, label_output_ext: f.label_output_ext.value,
    quality_check: f.quality_check.checked,
  };
  return JSON.stringify(body);  // undefined fields are left out: the server's defaults apply
}

async function send(path) {
  const message = $("form-message");
  try {
    const reply = await api(path, { method: "POST", body: payload(), headers: { "Content-Type": "application/json" } });
    message.className = "ok";
    message.textContent = reply.id ? `job ${reply.id} queued` : `ok: ${JSON.stringify(reply)}`;
    if (reply.warnings && reply.warnings.length) message.textContent += `\n${reply.warnings.join("\n")}`;
    refreshJobs();
  } catch (e) {
    message.className = "";
    message.textContent = e.message;
  }
}

// ---- the job list ---------------------------------------------------------------------------------------
let shownJobs = "";

async function refreshJobs() {
  let jobs;
  try {
    jobs = (await api("/v1/jobs?limit=20")).jobs;
  } catch (e) {
    return say(e.message);
  }
  const seen = JSON.stringify(jobs.map((j) => [j.id, j.state, j.progress, j.message]));
  if (seen === shownJobs) return;  // unchanged: keep the rows (and the buttons under the pointer)
  shownJobs = seen;
  $("job-rows").replaceChildren(...jobs.map((j) => {
    const row = document.createElement("tr");
    row.dataset.jobId = j.id;
    row.dataset.state = j.state;
    const pct = Math.round(100 * j.progress);
    row.innerHTML = `<td class="id">${j.id}</td><td>${j.state}</td>` +
      `<td><progress max="1" value="${j.progress}"></progress> ${pct}%</td><td></td><td></td>`;
    row.cells[3].textContent = j.error ? `${j.message}: ${j.error}` : j.message;
    const act = (text, handler) => {
      const b = document.createElement("button");
      b.textContent = text;
      b.className = text.toLowerCase();
      b.onclick = handler;
      row.cells[4].append(b);
    };
    if (j.state === "done") {
      act("View", () => openJob(j.id));
      act("Download", () => download(j.id));
    } else if (j.state === "queued" || j.state === "running") {
      act("Cancel", () => api(`/v1/jobs/${j.id}`, { method: "DELETE" }).then(refreshJobs, (e) => say(e.message)));
    }
    return row;
  }));
}

async function download(id) {
  const blob = await api(`/v1/jobs/${id}/result`);
  const a = Object.assign(document.createElement("a"), { href: URL.createObjectURL(blob), download: `maisi_${id}.zip` });
  a.click();
  URL.revokeObjectURL(a.href);
}

// ---- the viewer -----------------------------------------------------------------------------------------
const viewer = { nv: null, legend: null, job: null, files: [] };
window.maisiViewer = viewer;  // for the browser test and the console

async function initViewer() {
  const nv = new niivue.Niivue({
    backColor: [0, 0, 0, 1], show3Dcrosshair: false, crosshairWidth: 1, crosshairWidthUnit: "mm", isColorbar: false, dragAndDropEnabled: false,
    multiplanarShowRender: niivue.SHOW_RENDER.NEVER,
  });
  await nv.attachToCanvas($("gl"));
  nv.setSliceType(nv.sliceTypeMultiplanar);
  nv.onLocationChange = (where) => { $("location").textContent = where.string; syncSliders(); };
  viewer.nv = nv;
  viewer.legend = (await api("/v1/maisi/legend")).labels;
}

async function openJob(id) {
  $("viewer").hidden = false;
  document.body.dataset.viewer = "loading";
  if (!viewer.nv) await initViewer();
  viewer.job = id;
  viewer.files = (await api(`/v1/jobs/${id}/files`)).files;
  const stems = [...new Set(viewer.files.map((f) => f.name.match(/^(.*)_record\.json$/)).filter(Boolean).map((m) => m[1]))];
  $("sample").replaceChildren(...stems.map((s) => new Option(s, s)));
  $("viewer-title").textContent = `job ${id}`;
  if (stems.length) await showSample(stems[0]);
}

async function showSample(stem) {
  const nv = viewer.nv;
  document.body.dataset.viewer = "loading";
  const find = (kind) => viewer.files.find((f) => !f.folder && f.name.startsWith(`${stem}_${kind}`) &&
    VIEWABLE.some((e) => f.name.endsWith(e)));
  const record = await api(`/v1/jobs/${viewer.job}/files/${stem}_record.json`);
  $("record").textContent = JSON.stringify(record, null, 2);
  const image = find("image"), label = find("label");
  const url = (f) => ({ url: `/v1/jobs/${viewer.job}/files/${encodeURIComponent(f.name)}`, headers: authHeaders(), name: f.name });
  if (!image) {
    say("the viewer reads NIfTI or NRRD; this job wrote DICOM: download the zip");
    return;
  }
  while (nv.volumes.length) nv.removeVolume(nv.volumes[nv.volumes.length - 1]);
  const volumes = [{ ...url(image), colormap: "gray" }];
  if (label) volumes.push(url(label));
  await nv.loadVolumes(volumes);
  if (label) showLabels(nv.volumes[1]);
  applyOverlay();
  setPreset("soft");
  for (const s of document.querySelectorAll(".slice")) s.max = nv.volumes[0].dimsRAS[1 + Number(s.dataset.axis)] - 1;
  syncSliders();
  say(`showing ${stem}`);
  document.body.dataset.viewer = "ready";
}

function showLabels(vol) {
  // NiiVue's label colormap from the legend route: the same colours as the PNG previews
  const cm = { R: [0], G: [0], B: [0], A: [0], I: [0], labels: [""] };
  for (const l of viewer.legend) {
    cm.R.push(l.rgb[0]); cm.G.push(l.rgb[1]); cm.B.push(l.rgb[2]);
    cm.A.push(l.rgb.some((c) => c > 0) ? 255 : 0);  // the body (200) stays transparent
    cm.I.push(l.id); cm.labels.push(l.name);
  }
  vol.setColormapLabel(cm);
  const present = new Set(vol.img);
  $("legend-list").replaceChildren(...viewer.legend.filter((l) => present.has(l.id)).map((l) => {
    const li = document.createElement("li");
    li.dataset.label = l.id;
    li.innerHTML = `<span class="swatch" style="background: rgb(${l.rgb.join(",")})"></span>`;
    li.append(`${l.id} ${l.name}`);
    return li;
  }));
  viewer.nv.updateGLVolume();
}

function applyOverlay() {
  const nv = viewer.nv;
  if (nv && nv.volumes.length > 1) nv.setOpacity(1, $("overlay").checked ? parseFloat($("opacity").value) : 0);
}

function setPreset(name) {
  const vol = viewer.nv.volumes[0];
  const [level, width] = PRESETS[name];
  vol.cal_min = level - width / 2;
  vol.cal_max = level + width / 2;
  viewer.nv.updateGLVolume();
  for (const b of document.querySelectorAll(".preset")) b.classList.toggle("active", b.dataset.preset === name);
  $("window-value").textContent = `${vol.cal_min} to ${vol.cal_max} HU`;
  document.body.dataset.preset = name;
}

function syncSliders() {
  const nv = viewer.nv;
  if (!nv.volumes.length) return;
  for (const s of document.querySelectorAll(".slice")) {
    const n = nv.volumes[0].dimsRAS[1 + Number(s.dataset.axis)];
    s.value = Math.min(n - 1, Math.floor(nv.scene.crosshairPos[s.dataset.axis] * n));
  }
}

function scrollSlice(slider) {
  // move the crosshair by whole voxels along the slider's RAS axis (NiiVue redraws and reports the location)
  const nv = viewer.nv, axis = Number(slider.dataset.axis);
  const n = nv.volumes[0].dimsRAS[1 + axis];
  const now = Math.min(n - 1, Math.floor(nv.scene.crosshairPos[axis] * n));
  const step = [0, 0, 0];
  step[axis] = Number(slider.value) - now;
  nv.moveCrosshairInVox(...step);
}

// ---- start ----------------------------------------------------------------------------------------------
function start() {
  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("token-form").onsubmit = (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    loadInfo().then(() => say(""), (err) => say(err.message));
  };
  $("job-form").onsubmit = (e) => { e.preventDefault(); send("/v1/jobs"); };
  $("plan-button").onclick = () => send("/v1/plan");
  for (const b of document.querySelectorAll(".preset")) b.onclick = () => setPreset(b.dataset.preset);
  for (const s of document.querySelectorAll(".slice")) s.oninput = () => scrollSlice(s);
  $("sample").onchange = (e) => showSample(e.target.value);
  $("overlay").onchange = applyOverlay;
  $("opacity").oninput = applyOverlay;
  loadInfo().catch((e) => say(e.message));
  refreshJobs();
  setInterval(refreshJobs, 1000);
}

start();
