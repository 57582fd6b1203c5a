"""`tfshard serve` for real: SmolLM2 at TP=2 over MPI, real clients on loopback.

One server for most tests (2 ranks, 4 KV-cache slots, 256 positions, 3 requests queued at
most, prompts in chunks of 32): the `openai` client streams " Paris"; concurrent greedy
requests each equal the same request alone and keras-hub's unsharded model; a seed makes
sampling reproducible; a client that leaves mid-stream frees its slot; bad requests get a
400 naming the field and a full queue a 429 with Retry-After; the metrics move; SIGTERM
drains (the running stream ends whole, new requests get 503, the job exits 0). Two more
lose a rank mid-stream. A stopped rank is found by rank 0's next collective: the stream
ends with an error event, /health answers 503, and the job ends non-zero naming the rank.
A killed rank makes the launcher end the job at once (MPICH's Hydra stops every rank of
a job when one dies, rank 0 too, so its clients' connections drop), reporting the pid that
the server's first line maps to rank 1. Every wait is bounded.
"""

import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tfshard.cli.bench.serve import ServerJob

pytest.importorskip("openai")
requests = pytest.importorskip("requests")

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "One, two, three,", "def fibonacci(n):",
           "The chemical symbol for gold is", "Once upon a time", "Water boils at"]


class Job(ServerJob):
    """The server job of tfshard/cli/bench/serve.py, for the tests."""

    def mpiexec(self):
        return self.proc.pid  # ./horovodrun.sh execs mpiexec: the same process


def complete(job, prompt, max_tokens=12, **kw):
    r = requests.post(job.url("/v1/completions"), json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw},
        timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def server():
    job = Job("--slots", 4, "--max-len", 256, "--max-waiting", 3, "--prefill-tokens", 32)
    try:
        yield job.wait_ready()
    finally:
        job.stop()


def test_openai_client_streams_paris_and_counts_usage(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url("/v1"), api_key="unused", timeout=300, max_retries=0)
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is",
                                            max_tokens=8, temperature=0, stream=True))
    text = "".join(c.choices[0].text for c in chunks)
    assert text.startswith(" Paris"), text
    assert chunks[-1].choices[0].finish_reason == "length"
    whole = client.completions.create(model=MODEL, prompt="The capital of France is",
                                      max_tokens=8, temperature=0)
    assert whole.choices[0].text == text
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (5, 8)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0)
    assert "Paris" in chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "stop"  # the end token, not the limit
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_concurrent_requests_each_equal_the_request_alone_and_the_unsharded_model(server):
    lengths = [20, 9, 16, 5, 24, 12]
    alone = [complete(server, p, n)["choices"][0]["text"] for p, n in zip(PROMPTS, lengths)]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # 6 at once on 4 slots: 2 wait
        together = list(pool.map(lambda a: complete(server, *a)["choices"][0]["text"],
                                 zip(PROMPTS, lengths)))
    assert together == alone
    # keras-hub's own loop on the whole model, in this process.
    import tfshard
    from tfshard import comm as comm_lib

    os.environ["TFSHARD_DECODE"] = "keras"
    try:
        ref = tfshard.load("smollm2", world=tfshard.World(comm_lib.create("local"), "local"))
        for prompt, n, got in list(zip(PROMPTS, lengths, alone))[:3]:
            length = len(ref.preprocessor.tokenizer(prompt)) + n
            want = ref.generate(prompt, max_length=length, strip_prompt=True, sampler="greedy",
                                stop_token_ids=None)
            assert want == got, (prompt, want, got)
    finally:
        os.environ.pop("TFSHARD_DECODE", None)


def test_a_seed_makes_sampling_reproducible(server):
    kw = dict(temperature=0.9, top_p=0.95, seed=7)
    a = complete(server, "Once upon a time", 16, **kw)["choices"][0]["text"]
    b = complete(server, "Once upon a time", 16, **kw)["choices"][0]["text"]
    assert a == b


def _slots_in_use(job):
    text = requests.get(job.url("/metrics"), timeout=30).text
    return float(re.search(r"^tfshard_kv_cache_slots_in_use (\S+)$", text, re.M).group(1))


def test_a_client_that_leaves_frees_its_slot(server):
    with requests.post(server.url("/v1/completions"), stream=True, timeout=300, json={
            "model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 200,
            "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
        assert any(line.startswith(b"data: {") for line in got)
    deadline = time.monotonic() + 30
    while _slots_in_use(server) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _slots_in_use(server) == 0, "the left request still holds its slot"
    assert complete(server, "The capital of France is", 4)["choices"][0]["text"].startswith(" Paris")


def test_bad_requests_name_the_field_and_a_full_queue_says_retry_after(server):
    long_prompt = " ".join(["word"] * 300)
    r = requests.post(server.url("/v1/completions"), timeout=60,
                      json={"model": MODEL, "prompt": long_prompt, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    r = requests.post(server.url("/v1/completions"), timeout=60,
                      json={"model": MODEL, "prompt": "Hi", "max_tokens": 300})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    assert "256" in r.json()["error"]["message"]
    r = requests.post(server.url("/v1/completions"), timeout=60, json={"model": "gpt-4", "prompt": "Hi"})
    assert r.status_code == 404 and MODEL in r.json()["error"]["message"], r.text
    r = requests.post(server.url("/v1/completions"), timeout=60, data=b"{not json")
    assert r.status_code == 400, r.text

    def one(i):
        return requests.post(server.url("/v1/completions"), timeout=300, json={
            "model": MODEL, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 40,
            "temperature": 0})

    with ThreadPoolExecutor(12) as pool:  # 4 slots + 3 waiting: the rest are turned away
        answers = list(pool.map(one, range(12)))
    codes = sorted(a.status_code for a in answers)
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
    busy = next(a for a in answers if a.status_code == 429)
    assert int(busy.headers["Retry-After"]) >= 1
    assert complete(server, "Water boils at", 4)["choices"][0]["text"]  # still serving


def test_metrics_count_steps_tokens_and_collectives(server):
    text = requests.get(server.url("/metrics"), timeout=30).text
    values = {m.group(1): float(m.group(2)) for m in
              re.finditer(r"^(tfshard_[a-z_]+(?:_count|_total|_sum)?)(?:\{[^}]*\})? (\S+)$", text, re.M)}
    assert values["tfshard_batch_size_count"] > 0
    assert values["tfshard_generation_tokens_total"] > 0
    assert values["tfshard_collective_seconds_total"] > 0
    assert values["tfshard_kv_cache_slots"] == 4
    assert values["tfshard_time_to_first_token_seconds_count"] > 0


def test_sigterm_drains_running_requests_then_exits(server):
    # Last in the module: ends the server.
    result = {}

    def stream():
        with requests.post(server.url("/v1/completions"), stream=True, timeout=300, json={
                "model": MODEL, "prompt": "Once upon a time", "max_tokens": 150,
                "temperature": 0, "stream": True}) as r:
            result["lines"] = [line for line in r.iter_lines() if line]

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 60
    while _slots_in_use(server) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(server.mpiexec(), signal.SIGTERM)
    time.sleep(0.5)
    late = requests.post(server.url("/v1/completions"), timeout=60,
                         json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert late.status_code == 503, late.text
    t.join(300)
    assert result["lines"][-1] == b"data: [DONE]"
    finish = json.loads(result["lines"][-2][len(b"data: "):])["choices"][0]["finish_reason"]
    assert finish == "length"
    assert server.proc.wait(120) == 0, server.output[-3000:]
    assert "SIGTERM: draining" in server.output


def _stream_in_thread(job, events):
    def stream():
        try:
            with requests.post(job.url("/v1/completions"), stream=True, timeout=300, json={
                    "model": MODEL, "prompt": "Once upon a time", "max_tokens": 200,
                    "temperature": 0, "stream": True}) as r:
                events.extend(line for line in r.iter_lines() if line)
        except requests.RequestException as e:  # the connection may end with the job
            events.append(f"connection: {type(e).__name__}".encode())

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while not any(e.startswith(b"data: {") for e in events) and time.monotonic() < deadline:
        time.sleep(0.05)
    return t


def _health_until_exit(job, seconds=90):
    statuses, deadline = [], time.monotonic() + seconds
    while job.proc.poll() is None and time.monotonic() < deadline:
        try:
            statuses.append(requests.get(job.url("/health"), timeout=5).status_code)
        except requests.ConnectionError:
            statuses.append("refused")
        time.sleep(0.1)
    return statuses


@pytest.mark.alone  # the stopped rank is named at the default collective deadline
@pytest.mark.xdist_group("serve_faults")  # one such server at a time
def test_a_stopped_rank_ends_streams_with_an_error_and_the_job_naming_it():
    job = Job("--slots", 2, "--max-len", 256)
    try:
        job.wait_ready()
        events = []
        t = _stream_in_thread(job, events)
        os.kill(_rank_pid(job, 1), signal.SIGSTOP)
        statuses = _health_until_exit(job)
        t.join(60)
        code = job.proc.wait(120)
    finally:
        job.stop()
    assert code != 0, job.output[-3000:]
    assert 503 in statuses, statuses
    assert any(b'"error"' in e and b"stopped" in e for e in events), events[-3:]
    assert events[-1] != b"data: [DONE]"
    assert re.search(r"rank 1 \[pid \d+, stopped", job.output), job.output[-3000:]


@pytest.mark.alone
@pytest.mark.xdist_group("serve_faults")
def test_a_killed_rank_ends_the_job_at_once_and_the_launcher_names_its_pid():
    job = Job("--slots", 2, "--max-len", 256)
    try:
        job.wait_ready()
        events = []
        t = _stream_in_thread(job, events)
        pid = _rank_pid(job, 1)
        os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        code = job.proc.wait(60)
        took = time.monotonic() - started
        t.join(30)
    finally:
        job.stop()
    assert code != 0 and took < 30, (code, took)
    # The launcher reports the bad termination (by pid); the server's first line says
    # which pid is which rank.
    assert f"1 pid {pid} on" in job.output and "BAD TERMINATION" in job.output, job.output[-3000:]
    assert events[-1] != b"data: [DONE]"


def _rank_pid(job, rank):
    """The pid of MPI rank `rank` of a `tfshard serve` job (its python process: the one whose
    environment says PMI_RANK=rank and whose command line serves on this job's launcher)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if (b"serve" in cmdline and b"python" in cmdline.split(b"\0")[0]
                and env.get(b"PMI_RANK") == str(rank).encode()
                and env.get(b"TFSHARD_MPIEXEC_PID") == str(job.proc.pid).encode()):
            return int(entry)
    raise AssertionError(f"no pid for rank {rank}")
