"""The playground page served at ``/``: try the model from a browser, as the hosted providers let you.

Plain HTML and JavaScript, no build step. It uses only the public WaveSpeed routes of this server: an optional image
goes through ``/api/v3/media/upload/binary``, the job through ``POST /api/v3/<model>``, progress and chunk previews
through the SSE stream ``/api/v3/predictions/{id}/events`` (read with fetch so an API key header can be sent), and
the final MP4 plays in the page with a download link. The video URLs the API returns are signed (serving.files),
so ``<video src>`` plays them without the API key header a page element cannot send.
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
  progress { width: 100%; height: 1.2rem; }
  #chunks { display: flex; flex-wrap: wrap; gap: .5rem; }
  #chunks video { width: 180px; border: 1px solid #ccc; }
  #result video { max-width: 100%; }
  .error { color: #b00020; }
</style>
</head>
<body>
<h1>MAGI-1 playground</h1>
<p id="notice" class="notice" hidden></p>
<form id="form">
  <label for="prompt">Prompt</label>
  <textarea id="prompt" name="prompt" required>a red fox running through fresh snow, cinematic</textarea>
  <label for="image">First frame (optional)</label>
  <input id="image" name="image" type="file" accept="image/png,image/jpeg,image/webp">
  <label for="seed">Seed (-1 = random)</label>
  <input id="seed" name="seed" type="number" value="-1" min="-1" max="@MAX_SEED@">
  <label for="frames">Frames (24 fps)</label>
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
  <div class="row"><button id="run" type="submit">Run</button> <span id="status"></span></div>
</form>
<h2>Progress</h2>
<progress id="progress" max="1" value="0"></progress>
<p id="progress-text">idle</p>
<div id="chunks"></div>
<h2>Result</h2>
<div id="result"></div>
<script>
const $ = (id) => document.getElementById(id);
function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("apikey").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}
async function readyNotice() {
  try {
    const r = await fetch("/health/ready");
    const body = await r.json();
    if (body.notice) { $("notice").textContent = body.notice; $("notice").hidden = false; }
  } catch (e) { /* the page still works */ }
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
  const r = await fetch(`/api/v3/predictions/${id}/events`, { headers: headers(false) });
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
        const v = document.createElement("video");
        v.src = payload.url; v.muted = true; v.controls = true; v.className = "chunk-preview";
        v.title = `chunk ${payload.index + 1}`;
        $("chunks").appendChild(v);
      }
      if (event === "completed" || event === "failed" || event === "cancelled") return payload;
    }
  }
  const r2 = await fetch(`/api/v3/predictions/${id}/result`, { headers: headers(false) });
  return (await r2.json()).data;
}
$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("run").disabled = true;
  $("chunks").innerHTML = ""; $("result").innerHTML = "";
  setProgress(0, 0);
  try {
    const body = {
      prompt: $("prompt").value, seed: parseInt($("seed").value, 10), num_frames: parseInt($("frames").value, 10),
      resolution: $("resolution").value, aspect_ratio: $("aspect").value,
      num_inference_steps: parseInt($("steps").value, 10),
    };
    const file = $("image").files[0];
    if (file) { setStatus("uploading image"); body.image = await uploadImage(file); }
    setStatus("submitting");
    const r = await fetch("/api/v3/" + $("model").value, { method: "POST", headers: headers(true), body: JSON.stringify(body) });
    const sub = await r.json();
    if (!r.ok) throw new Error(sub.message || ("submit failed: " + r.status));
    setStatus("queued");
    const final = await follow(sub.data.id);
    if (final.status !== "completed") throw new Error(final.error || final.status);
    setStatus("completed");
    const url = final.outputs[0];
    const video = document.createElement("video");
    video.id = "final-video"; video.src = url; video.controls = true; video.autoplay = true; video.muted = true;
    const link = document.createElement("a");
    link.id = "download"; link.href = url; link.download = new URL(url, location.href).pathname.split("/").pop(); link.textContent = "Download MP4";
    $("result").append(video, document.createElement("br"), link);
  } catch (e) {
    setStatus(String(e.message || e), true);
  } finally {
    $("run").disabled = false;
  }
});
readyNotice();
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
