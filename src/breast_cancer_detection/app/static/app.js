// The page: model card summary, whole slides (with `bcd serve --slides`), uploads (one request
// per image, in turn), and result cards.
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
  // What the model is for comes first, in the model's own words (its card).
  add("Intended use", card.intended_use);
  add("Not for", card.not_for);
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
    add("Validation", `AUC ${fmt(val.val_auc)}, accuracy ${fmt(val.val_acc)} at threshold 0.5, epoch ${val.epoch ?? "?"} ` +
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

// A colour scale under a heat map: the gradient, its two ends, what it shows, and a mark
// at the threshold when one decides the label.
function legend(map, low, high, note, threshold) {
  const bar = el("div", { class: `gradient ${map}` });
  if (threshold !== undefined) {
    const mark = el("div", { class: "marker" });
    mark.style.left = `${threshold * 100}%`;
    bar.append(mark);
  }
  return el("div", { class: "legend", role: "img",
    "aria-label": `colour scale from ${low} to ${high}` + (note ? `; ${note}` : "") },
    bar, el("div", { class: "scale" }, el("span", { text: low }), el("span", { text: high })),
    note ? el("p", { class: "small muted", text: note }) : null);
}

function showResult(card, r) {
  const malignant = r.p_malignant >= r.threshold;
  card.figures.querySelector("figcaption").textContent = `Image, ${r.width} × ${r.height} px`;
  if (r.cam) {
    card.figures.append(el("figure", {},
      el("img", { class: "cam", src: r.cam,
        alt: `Grad-CAM overlay of ${r.name}: yellow marks the regions that most supported the answer "${r.label}"` }),
      el("figcaption", { text: `Grad-CAM: evidence for “${r.label}”` }),
      legend("viridis", "little", "most",
        "Computed with PyTorch for the label given; uncoloured: no model input showed it")));
  }
  if (r.tile_heatmap) {
    card.figures.append(el("figure", {},
      el("img", { class: "tiles", src: r.tile_heatmap,
        alt: `Tile heat map of ${r.name}: P(malignant) of each of its ${r.tiles} tiles, dark blue low, yellow high` }),
      el("figcaption", { text: `P(malignant) of ${r.tiles} tiles` }),
      legend("cividis", "0", "1", `Threshold ${fmt(r.threshold)}`, r.threshold)));
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
    ...(r.warning ? [el("p", { class: "warning", role: "note",
      text: `Outside what this model was made for: ${r.warning}` })] : []),
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
      ? `Large image: the average of ${r.tiles} overlapping tiles, cut at its own pixel size.`
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
    if (!data?.results?.length) {
      showError(card, `The server's answer (HTTP ${response.status}) held no result; try again.`);
      return;
    }
    showResult(card, data.results[0]);
    return;
  }
}

// ------------------------------------------------------------------ whole slides

let chosenSlide = null; // the folder of the slide shown, kept across refreshes

function slideFigure(url, alt, caption) {
  return el("figure", {},
    el("a", { href: url, target: "_blank", rel: "noopener" }, el("img", { src: url, alt })),
    el("figcaption", { text: caption }));
}

function showSlide(s, files, button) {
  chosenSlide = s.folder;
  for (const b of document.querySelectorAll("#slides-table button")) {
    b.setAttribute("aria-pressed", String(b === button));
  }
  const figures = el("div", { class: "slide-figures" });
  if (files["heatmap.png"]) {
    figures.append(slideFigure(files["heatmap.png"], `Heat map of ${s.name}: P(tumour) of each tissue tile`,
      "Heat map: P(tumour) of each tissue tile"));
  }
  if (files["tissue.png"]) {
    figures.append(slideFigure(files["tissue.png"], `Tissue mask of ${s.name}`,
      "Tissue mask: where tiles were read"));
  }
  if (files["top_tiles.png"]) {
    figures.append(slideFigure(files["top_tiles.png"], `The highest P(tumour) tiles of ${s.name}`,
      "Top tiles: the highest P(tumour)"));
  }
  let regions;
  if (s.note) {
    regions = el("p", { class: "muted small", text: `Regions: ${s.note}.` });
  } else if (s.regions === null || s.regions === undefined) {
    regions = el("p", { class: "muted small", text: "No regions file." });
  } else if (s.regions === 0) {
    regions = el("p", { class: "muted small", text: "No region at or above the threshold." });
  } else {
    const body = el("tbody");
    s.largest_regions.forEach((r, i) => body.append(el("tr", {},
      el("td", { text: String(i + 1) }), el("td", { text: String(r.tiles ?? "n/a") }),
      el("td", { text: fmt(r.area_mm2, 4) }), el("td", { text: fmt(r.max_p) }))));
    regions = el("table", { class: "slides-table regions" },
      el("caption", { text: `Largest regions (${s.largest_regions.length} of ${s.regions})` }),
      el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "#" }),
        el("th", { scope: "col", text: "Tiles" }), el("th", { scope: "col", text: "Area mm²" }),
        el("th", { scope: "col", text: "Max P" }))),
      body);
  }
  const links = el("p", { class: "small" });
  if (files["regions.geojson"]) {
    links.append(el("a", { href: files["regions.geojson"], download: `${s.folder}-regions.geojson`,
      text: "regions.geojson" }), " (QuPath: File › Import objects)");
  }
  if (files["tiles.csv"]) {
    if (links.childNodes.length) links.append(" · ");
    links.append(el("a", { href: files["tiles.csv"], download: `${s.folder}-tiles.csv`,
      text: "tiles.csv" }), " (P(tumour) of every tile)");
  }
  document.getElementById("slide-detail").replaceChildren(
    el("h3", { text: s.name }), figures, regions, links);
}

function renderSlides(data, base) {
  const rows = document.querySelector("#slides-table tbody");
  const message = document.getElementById("slides-message");
  message.textContent = data.message || (data.slides.length ? "" : "No slides in slides.csv yet.");
  rows.replaceChildren();
  let chosen = null;
  for (const s of data.slides) {
    // File URLs are relative to the listing's own.
    const files = Object.fromEntries(Object.entries(s.files || {})
      .map(([name, url]) => [name, new URL(url, base).href]));
    const tr = el("tr", {});
    if (s.error) {
      tr.append(el("th", { scope: "row", text: s.name }),
        el("td", { colspan: "5", class: "error", text: s.error }));
    } else {
      const button = el("button", { type: "button", class: "link", "aria-pressed": "false",
        text: s.name });
      button.addEventListener("click", () => showSlide(s, files, button));
      if (s.folder === chosenSlide) chosen = () => showSlide(s, files, button);
      tr.append(el("th", { scope: "row" }, button), el("td", { text: fmt(s.score) }),
        el("td", { text: String(s.tiles ?? "n/a") }),
        el("td", { text: String(s.tumour_tiles ?? "n/a") }),
        el("td", { text: fmt(s.tissue_mm2, 2) }),
        el("td", { text: String(s.regions ?? "n/a") }));
    }
    rows.append(tr);
  }
  if (chosen) chosen();
  else document.getElementById("slide-detail").replaceChildren();
}

async function loadSlides() {
  // Health says whether the server shows slides, so that a server without them is not
  // asked for a list it answers 404 to.
  let health;
  try {
    const response = await fetch("api/health");
    health = response.ok ? await response.json() : null;
  } catch {
    return;
  }
  if (!health || !health.slides) return;
  const section = document.getElementById("slides");
  const message = document.getElementById("slides-message");
  try {
    const response = await fetch("api/slides");
    if (response.status === 404) {
      section.hidden = true;
      return;
    }
    section.hidden = false;
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    renderSlides(await response.json(), response.url);
  } catch (error) {
    section.hidden = false;
    message.textContent = `The slides could not be loaded (${error.message}).`;
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
    // A failure of one (a script error on an odd answer) is shown on its card and must not
    // stop the queue: the files after it still go.
    queue = queue.then(() => analyse(file, card)).catch((error) => {
      showError(card, `This image could not be shown (${error?.message ?? error}); reload ` +
        "the page and try again.");
    });
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
  document.getElementById("slides-refresh").addEventListener("click", loadSlides);
  loadCard();
  loadSlides();
}

document.addEventListener("DOMContentLoaded", setUp);
