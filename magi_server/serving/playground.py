"""The playground page served at ``/``: try the model from a browser, as the hosted providers let you.

Plain HTML and JavaScript, no build step, no external resource. It uses only the public routes of this server: an
optional image goes through ``/api/v3/media/upload/binary``, the job through ``POST /api/v3/<model>``, progress and
chunk previews through the SSE stream ``/api/v3/predictions/{id}/events`` (read with fetch so an API key header can
be sent), and the final MP4 plays in the page with a download link. The video URLs the API returns are signed
(serving.files), so ``<video src>`` plays them without the API key header a page element cannot send.

Around a run: the history of the key's jobs (WaveSpeed's ``POST /api/v3/predictions``, so it is the server's, the
same in any browser) with status, seed, timings and video; "copy as curl / Python SDK" of the request on screen, and
of a finished job's request with the seed it actually ran with (the page keeps the requests it sent in
localStorage: the API does not hand a request back); "extend by one chunk" (``continue_from``); one prompt per
chunk (``prompts``); and the prompt enhancer (``POST /api/v3/prompt/enhance``), offered only when ``/health/ready``
says the server has one. Everything shown from a job is set as text (textContent, attributes), never as HTML.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from magi_server.params import FPS, RANDOM_SEEDS
from magi_server.serving.adapters.wavespeed import MAX_NUM_FRAMES

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>magi-server playground</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 960px; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; }
  form { display: grid; grid-template-columns: 10rem 1fr; gap: .5rem 1rem; align-items: center; }
  textarea { min-height: 4rem; }
  .notice { background: #fff4d6; border: 1px solid #e8c96b; padding: .5rem .75rem; border-radius: 4px; }
  .row { grid-column: 1 / span 2; }
  .hint { color: #666; font-size: .9rem; }
  progress { width: 100%; height: 1.2rem; }
  #chunks { display: flex; flex-wrap: wrap; gap: .5rem; }
  #chunks video { width: 180px; border: 1px solid #ccc; }
  #result video { max-width: 100%; }
  pre { background: #f4f4f4; padding: .5rem; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
  #history-list { list-style: none; padding: 0; }
  .history-item { border: 1px solid #ddd; border-radius: 4px; padding: .5rem; margin-bottom: .5rem; }
  .history-item video { width: 240px; display: block; margin: .25rem 0; }
  .history-item .meta span { margin-right: .75rem; }
  .error { color: #b00020; }
</style>
</head>
<body>
<h1>MAGI-1 playground</h1>
<p id="notice" class="notice" hidden></p>
<form id="form">
  <label for="prompt">Prompt</label>
  <textarea id="prompt" name="prompt" required>a red fox running through fresh snow, cinematic</textarea>
  <div class="row"><button id="enhance" type="button" disabled>Enhance prompt</button>
    <span id="enhance-note" class="hint">checking whether this server has a prompt enhancer</span></div>
  <label for="scenes">Scene prompts (optional)</label>
  <textarea id="scenes" name="scenes" placeholder="one line per @FPS@-frame chunk; the last line holds for the chunks after it"></textarea>
  <label for="image">First frame (optional)</label>
  <input id="image" name="image" type="file" accept="image/png,image/jpeg,image/webp">
  <label for="seed">Seed (-1 = random)</label>
  <input id="seed" name="seed" type="number" value="-1" min="-1" max="@MAX_SEED@">
  <label for="frames">Frames (@FPS@ fps)</label>
  <input id="frames" name="frames" type="number" value="96" min="@FPS@" max="@MAX_FRAMES@" step="@FPS@">
  <label for="resolution">Resolution</label>
  <select id="resolution" name="resolution"><option>480p</option><option selected>720p</option></select>
  <label for="aspect">Aspect ratio</label>
  <select id="aspect" name="aspect"><option>auto</option><option>16:9</option><option>9:16</option><option>1:1</option></select>
  <label for="steps">Steps</label>
  <select id="steps" name="steps"><option>4</option><option>8</option><option selected>16</option><option>32</option><option>64</option></select>
  <label for="model">Model route</label>
  <select id="model" name="model"><option>wavespeed-ai/magi-1-24b</option><option>wavespeed-ai/magi-1-24b-distill</option>
    <option>wavespeed-ai/magi-1-4.5b</option><option>wavespeed-ai/magi-1-4.5b-distill</option></select>
  <label for="apikey">API key (if required)</label>
  <input id="apikey" name="apikey" type="password" autocomplete="off">
  <div class="row"><button id="run" type="submit">Run</button>
    <button id="copy-curl" type="button">Copy as curl</button>
    <button id="copy-python" type="button">Copy as Python SDK</button>
    <span id="status"></span></div>
</form>
<div id="request" hidden>
  <p><span id="request-kind"></span> <span id="copy-status" class="hint"></span></p>
  <pre id="request-code"></pre>
  <p class="hint">The key is read from the WAVESPEED_API_KEY environment variable.</p>
</div>
<h2>Progress</h2>
<progress id="progress" max="1" value="0"></progress>
<p id="progress-text">idle</p>
<div id="chunks"></div>
<h2>Result</h2>
<div id="result"></div>
<h2>Your jobs <button id="history-refresh" type="button">Refresh</button> <span id="history-total" class="hint"></span></h2>
<ul id="history-list"></ul>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const CHUNK_FRAMES = @FPS@;
const REQUESTS_KEY = "magi-playground-requests";  // job id -> the request this browser sent for it
const KEPT_REQUESTS = 200;
let busy = false;

// every node from job data is built here: strings become text nodes, never markup
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}
function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("apikey").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}
async function readyNotice() {
  let body = {};
  try {
    body = await (await fetch("/health/ready")).json();
  } catch (e) { /* the page still works */ }
  if (body.notice) { $("notice").textContent = body.notice; $("notice").hidden = false; }
  if (body.prompt_enhancer) {
    $("enhance").disabled = false;
    $("enhance-note").textContent = "rewrites the prompt in MAGI-1's cinematic style";
  } else {
    $("enhance").disabled = true;
    $("enhance-note").textContent = "unavailable: this server has no prompt enhancer (its operator can start it " +
      "with --prompt-enhancer PATH)";
  }
}
function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}
function setProgress(done, total) {
  $("progress").max = Math.max(total, 1);
  $("progress").value = done;
  $("progress-text").textContent = total ? `${done} / ${total} chunks` : "queued";
}
function seconds(ms) { return ms ? (ms / 1000).toFixed(1) + " s" : "-"; }

// ------------------------------------------------------------------------------ requests this browser sent
function rememberedRequests() {
  try { return JSON.parse(localStorage.getItem(REQUESTS_KEY) || "{}") || {}; } catch (e) { return {}; }
}
function rememberRequest(id, model, body) {
  const all = rememberedRequests();
  all[id] = { model, body, at: Date.now() };
  const newest = Object.keys(all).sort((a, b) => all[b].at - all[a].at).slice(0, KEPT_REQUESTS);
  try {
    localStorage.setItem(REQUESTS_KEY, JSON.stringify(Object.fromEntries(newest.map((k) => [k, all[k]]))));
  } catch (e) { /* storage full or off: copying a past job's request is not offered then */ }
}
// the request of a finished job, with the seed it ran with (a -1 request would give another video)
function replayRequest(prediction) {
  const sent = rememberedRequests()[prediction.id];
  if (!sent) return null;
  const body = Object.assign({}, sent.body);
  if (typeof prediction.seed === "number" && prediction.seed >= 0) body.seed = prediction.seed;
  return { model: sent.model, body };
}

// ------------------------------------------------------------------------------ copy as curl / Python SDK
function shellQuote(text) { return "'" + text.replace(/'/g, "'\\''") + "'"; }
function curlCommand(model, body) {
  return [`curl -sS -X POST ${shellQuote(location.origin + "/api/v3/" + model)}`,
          `  -H "Authorization: Bearer $WAVESPEED_API_KEY"`,
          `  -H 'Content-Type: application/json'`,
          `  --data-raw ${shellQuote(JSON.stringify(body))}`].join(" \\\n");
}
function pythonLiteral(value, depth) {
  const inner = "    ".repeat(depth + 1), outer = "    ".repeat(depth);
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return String(value);
  if (typeof value === "string") return JSON.stringify(value);  // JSON's string escapes are Python's too
  if (Array.isArray(value)) {
    return value.length ? "[\n" + value.map((v) => inner + pythonLiteral(v, depth + 1) + ",\n").join("") + outer + "]" : "[]";
  }
  const entries = Object.entries(value);
  return entries.length ? "{\n" + entries.map(([k, v]) => inner + JSON.stringify(k) + ": " + pythonLiteral(v, depth + 1)
    + ",\n").join("") + outer + "}" : "{}";
}
function pythonSnippet(model, body) {
  return ["import os", "", "import wavespeed  # pip install wavespeed", "",
          `client = wavespeed.Client(base_url=${JSON.stringify(location.origin)}, api_key=os.environ["WAVESPEED_API_KEY"])`,
          `result = client.run(${JSON.stringify(model)}, ${pythonLiteral(body, 0)})`,
          `print(result["outputs"][0])`, ""].join("\n");
}
async function showRequest(kind, text) {
  $("request-kind").textContent = kind;
  $("request-code").textContent = text;
  $("request").hidden = false;
  try {
    await navigator.clipboard.writeText(text);
    $("copy-status").textContent = "copied to the clipboard";
  } catch (e) {  // no clipboard (a page served over plain http to another host is not a secure context)
    $("copy-status").textContent = "select the text below to copy it (the clipboard is not available here)";
  }
}
function copyButtons(request, label) {
  const curl = el("button", { type: "button", className: "copy-curl", textContent: "Copy as curl" });
  curl.addEventListener("click", () => showRequest(`curl, ${label}:`, curlCommand(request.model, request.body)));
  const python = el("button", { type: "button", className: "copy-python", textContent: "Copy as Python SDK" });
  python.addEventListener("click", () => showRequest(`Python SDK, ${label}:`, pythonSnippet(request.model, request.body)));
  return [curl, python];
}
function readDataUri(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// ------------------------------------------------------------------------------ the form's request
function scenePrompts() { return $("scenes").value.split("\n").map((s) => s.trim()).filter((s) => s.length); }
function formBody() {
  const body = {
    prompt: $("prompt").value, seed: parseInt($("seed").value, 10), num_frames: parseInt($("frames").value, 10),
    resolution: $("resolution").value, aspect_ratio: $("aspect").value,
    num_inference_steps: parseInt($("steps").value, 10),
  };
  const scenes = scenePrompts();
  if (scenes.length) body.prompts = scenes;
  return body;
}
// what Run would send now; a chosen image goes inline as a data: URI (Run uploads it first instead)
async function formRequest() {
  const body = formBody();
  const file = $("image").files[0];
  if (file) body.image = await readDataUri(file);
  return { model: $("model").value, body };
}
$("copy-curl").addEventListener("click", async () => {
  const r = await formRequest();
  showRequest("curl, the form's request:", curlCommand(r.model, r.body));
});
$("copy-python").addEventListener("click", async () => {
  const r = await formRequest();
  showRequest("Python SDK, the form's request:", pythonSnippet(r.model, r.body));
});

// ------------------------------------------------------------------------------ prompt enhancer
$("enhance").addEventListener("click", async () => {
  $("enhance").disabled = true;
  $("enhance-note").textContent = "enhancing...";
  try {
    const r = await fetch("/api/v3/prompt/enhance", { method: "POST", headers: headers(true),
                                                      body: JSON.stringify({ prompt: $("prompt").value }) });
    const body = await r.json();
    if (!r.ok) throw new Error(body.message || ("enhance failed: " + r.status));
    $("prompt").value = body.data.prompt;
    $("enhance-note").textContent = "enhanced; the original was: " + body.data.original_prompt;
  } catch (e) {
    $("enhance-note").textContent = String(e.message || e);
    $("enhance-note").className = "hint error";
  } finally {
    $("enhance").disabled = false;
  }
});

// ------------------------------------------------------------------------------ running a job
async function uploadImage(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  const r = await fetch("/api/v3/media/upload/binary", { method: "POST", body: form, headers: headers(false) });
  const body = await r.json();
  if (!r.ok) throw new Error(body.message || ("upload failed: " + r.status));
  return body.data.download_url;
}
async function follow(id) {
  // SSE read with fetch (EventSource cannot send an Authorization header)
  const r = await fetch(`/api/v3/predictions/${encodeURIComponent(id)}/events`, { headers: headers(false) });
  if (!r.ok || !r.body) throw new Error("event stream failed: " + r.status);
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7).trim();
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (!data) continue;
      const payload = JSON.parse(data);
      if (event === "progress" || event === "chunk") setProgress(payload.chunks_done, payload.chunks_total);
      if (event === "status") setStatus(payload.status);
      if (event === "chunk" && payload.url) {
        $("chunks").append(el("video", { src: payload.url, muted: true, controls: true, className: "chunk-preview",
                                         title: `chunk ${payload.index + 1}` }));
      }
      if (event === "completed" || event === "failed" || event === "cancelled") return payload;
    }
  }
  const r2 = await fetch(`/api/v3/predictions/${encodeURIComponent(id)}/result`, { headers: headers(false) });
  return (await r2.json()).data;
}
function showResult(final) {
  const url = final.outputs[0];
  const video = el("video", { id: "final-video", src: url, controls: true, autoplay: true, muted: true });
  const link = el("a", { id: "download", href: url, textContent: "Download MP4",
                         download: new URL(url, location.href).pathname.split("/").pop() });
  const info = el("p", { id: "result-info" },
    el("span", { id: "result-seed", textContent: `seed ${final.seed}` }), " · ",
    el("span", { textContent: `inference ${seconds(final.timings && final.timings.inference)}` }), " · ",
    el("span", { id: "result-id", textContent: final.id }));
  const sent = rememberedRequests()[final.id];
  if (sent && sent.body.continue_from) {
    info.append(" · ", el("span", { id: "result-continues",
                                    textContent: `continues ${sent.body.continue_from} (this video holds the new frames)` }));
  }
  const actions = el("p", { id: "result-actions" });
  const request = replayRequest(final);
  if (request) actions.append(...copyButtons(request, `job ${final.id} with its seed ${final.seed}`));
  actions.append(extendButton(final));
  $("result").replaceChildren(video, el("br"), link, info, actions);
}
// submit one request, follow it to its end, show it; the history is reloaded afterwards
async function runRequest(model, body) {
  if (busy) return;
  busy = true;
  $("run").disabled = true;
  $("chunks").replaceChildren();
  $("result").replaceChildren();
  setProgress(0, 0);
  try {
    setStatus("submitting");
    const r = await fetch("/api/v3/" + model, { method: "POST", headers: headers(true), body: JSON.stringify(body) });
    const sub = await r.json();
    if (!r.ok) throw new Error(sub.message || ("submit failed: " + r.status));
    rememberRequest(sub.data.id, model, body);
    loadHistory();
    setStatus("queued");
    const final = await follow(sub.data.id);
    if (final.status !== "completed") throw new Error(final.error || final.status);
    setStatus("completed");
    showResult(final);
  } catch (e) {
    setStatus(String(e.message || e), true);
  } finally {
    busy = false;
    $("run").disabled = false;
    loadHistory();
  }
}
$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const body = formBody();
  const file = $("image").files[0];
  if (file) {
    setStatus("uploading image");
    try { body.image = await uploadImage(file); } catch (e) { setStatus(String(e.message || e), true); return; }
  }
  await runRequest($("model").value, body);
});

// ------------------------------------------------------------------------------ extend by one chunk
// continue_from: the job's kept last latents are continued losslessly at its size (no resolution or aspect ratio
// is sent); num_frames counts the new frames only, and the new video holds just those
function extensionRequest(prediction) {
  const source = rememberedRequests()[prediction.id];
  // the prompt on screen says what happens next; scene prompts are the form's too; the source's model route (a
  // job is continued by the variant that made it)
  const body = { prompt: $("prompt").value, continue_from: prediction.id, num_frames: CHUNK_FRAMES,
                 seed: parseInt($("seed").value, 10), num_inference_steps: parseInt($("steps").value, 10) };
  const scenes = scenePrompts();
  if (scenes.length) body.prompts = scenes;
  return { model: source ? source.model : $("model").value, body };
}
function extendButton(prediction) {
  const button = el("button", { type: "button", className: "extend", textContent: "Extend by one chunk",
                                title: `continue this video with ${CHUNK_FRAMES} more frames, using the prompt above` });
  button.addEventListener("click", () => {
    const request = extensionRequest(prediction);
    runRequest(request.model, request.body);
  });
  return button;
}

// ------------------------------------------------------------------------------ history (the server's)
function historyItem(prediction) {
  const item = el("li", { className: "history-item" });
  item.dataset.id = prediction.id;
  item.dataset.status = prediction.status;
  const sent = rememberedRequests()[prediction.id];
  item.append(el("div", { className: "meta" },
    el("span", { className: "h-status", textContent: prediction.status }),
    el("span", { className: "h-seed", textContent: `seed ${prediction.seed}` }),
    el("span", { className: "h-inference", textContent: `inference ${seconds(prediction.timings && prediction.timings.inference)}` }),
    el("span", { className: "h-created", textContent: new Date(prediction.created_at).toLocaleString() }),
    el("span", { className: "h-model hint", textContent: prediction.model }),
    el("span", { className: "h-id hint", textContent: prediction.id })));
  if (sent) item.append(el("div", { className: "h-prompt", textContent: prediction.enhanced_prompt || sent.body.prompt }));
  if (sent && sent.body.continue_from) {
    item.append(el("div", { className: "h-continues hint", textContent: `continues ${sent.body.continue_from}` }));
  }
  if (prediction.status === "failed" || prediction.status === "cancelled") {
    item.append(el("div", { className: "h-error error", textContent: prediction.error || prediction.status }));
  }
  if (prediction.status === "completed" && prediction.outputs.length) {
    item.append(el("video", { className: "h-video", src: prediction.outputs[0], controls: true, muted: true,
                              preload: "metadata" }));
    const actions = el("div", { className: "actions" });
    const request = replayRequest(prediction);
    if (request) actions.append(...copyButtons(request, `job ${prediction.id} with its seed ${prediction.seed}`));
    actions.append(extendButton(prediction));
    item.append(actions);
  }
  return item;
}
async function loadHistory() {
  const list = $("history-list");
  try {
    const r = await fetch("/api/v3/predictions", { method: "POST", headers: headers(true),
                                                   body: JSON.stringify({ page: 1, page_size: 20 }) });
    const body = await r.json();
    if (r.status === 401) {
      $("history-total").textContent = "";
      list.replaceChildren(el("li", { className: "hint", textContent: "Enter your API key to see your jobs." }));
      return;
    }
    if (!r.ok) throw new Error(body.message || ("history failed: " + r.status));
    $("history-total").textContent = `${body.data.items.length} of ${body.data.total}`;
    list.replaceChildren(...body.data.items.map(historyItem));
  } catch (e) {
    list.replaceChildren(el("li", { className: "error", textContent: String(e.message || e) }));
  }
}
$("history-refresh").addEventListener("click", loadHistory);
$("apikey").addEventListener("change", loadHistory);
readyNotice();
loadHistory();
</script>
</body>
</html>
"""


# the form's bounds are WaveSpeed's, whose API the page calls (serving/adapters/wavespeed.py SubmitBody)
PAGE_HTML = (PAGE.replace("@MAX_SEED@", str(RANDOM_SEEDS - 1)).replace("@MAX_FRAMES@", str(MAX_NUM_FRAMES))
             .replace("@FPS@", str(FPS)))


def add_playground(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(PAGE_HTML)
