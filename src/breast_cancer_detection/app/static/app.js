// The page: model card summary, uploads (one request per image, in turn), and result cards.
// Plain JavaScript, no build step and nothing loaded from elsewhere.
"use strict";

const MAX_RETRIES = 5; // 503 answers retried after Retry-After, then shown as an error

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

const fmt = (x, digits = 3) => (typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "n/a");
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ------------------------------------------------------------------ model card

function withCI(value, ci) {
  let text = fmt(value);
  if (Array.isArray(ci) && typeof ci[0] === "number" && typeof ci[1] === "number") {
    text += ` (${fmt(ci[0])}–${fmt(ci[1])})`;
  }
  return text;
}

function metricList(section, ci, keys) {
  return keys
    .filter(([key]) => section && key in section)
    .map(([key, name]) => `${name} ${withCI(section[key], ci && ci[key])}`)
    .join(" · ");
}

function renderCard(card) {
  const dl = el("dl", { class: "facts" });
  const add = (term, ...details) => {
    dl.append(el("dt", { text: term }));
    dl.append(el("dd", {}, ...details));
  };
  add("Architecture", `${card.architecture ?? "unknown"} (${card.backend}), classes ${card.classes.join(", ")}`);
  add("Input", card.preprocessing.description);
  const t = card.threshold;
  add("Threshold", `${fmt(t.value)}: ${t.source}` + (t.method ? ` (${t.method})` : ""));

  const tr = card.training;
  const patients = Object.entries(tr.patients || {})
    .map(([subset, n]) => `${subset} ${n}`)
    .join(", ");
  add("Trained on", `${tr.data ?? "unknown data"}` +
      (patients ? `; patients per subset: ${patients} (grouped by ${tr.group_by ?? "patient"})` : "") +
      (tr.split_hash ? `; split ${tr.split_hash}` : ""));

  const val = card.metrics.validation;
  if (val) {
    add("Validation", `AUC ${fmt(val.val_auc)}, accuracy ${fmt(val.val_acc)} at epoch ${val.epoch ?? "?"} ` +
        "(chose the epoch, so optimistic)");
  }
  const ev = card.metrics.evaluation;
  if (ev) {
    const level = ev.ci_level ? `${Math.round(ev.ci_level * 100)}% CI` : "CI";
    const image = metricList(ev.image, ev.ci && ev.ci.image, [
      ["accuracy", "accuracy"], ["roc_auc", "AUC"], ["sensitivity", "sensitivity"],
      ["specificity", "specificity"]]);
    const patient = metricList(ev.patient, ev.ci && ev.ci.patient, [
      ["recognition_rate", "recognition rate"], ["roc_auc", "AUC"]]);
    add("Test metrics",
        el("span", { text: `${ev.subset ?? "?"} subset, ${ev.images ?? "?"} images of ` +
          `${ev.patients ?? "?"} patients; ${level} in brackets` }), el("br"),
        el("span", { text: `Images: ${image}` }),
        patient ? el("br") : null, patient ? el("span", { text: `Patients: ${patient}` }) : null);
    for (const caveat of ev.caveats || []) add("Caveat", caveat);
  } else if (card.metrics.note) {
    add("Test metrics", el("span", { class: "muted", text: card.metrics.note }));
  }
  add("Intended use", card.intended_use);

  const summary = document.getElementById("model-summary");
  summary.replaceChildren(dl);
  document.getElementById("model-json").textContent = JSON.stringify(card, null, 2);
}

async function loadCard() {
  const summary = document.getElementById("model-summary");
  try {
    const response = await fetch("api/model");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    renderCard(await response.json());
  } catch (error) {
    summary.replaceChildren(el("p", { class: "error", role: "alert",
      text: `The model card could not be loaded (${error.message}).` }));
  }
}

// ------------------------------------------------------------------ result cards

function newCard(file) {
  const status = el("span", { class: "status", text: "Waiting…" });
  const preview = el("img", { class: "original", src: URL.createObjectURL(file),
    alt: `The uploaded image ${file.name}` });
  const figures = el("div", { class: "figures" },
    el("figure", {}, preview, el("figcaption", { text: "Image" })));
  const verdict = el("div", { class: "verdict" });
  const item = el("li", { class: "card", "aria-busy": "true" },
    el("div", { class: "card-head" }, el("h3", { text: file.name }), status),
    el("div", { class: "card-body" }, figures, verdict));
  preview.addEventListener("error", () => {
    if (item.classList.contains("failed")) {
      figures.remove(); // not an image after all: the error says so
      return;
    }
    // TIFF, for one, is read by the server but not shown by most browsers.
    preview.replaceWith(el("div", { class: "no-preview",
      text: "No preview: this browser cannot show this file type." }));
  }, { once: true });
  return { item, status, figures, verdict };
}

function showResult(card, r) {
  const malignant = r.p_malignant >= r.threshold;
  card.figures.querySelector("figcaption").textContent = `Image, ${r.width} × ${r.height} px`;
  if (r.cam) {
    card.figures.append(el("figure", {},
      el("img", { class: "cam", src: r.cam, width: 224, height: 224,
        alt: `Grad-CAM overlay of ${r.name}: red marks the regions that most supported the answer "${r.label}"` }),
      el("figcaption", { text: `Grad-CAM for “${r.label}” (the model's centre view; red: strongest)` })));
  }
  if (r.tile_heatmap) {
    card.figures.append(el("figure", {},
      el("img", { class: "tiles", src: r.tile_heatmap,
        alt: `Tile heat map of ${r.name}: P(malignant) of each of its ${r.tiles} tiles, green low, red high` }),
      el("figcaption", { text: `Tile heat map: P(malignant) of ${r.tiles} tiles (green low, red high)` })));
  }

  const fill = el("div", { class: `fill ${malignant ? "high" : "low"}` });
  fill.style.width = `${Math.max(0, Math.min(1, r.p_malignant)) * 100}%`;
  const marker = el("div", { class: "marker", title: `threshold ${fmt(r.threshold)}` });
  marker.style.left = `${r.threshold * 100}%`;
  const bar = el("div", { class: "bar", role: "meter", "aria-valuemin": "0",
    "aria-valuemax": "1", "aria-valuenow": String(r.p_malignant),
    "aria-valuetext": `${fmt(r.p_malignant)}, threshold ${fmt(r.threshold)}`,
    "aria-labelledby": `pm-${card.id}` }, fill, marker);
  const markerLabel = el("span", { class: "marker-label", "aria-hidden": "true",
    text: `threshold ${fmt(r.threshold, 2)}` });
  markerLabel.style.left = `${r.threshold * 100}%`;

  card.verdict.replaceChildren(
    el("p", { class: `label ${malignant ? "high" : "low"}`, text: r.label }),
    el("div", { class: "meter" },
      el("div", { class: "meter-head" },
        el("span", { id: `pm-${card.id}`, text: "P(malignant)" }),
        el("strong", { class: "p-value", text: fmt(r.p_malignant) })),
      bar,
      el("div", { class: "scale", "aria-hidden": "true" },
        el("span", { text: "0" }), markerLabel, el("span", { text: "1" }))),
    el("p", { class: "small", text: `Threshold ${fmt(r.threshold)}, ${r.threshold_source}. ` +
      "An image at or above it is called malignant." }),
    el("p", { class: "small muted", text: r.tiles > 1
      ? `Large image: the average of ${r.tiles} overlapping tiles at the training scale.`
      : "Predicted whole (resized as in training)." }));
  card.status.textContent = "Done";
  card.item.setAttribute("aria-busy", "false");
  card.item.classList.add("done");
}

function showError(card, message) {
  if (!card.figures.querySelector("img.original")) card.figures.remove(); // nothing to show
  card.verdict.replaceChildren(el("p", { class: "error", role: "alert", text: message }));
  card.status.textContent = "Failed";
  card.item.setAttribute("aria-busy", "false");
  card.item.classList.add("failed");
}

async function analyse(file, card) {
  for (let attempt = 0; ; attempt++) {
    card.status.textContent = "Analysing…";
    const body = new FormData();
    body.append("files", file, file.name);
    let response;
    try {
      response = await fetch("api/predict", { method: "POST", body });
    } catch (error) {
      showError(card, `The server could not be reached (${error.message}).`);
      return;
    }
    if (response.status === 503 && attempt < MAX_RETRIES) {
      const wait = Math.min(30, Number(response.headers.get("Retry-After")) || 2);
      card.status.textContent = `Server busy, retrying in ${wait} s…`;
      await sleep(wait * 1000);
      continue;
    }
    let data = null;
    try {
      data = await response.json();
    } catch {
      // an answer that is not JSON: the status line is all there is
    }
    if (!response.ok) {
      const detail = data && typeof data.detail === "string" ? data.detail : response.statusText;
      showError(card, `Refused (HTTP ${response.status}): ${detail}`);
      return;
    }
    showResult(card, data.results[0]);
    return;
  }
}

// ------------------------------------------------------------------ uploads

let queue = Promise.resolve();
let counter = 0;

function submit(files) {
  const batch = document.createDocumentFragment();
  for (const file of files) {
    const card = newCard(file);
    card.id = ++counter;
    batch.append(card.item);
    // One request per image, in turn: each gets its own answer or error, and the server's
    // queue is left to other users.
    queue = queue.then(() => analyse(file, card));
  }
  document.getElementById("results").prepend(batch); // newest batch first, in its own order
}

function setUp() {
  const input = document.getElementById("files");
  const drop = document.getElementById("drop");
  input.addEventListener("change", () => {
    submit([...input.files]);
    input.value = "";
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    submit([...event.dataTransfer.files]);
  });
  // A file dropped next to the zone would otherwise replace the page with itself.
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (event) => event.preventDefault());
  }
  loadCard();
}

document.addEventListener("DOMContentLoaded", setUp);
