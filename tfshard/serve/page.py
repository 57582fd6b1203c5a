"""The page at `/`: try the model by hand (prompt box, streamed answer); no external assets."""

import json

import fastapi
import jinja2
from fastapi.responses import HTMLResponse

TEMPLATE = jinja2.Environment(autoescape=True).from_string("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ name }} · tfshard serve</title>
<style>
  body { font: 15px/1.5 system-ui, sans-serif; max-width: 52rem; margin: 2rem auto;
         padding: 0 1rem; color: #222; }
  textarea { width: 100%; box-sizing: border-box; font: inherit; padding: .5rem; }
  #answer { white-space: pre-wrap; border: 1px solid #ccc; border-radius: 4px;
            padding: .75rem; min-height: 4rem; background: #fafafa; }
  .row { display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; margin: .5rem 0; }
  .error { color: #b00020; }
  small { color: #666; }
</style>
</head>
<body>
<h1>{{ name }}</h1>
<p><small>tfshard serve · OpenAI API at <code>/v1</code> · TF Serving API at
<code>/v1/models/{{ name }}</code> · <a href="/metrics">metrics</a> ·
<a href="/health">health</a></small></p>
{% if generates %}
<form id="form">
  <label for="prompt">Prompt</label>
  <textarea id="prompt" rows="5" placeholder="Type a prompt"></textarea>
  <div class="row">
    <label><input type="checkbox" id="chat"{% if not chat %} disabled{% endif %}>
      chat (the model's chat template)</label>
    <label>max tokens <input type="number" id="max_tokens" value="{{ max_tokens }}" min="1"
      max="{{ cap }}" style="width:5rem"></label>
    <label>temperature <input type="number" id="temperature" value="0" min="0" max="2"
      step="0.1" style="width:4rem"></label>
    <button type="submit" id="send">Send</button>
    <button type="button" id="stop" disabled>Stop</button>
  </div>
</form>
<div id="answer" aria-live="polite"></div>
<p><small id="status"></small></p>
{% else %}
<p>This model does not generate text. Send rows to
<code>POST /v1/models/{{ name }}:predict</code>:</p>
<form id="form">
  <textarea id="prompt" rows="5">{"instances": []}</textarea>
  <div class="row"><button type="submit" id="send">Predict</button></div>
</form>
<div id="answer"></div>
<p><small id="status"></small></p>
{% endif %}
<script>
"use strict";
const MODEL = {{ model_json|safe }};
const GENERATES = {{ generates_json|safe }};
const $ = (id) => document.getElementById(id);
let controller = null;

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function errorText(body, status) {
  try { return JSON.parse(body).error.message; } catch (e) { return body || ("HTTP " + status); }
}

async function generate() {
  const prompt = $("prompt").value;
  const chat = $("chat").checked;
  const body = {model: MODEL, stream: true, stream_options: {include_usage: true},
                max_tokens: parseInt($("max_tokens").value, 10),
                temperature: parseFloat($("temperature").value)};
  if (chat) body.messages = [{role: "user", content: prompt}]; else body.prompt = prompt;
  $("answer").textContent = "";
  setStatus("waiting for the first token...", false);
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  const started = performance.now();
  try {
    const response = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify(body), signal: controller.signal});
    if (!response.ok) {
      setStatus(errorText(await response.text(), response.status), true);
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", finish = null, usage = null;
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        for (const line of event.split("\\n")) {
          if (!line.startsWith("data: ")) continue;
          const payload = line.slice(6);
          if (payload === "[DONE]") continue;
          const chunk = JSON.parse(payload);
          if (chunk.error) { setStatus("error: " + chunk.error.message, true); return; }
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            const text = chat ? (choice.delta && choice.delta.content) : choice.text;
            if (text) $("answer").textContent += text;
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    setStatus("done: " + finish + (usage ? ", " + usage.completion_tokens + " tokens" : "") +
              " in " + seconds + " s", false);
    document.body.dataset.done = "1";
  } catch (e) {
    setStatus(e.name === "AbortError" ? "stopped" : "error: " + e, e.name !== "AbortError");
  } finally {
    $("send").disabled = false; $("stop").disabled = true; controller = null;
  }
}

async function predict() {
  setStatus("", false);
  const response = await fetch("/v1/models/" + encodeURIComponent(MODEL) + ":predict", {
    method: "POST", headers: {"Content-Type": "application/json"}, body: $("prompt").value});
  const text = await response.text();
  if (!response.ok) { setStatus(errorText(text, response.status), true); return; }
  $("answer").textContent = text;
  document.body.dataset.done = "1";
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  if (GENERATES) generate(); else predict();
});
if (GENERATES) $("stop").addEventListener("click", () => controller && controller.abort());
// ?prompt=TEXT fills the box and sends it (a link that runs a prompt).
const query = new URLSearchParams(location.search);
if (query.has("prompt")) {
  $("prompt").value = query.get("prompt");
  if (GENERATES && query.has("chat")) $("chat").checked = query.get("chat") === "1";
  $("send").click();
}
</script>
</body>
</html>
""")


def render(engine):
    """The page for one engine.

    Args:
        engine: the `api.Engine` (its name, whether it generates, its limits).

    Returns:
        The page's HTML.
    """
    cap = engine.max_tokens_cap or engine.max_model_len or 256
    tokenizer = engine.tokenizer
    return TEMPLATE.render(
        name=engine.model_name, model_json=json.dumps(engine.model_name).replace("<", "\\u003c"),
        generates=bool(engine.generates and tokenizer is not None),
        generates_json=json.dumps(bool(engine.generates and tokenizer is not None)),
        chat=tokenizer is not None, cap=cap, max_tokens=min(64, cap))


def router(front):
    """The route `GET /` over one `front.Front`.

    Args:
        front: the app's `front.Front`.

    Returns:
        A `fastapi.APIRouter` with `GET /`.
    """
    routes = fastapi.APIRouter()

    @routes.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(render(front.engine))

    return routes
