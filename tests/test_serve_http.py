"""The HTTP front against the fake engine, with real clients on loopback.

The `openai` package for completions and chat (streamed and not), `curl` for one stream
and one `:predict`, `requests` for TF Serving's API, health, metrics and the errors; a
headless Chromium for the page when /usr/bin/chromium exists. Every server listens on
127.0.0.1 on a free port; every request and wait is bounded.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (scripts/setup.sh)")
import openai  # noqa: E402
import requests  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from serve_fake import FakeEngine, expected  # noqa: E402
from tfshard.serve import http  # noqa: E402

pytestmark = pytest.mark.timeout(60)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
T = 10  # seconds: every client request's timeout


@contextlib.contextmanager
def serving(api_key="", max_body_bytes=http.DEFAULT_MAX_BODY_BYTES, **engine_args):
    """A started `Server` over a new `FakeEngine` (api_key "" : none, whatever the env)."""
    engine = FakeEngine(**engine_args)
    server = http.Server(engine, port=0, api_key=api_key, max_body_bytes=max_body_bytes,
                         graceful_seconds=1.0)
    server.start()
    try:
        yield server, engine
    finally:
        server.stop()
        engine.close()


@pytest.fixture(scope="module")
def served():
    with serving() as pair:
        yield pair


@pytest.fixture(scope="module")
def url(served):
    return served[0].url


@pytest.fixture(scope="module")
def engine(served):
    return served[1]


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=T)


def ids(text):
    return [ord(c) - 32 for c in text]


def error_of(response, status, param="-"):
    """The error object of an OpenAI-shaped error response, after checking its status and
    (unless "-") its param."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}, body
    if param != "-":
        assert body["param"] == param, body
    return body


def wait_for(predicate, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# OpenAI's API through the `openai` package.

def test_completion(client):
    out = client.completions.create(model="toy", prompt="Hello", max_tokens=12, temperature=0)
    text, reason, n = expected(ids("Hello"), 12)
    assert out.object == "text_completion" and out.model == "toy" and out.id.startswith("cmpl-")
    assert out.choices[0].text == text and out.choices[0].finish_reason == reason == "length"
    assert out.choices[0].index == 0 and out.choices[0].logprobs is None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == \
        (5, n, 5 + n)


def test_completion_stop_string_and_token_prompt(client):
    prompt = ids("Hello")
    full, _, _ = expected(prompt, 12)
    stop = full[4:6]
    out = client.completions.create(model="toy", prompt=prompt, max_tokens=12, temperature=0,
                                    stop=[stop, "never"])
    assert out.choices[0].text == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    # A list of one list of ids is one prompt too.
    again = client.completions.create(model="toy", prompt=[prompt], max_tokens=3, temperature=0)
    assert again.choices[0].text == full[:3]


def test_completion_stream_with_usage(client):
    chunks = list(client.completions.create(model="toy", prompt="Hi there", max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text, reason, n = expected(ids("Hi there"), 10)
    assert all(c.object == "text_completion" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and
              c.choices[0].finish_reason]
    assert finals == [reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert chunks[-1].usage.prompt_tokens == 8 and chunks[-1].usage.total_tokens == 8 + n
    assert all(c.usage is None for c in chunks[:-1])
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # streamed, not one


def test_chat(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(model="toy", messages=messages, max_tokens=7,
                                         temperature=0)
    prompt = "<system> be brief <user> Hi <assistant> "
    text, reason, n = expected(ids(prompt), 7)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == text and out.choices[0].finish_reason == reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), n)
    # max_completion_tokens is the newer name of max_tokens.
    newer = client.chat.completions.create(model="toy", messages=messages, temperature=0,
                                           max_completion_tokens=3)
    assert newer.choices[0].message.content == text[:3]


def test_chat_stream(client):
    stream = client.chat.completions.create(
        model="toy", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text, reason, n = expected(ids("<user> Hi <assistant> "), 6)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == text
    last_choice = [c for c in chunks if c.choices][-1]
    assert last_choice.choices[0].finish_reason == reason
    assert chunks[-1].usage.completion_tokens == n


def test_seed_makes_sampling_reproducible(client):
    def run(seed):
        return client.completions.create(model="toy", prompt="abc", max_tokens=10,
                                         temperature=0.8, seed=seed).choices[0].text
    assert run(7) == run(7) == expected(ids("abc"), 10, seed=7, temperature=0.8)[0]
    assert run(7) != expected(ids("abc"), 10)[0]


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["toy"]
    assert models.data[0].object == "model" and models.data[0].owned_by == "tfshard"
    assert client.models.retrieve("toy").id == "toy"


def test_concurrent_requests_each_equal_alone(client):
    prompts = [f"prompt {i}" for i in range(8)]
    results = {}

    def run(p):
        results[p] = client.completions.create(model="toy", prompt=p, max_tokens=15,
                                               temperature=0).choices[0].text
    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert results == {p: expected(ids(p), 15)[0] for p in prompts}


def test_engine_error_mid_stream_reaches_the_openai_client(client, url):
    stream = client.completions.create(model="toy", prompt="please FAIL", max_tokens=20,
                                       temperature=0, stream=True)
    got = []
    with pytest.raises(openai.APIError, match="injected failure"):
        for chunk in stream:
            got.append(chunk.choices[0].text)
    assert "".join(got) == expected(ids("please FAIL"), 2)[0]  # the tokens before the error
    with pytest.raises(openai.InternalServerError, match="injected failure"):
        client.completions.create(model="toy", prompt="FAIL", max_tokens=5)
    # The raw stream: an error event, then the end, no [DONE].
    raw = requests.post(f"{url}/v1/completions", json={"prompt": "FAIL", "stream": True},
                        timeout=T).text
    events = [e for e in raw.split("\n\n") if e]
    assert json.loads(events[-1][len("data: "):])["error"]["code"] == "engine_error"
    assert "[DONE]" not in raw


# curl.

def test_curl_streams_server_sent_events(url):
    body = json.dumps({"model": "toy", "prompt": "curl", "max_tokens": 8, "temperature": 0,
                       "stream": True})
    out = subprocess.run(["curl", "-sS", "-N", "--max-time", str(T), f"{url}/v1/completions",
                          "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=T + 5)
    assert out.returncode == 0, out.stderr
    events = [e for e in out.stdout.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected(ids("curl"), 8)[0]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_curl_predict(url):
    out = subprocess.run(["curl", "-sS", "--max-time", str(T), "-X", "POST",
                          f"{url}/v1/models/toy:predict", "-d",
                          '{"instances": [[1, 2, 3, 4.5]]}'],
                         capture_output=True, text=True, timeout=T + 5)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"predictions": [[2.0, 4.0, 6.0, 9.0]]}


# TF Serving's API through `requests`.

def test_predict_one_input_rows_and_columns(url, engine):
    rows = requests.post(f"{url}/v1/models/toy:predict",
                         json={"instances": [[1, 2, 3, 4], [0.5, 0, 0, -1]]}, timeout=T)
    assert rows.status_code == 200, rows.text
    assert rows.json() == {"predictions": [[2, 4, 6, 8], [1, 0, 0, -2]]}
    assert engine.predicted[-1]["x"].dtype.name == "float32"
    named = requests.post(f"{url}/v1/models/toy:predict",
                          json={"signature_name": "serving_default",
                                "instances": [{"x": [1, 1, 1, 1]}]}, timeout=T)
    assert named.json() == {"predictions": [[2, 2, 2, 2]]}
    cols = requests.post(f"{url}/v1/models/toy/versions/1:predict",
                         json={"inputs": [[1, 2, 3, 4]]}, timeout=T)
    assert cols.json() == {"outputs": [[2, 4, 6, 8]]}
    cols = requests.post(f"{url}/v1/models/toy:predict", json={"inputs": {"x": [[0, 0, 0, 1]]}},
                         timeout=T)
    assert cols.json() == {"outputs": [[0, 0, 0, 2]]}


def test_predict_two_inputs_and_outputs():
    with serving(outputs=2, generates=False, name="pair") as (server, engine):
        url = server.url
        rows = requests.post(f"{url}/v1/models/pair:predict", json={"instances": [
            {"a": [1.5, 2], "b": 3}, {"a": [0, 0], "b": -1}]}, timeout=T)
        assert rows.status_code == 200, rows.text
        assert rows.json() == {"predictions": [{"sum": 6.5, "twice": 6},
                                               {"sum": -1.0, "twice": -2}]}
        assert engine.predicted[-1]["b"].dtype.name == "int32"
        cols = requests.post(f"{url}/v1/models/pair:predict",
                             json={"inputs": {"a": [[1, 1]], "b": [2]}}, timeout=T)
        assert cols.json() == {"outputs": {"sum": [4.0], "twice": [4]}}
        # A float where the model takes integers; a row without an input; plain rows.
        err = error_of(requests.post(f"{url}/v1/models/pair:predict", json={"instances": [
            {"a": [1, 2], "b": 2.5}]}, timeout=T), 400, "instances")
        assert "input b" in err["message"] and "int32" in err["message"]
        err = error_of(requests.post(f"{url}/v1/models/pair:predict", json={"instances": [
            {"a": [1, 2]}]}, timeout=T), 400, "instances")
        assert "missing b" in err["message"]
        err = error_of(requests.post(f"{url}/v1/models/pair:predict",
                                     json={"instances": [[1, 2]]}, timeout=T), 400, "instances")
        assert "a, b" in err["message"]
        err = error_of(requests.post(f"{url}/v1/models/pair:predict",
                                     json={"inputs": {"a": [[1, 1], [2, 2]], "b": [2]}},
                                     timeout=T), 400, "inputs")
        assert "batch sizes" in err["message"]
        # A model that does not generate answers completions with where to go instead.
        err = error_of(requests.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=T),
                       400, "model")
        assert ":predict" in err["message"]
        meta = requests.get(f"{url}/v1/models/pair/metadata", timeout=T).json()
        sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
        assert sig["inputs"]["b"]["dtype"] == "DT_INT32"
        assert sig["inputs"]["b"]["tensor_shape"]["dim"] == [{"size": "-1", "name": ""}]
        assert set(sig["outputs"]) == {"sum", "twice"}


def test_model_status_and_metadata(url, engine):
    status = requests.get(f"{url}/v1/models/toy", timeout=T).json()
    assert status["model_version_status"] == [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK",
                                                          "error_message": ""}}]
    assert requests.get(f"{url}/v1/models/toy/versions/1", timeout=T).status_code == 200
    error_of(requests.get(f"{url}/v1/models/toy/versions/2", timeout=T), 404, "version")
    meta = requests.get(f"{url}/v1/models/toy/metadata", timeout=T).json()
    assert meta["model_spec"] == {"name": "toy", "signature_name": "", "version": "1"}
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["method_name"] == "tensorflow/serving/predict"
    assert sig["inputs"]["x"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in sig["inputs"]["x"]["tensor_shape"]["dim"]] == ["-1", "4"]
    error_of(requests.get(f"{url}/v1/models/other/metadata", timeout=T), 404, "model")


# Health and metrics.

def test_health(url, engine):
    assert requests.get(f"{url}/health", timeout=T).json() == {"status": "ok"}
    engine.healthy = (False, "rank 1 was lost (pid 42 on host-a)")
    try:
        r = requests.get(f"{url}/health", timeout=T)
        assert r.status_code == 503 and r.json()["reason"] == "rank 1 was lost (pid 42 on host-a)"
        status = requests.get(f"{url}/v1/models/toy", timeout=T).json()["model_version_status"]
        assert status[0]["state"] == "LOADING"
        assert status[0]["status"]["error_message"].startswith("rank 1 was lost")
    finally:
        engine.healthy = (True, "")
    assert requests.get(f"{url}/health", timeout=T).status_code == 200


def samples(url):
    text = requests.get(f"{url}/metrics", timeout=T).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_and_tokens(served, client):
    server, engine = served
    assert engine.metrics is server.metrics  # the engine received the app's Metrics
    before = samples(server.url)
    client.completions.create(model="toy", prompt="count me", max_tokens=9, temperature=0)
    requests.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": "ten"},
                  timeout=T)
    after = samples(server.url)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)
    assert moved("tfshard_http_requests_total", endpoint="/v1/completions", status="200") == 1
    assert moved("tfshard_http_requests_total", endpoint="/v1/completions", status="400") == 1
    assert moved("tfshard_prompt_tokens_total") == len("count me")
    assert moved("tfshard_generation_tokens_total") == 9
    assert moved("tfshard_time_to_first_token_seconds_count") == 1
    assert moved("tfshard_time_per_output_token_seconds_count") == 1
    assert moved("tfshard_requests_finished_total", finish_reason="length") == 1
    assert after[("tfshard_http_requests_in_flight", ())] == 1  # the /metrics request itself
    for name in ("tfshard_requests_running", "tfshard_requests_queued",
                 "tfshard_kv_cache_slots_in_use", "tfshard_kv_cache_slots",
                 "tfshard_batch_size_count", "tfshard_collective_seconds_total",
                 "tfshard_predict_batch_rows_count", "tfshard_request_duration_seconds_count"):
        assert any(k[0] == name for k in after), name
    assert after[("tfshard_batch_size_count", ())] > 0  # recorded by the engine


# Bad requests: a 4xx naming the field, and the server keeps serving.

BAD = [
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "valid integer"),
    ({"prompt": "x", "max_tokens": 2.0}, 400, "max_tokens", "valid integer"),
    ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens", "greater than or equal to 1"),
    ({"prompt": "x", "max_tokens": 41}, 400, "max_tokens", "at most 40"),
    ({"prompt": "x" * 30, "max_tokens": 40}, 400, "max_tokens", "at most 34"),
    ({"prompt": "x" * 64, "max_tokens": 1}, 400, "prompt", "at most 63 prompt tokens"),
    ({"prompt": "x", "temperature": 2.5}, 400, "temperature", "less than or equal to 2"),
    ({"prompt": "x", "temperature": -0.1}, 400, "temperature", "greater than or equal to 0"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature", "valid number"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
    ({"prompt": [1, 2.5, 3]}, 400, "prompt", "prompt[1]"),
    ({"prompt": [1, "a"]}, 400, "prompt", "prompt[1]"),
    ({"prompt": [1, -2]}, 400, "prompt", "out of range"),
    ({"prompt": [1, 96]}, 400, "prompt", "below 96"),
    ({"prompt": ["one", "two"]}, 400, "prompt", "one prompt per request"),
    ({"prompt": {"text": "x"}}, 400, "prompt", "a string or a list of token ids"),
    ({"prompt": ""}, 400, "prompt", "no token"),
    ({"prompt": "caf\u00e9"}, 400, "prompt", "vocabulary"),
    ({}, 400, "prompt", "missing"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "serves `toy`"),
    ({"prompt": "x", "n": 2}, 400, "n", "n=1"),
    ({"prompt": "x", "echo": True}, 400, "echo", "echo"),
    ({"prompt": "x", "logprobs": 2}, 400, "logprobs", "log probabilities"),
    ({"prompt": "x", "stop": 5}, 400, "stop", "a string or a list of strings"),
    ({"prompt": "x", "stop": [""]}, 400, "stop", "non-empty"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", "valid boolean"),
    ({"prompt": "x", "frequency_penalty": 0.5}, 400, "frequency_penalty", "not supported"),
]


@pytest.mark.parametrize("body,status,param,words", BAD,
                         ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_completion_requests(url, body, status, param, words):
    err = error_of(requests.post(f"{url}/v1/completions", json=body, timeout=T), status, param)
    assert words in err["message"], err
    assert err["type"] == "invalid_request_error"


BAD_CHAT = [
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": "hi"}, "messages", "valid list"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages", "messages[0].content"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages", "messages[0].role"),
    ({"messages": [{"content": "x"}]}, "messages", "missing"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 99},
     "max_completion_tokens", "at most 40"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools", "not supported"),
]


@pytest.mark.parametrize("body,param,words", BAD_CHAT,
                         ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD_CHAT)])
def test_bad_chat_requests(url, body, param, words):
    err = error_of(requests.post(f"{url}/v1/chat/completions", json=body, timeout=T), 400, param)
    assert words in err["message"], err


BAD_PREDICT = [
    ({"instances": [[1, 2, 3]]}, "instances", "shape [4]"),
    ({"instances": [[1, 2, 3, 4], [1, 2]]}, "instances", "different shapes"),
    ({"instances": [[[1, 2, 3, 4]]]}, "instances", "shape [4]"),
    ({"instances": [["a", "b", "c", "d"]]}, "instances", "strings"),
    ({"instances": [[1, None, 3, 4]]}, "instances", "input x"),
    ({"instances": []}, "instances", "non-empty"),
    ({"instances": [{"y": [1, 2, 3, 4]}]}, "instances", "unknown y"),
    ({"inputs": [1, 2, 3, 4]}, "inputs", "shape [4]"),
    ({"inputs": 3}, "inputs", "not a batch"),
    ({"instances": [[1, 2, 3, 4]], "inputs": [[1, 2, 3, 4]]}, "inputs", "exactly one"),
    ({}, "instances", "exactly one"),
    ({"instances": [[1, 2, 3, 4]], "signature_name": "other"}, "signature_name", "serving_default"),
]


@pytest.mark.parametrize("body,param,words", BAD_PREDICT,
                         ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD_PREDICT)])
def test_bad_predict_requests(url, body, param, words):
    err = error_of(requests.post(f"{url}/v1/models/toy:predict", json=body, timeout=T), 400,
                   param)
    assert words in err["message"], err


def test_invalid_json_unknown_paths_and_the_server_goes_on(url, client):
    err = error_of(requests.post(f"{url}/v1/completions", data=b'{"prompt": "x",',
                                 headers={"Content-Type": "application/json"}, timeout=T), 400)
    assert "not valid JSON" in err["message"]
    err = error_of(requests.post(f"{url}/v1/completions", data=b"[1, 2]",
                                 headers={"Content-Type": "application/json"}, timeout=T), 400)
    error_of(requests.post(f"{url}/v1/models/nope:predict", json={"instances": [[1, 2, 3, 4]]},
                           timeout=T), 404, "model")
    error_of(requests.get(f"{url}/v2/nothing", timeout=T), 404)
    error_of(requests.get(f"{url}/v1/completions", timeout=T), 405)
    assert client.completions.create(model="toy", prompt="still", max_tokens=2).choices


def test_engine_exceptions_map_to_statuses(url, engine):
    engine.reject = ("stop strings of this kind are not supported", "stop")
    try:
        err = error_of(requests.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=T),
                       400, "stop")
        assert "not supported" in err["message"]
    finally:
        engine.reject = None
    engine.available = False
    try:
        err = error_of(requests.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=T),
                       503)
        assert "loading" in err["message"] and err["type"] == "server_error"
        error_of(requests.post(f"{url}/v1/models/toy:predict", json={"inputs": [[1, 2, 3, 4]]},
                               timeout=T), 503)
    finally:
        engine.available = True


def test_queue_full_is_429_with_retry_after():
    with serving(max_queue=1, delay=0.05) as (server, engine):
        first = requests.post(f"{server.url}/v1/completions", stream=True, timeout=T,
                              json={"prompt": "long", "max_tokens": 40, "stream": True})
        assert first.status_code == 200 and wait_for(lambda: engine.running() == 1)
        second = requests.post(f"{server.url}/v1/completions", json={"prompt": "x"}, timeout=T)
        err = error_of(second, 429)
        assert second.headers["Retry-After"] == "2" and err["type"] == "rate_limit_error"
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0, timeout=T)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="toy", prompt="x")
        first.close()
        assert wait_for(lambda: engine.running() == 0)
        assert client.completions.create(model="toy", prompt="x", max_tokens=2).choices


# The API key and the body cap.

def test_api_key(monkeypatch):
    monkeypatch.setenv("TFSHARD_API_KEY", "sekret")
    engine = FakeEngine()
    server = http.Server(engine, port=0).start()  # the key from the environment
    try:
        url = server.url
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            err = error_of(requests.get(f"{url}/v1/models", headers=headers, timeout=T), 401)
            assert "Authorization: Bearer" in err["message"] and err["code"] == "invalid_api_key"
        error_of(requests.post(f"{url}/v1/models/toy:predict", json={"inputs": [[1, 2, 3, 4]]},
                               timeout=T), 401)
        assert requests.get(f"{url}/metrics", timeout=T).status_code == 401
        assert requests.get(f"{url}/health", timeout=T).status_code == 200  # open
        good = {"Authorization": "Bearer sekret"}
        assert requests.get(f"{url}/v1/models", headers=good, timeout=T).status_code == 200
        assert requests.get(f"{url}/metrics", headers=good, timeout=T).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0,
                          timeout=T).models.list()
        ok = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0, timeout=T)
        assert ok.completions.create(model="toy", prompt="key", max_tokens=3).choices[0].text
    finally:
        server.stop()
        engine.close()


def test_body_over_the_cap_is_413():
    with serving(max_body_bytes=1024) as (server, engine):
        err = error_of(requests.post(f"{server.url}/v1/completions", timeout=T,
                                     json={"prompt": "x" * 2000}), 413)
        assert "at most 1024 bytes" in err["message"]

        def chunks():  # no Content-Length: chunked transfer, counted as it comes
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 200
            yield b'"}'
        error_of(requests.post(f"{server.url}/v1/completions", data=chunks(), timeout=T,
                               headers={"Content-Type": "application/json"}), 413)
        small = requests.post(f"{server.url}/v1/completions", json={"prompt": "x"}, timeout=T)
        assert small.status_code == 200


# Disconnects, draining, stopping.

def test_disconnect_mid_stream_cancels_and_others_go_on():
    with serving(delay=0.02) as (server, engine):
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0, timeout=T)
        other = {}

        def run_other():
            other["text"] = client.completions.create(model="toy", prompt="other", max_tokens=30,
                                                      temperature=0).choices[0].text
        thread = threading.Thread(target=run_other)
        thread.start()
        leaving = requests.post(f"{server.url}/v1/completions", stream=True, timeout=T,
                                json={"prompt": "leaving", "max_tokens": 40, "stream": True})
        first = next(line for line in leaving.iter_lines() if line.startswith(b"data: "))
        request_id = json.loads(first[len(b"data: "):])["id"]
        leaving.close()  # the client goes away mid-stream
        assert wait_for(lambda: request_id in engine.cancelled), engine.cancelled
        thread.join(T)
        assert other["text"] == expected(ids("other"), 30)[0]
        assert wait_for(lambda: engine.running() == 0)
        finished = samples(server.url)
        assert finished[("tfshard_requests_finished_total", (("finish_reason", "cancelled"),))] == 1
        # A client that gives up waiting for a whole (not streamed) answer.
        with pytest.raises(requests.Timeout):
            requests.post(f"{server.url}/v1/completions", json={"prompt": "wait", "max_tokens": 40},
                          timeout=0.3)
        assert wait_for(lambda: engine.submitted[-1].id in engine.cancelled)
        assert wait_for(lambda: engine.running() == 0)


def test_drain_refuses_new_work_and_finishes_running(monkeypatch):
    with serving(delay=0.02) as (server, engine):
        running = requests.post(f"{server.url}/v1/completions", stream=True, timeout=T,
                                json={"prompt": "run", "max_tokens": 25, "stream": True,
                                      "temperature": 0})
        assert running.status_code == 200
        server.drain("SIGTERM: draining")
        assert server.draining == "SIGTERM: draining"
        err = error_of(requests.post(f"{server.url}/v1/completions", json={"prompt": "x"},
                                     timeout=T), 503)
        assert "draining" in err["message"]
        error_of(requests.post(f"{server.url}/v1/models/toy:predict",
                               json={"inputs": [[1, 2, 3, 4]]}, timeout=T), 503)
        health = requests.get(f"{server.url}/health", timeout=T)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        body = running.text  # the running stream goes on to its end
        assert body.rstrip().endswith("data: [DONE]")
        text = "".join(json.loads(e[6:])["choices"][0]["text"]
                       for e in body.split("\n\n") if e.startswith("data: {"))
        assert text == expected(ids("run"), 25)[0]


def test_stop_cancels_open_streams():
    engine = FakeEngine(delay=0.05)
    server = http.Server(engine, port=0, api_key="", graceful_seconds=0.2).start()
    try:
        stream = requests.post(f"{server.url}/v1/completions", stream=True, timeout=T,
                               json={"prompt": "slow", "max_tokens": 40, "stream": True})
        assert stream.status_code == 200 and wait_for(lambda: engine.running() == 1)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 5
        assert wait_for(lambda: engine.running() == 0) and engine.cancelled
        last = [e for e in stream.text.split("\n\n") if e][-1]
        assert json.loads(last[len("data: "):])["error"]["message"].endswith(
            "the server is stopping")
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{server.url}/health", timeout=2)
    finally:
        server.stop()
        engine.close()


def test_port_in_use_is_an_os_error(served):
    engine = FakeEngine()
    try:
        with pytest.raises(OSError):
            http.Server(engine, port=served[0].port, api_key="").start()
    finally:
        engine.close()


def test_front_imports_no_tensorflow():
    code = ("import sys, tfshard.serve.http, tfshard.serve.api; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, cwd=ROOT)
    assert out.returncode == 0, out.stderr


# The page.

def test_page_has_no_external_assets(url):
    page = requests.get(f"{url}/", timeout=T)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<h1>toy</h1>" in page.text and "/v1/completions" in page.text
    assert "http://" not in page.text and "https://" not in page.text and "src=" not in page.text
    with serving() as (server, _):
        server.app.state.front.engine.generates = False  # a model only for :predict
        other = requests.get(f"{server.url}/", timeout=T).text
        assert ":predict" in other and 'id="chat"' not in other


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe
    (`--remote-debugging-pipe`: JSON messages separated by NUL on fds 3 and 4)."""

    def __init__(self, profile):
        to_r, self.to_w = os.pipe()
        self.from_r, from_w = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={profile}", "--remote-debugging-pipe",
                 "about:blank"]
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_r} 4>&{from_w}', CHROMIUM, *flags],
            pass_fds=(to_r, from_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        os.close(to_r)
        os.close(from_w)
        self.buffer, self.next_id, self.session = b"", 0, None

    def send(self, method, params=None, session=True):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self.to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + T
        while time.monotonic() < deadline:
            while b"\0" not in self.buffer:
                chunk = os.read(self.from_r, 65536)
                assert chunk, "chromium closed its pipe"
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                return reply.get("result", {})
        raise TimeoutError(method)

    def open(self, url):
        page = next(t for t in self.send("Target.getTargets")["targetInfos"]
                    if t["type"] == "page")
        self.session = self.send("Target.attachToTarget",
                                 {"targetId": page["targetId"], "flatten": True})["sessionId"]
        self.send("Page.navigate", {"url": url})

    def eval(self, expression):
        return self.send("Runtime.evaluate", {"expression": expression,
                                              "returnByValue": True})["result"].get("value")

    def close(self):
        os.killpg(self.proc.pid, 9)
        self.proc.wait(5)
        os.close(self.to_w)
        os.close(self.from_r)


@pytest.mark.skipif(not os.path.exists(CHROMIUM) or shutil.which("bash") is None,
                    reason=f"no {CHROMIUM} (Debian's chromium; scripts/setup.sh installs it as "
                           "root when apt-get can)")
def test_page_streams_an_answer_in_headless_chromium():
    with serving(delay=0.03) as (server, engine), tempfile.TemporaryDirectory() as profile:
        browser = Browser(profile)
        try:
            browser.open(f"{server.url}/")
            assert wait_for(lambda: browser.eval(
                "document.readyState === 'complete' && !!document.getElementById('send')"))
            browser.eval("document.getElementById('max_tokens').value = '30'; "
                         "document.getElementById('prompt').focus()")
            browser.send("Input.insertText", {"text": "Hello page"})  # typed
            browser.eval("document.getElementById('send').click()")
            seen = []
            deadline = time.monotonic() + T
            while time.monotonic() < deadline:
                text, done = browser.eval("[document.getElementById('answer').textContent, "
                                          "document.body.dataset.done || '']")
                seen.append(text)
                if done:
                    break
                time.sleep(0.05)
            want = expected(ids("Hello page"), 30)[0]
            assert seen[-1] == want, (seen[-1], browser.eval(
                "document.getElementById('status').textContent"))
            assert any(0 < len(s) < len(want) for s in seen), "the answer came in one piece"
            assert browser.eval("document.getElementById('status').textContent").startswith(
                "done: length")
        finally:
            browser.close()
