"""Suite `serve`: `tfshard serve` under load, at 1 and at N concurrent streams, per TP size.

For each `--np`, a server of real SmolLM2 under ./horovodrun.sh (MPI, `--slots` KV-cache
slots) and a load generator in this process on loopback: `--streams` clients at once, each
sending `--requests` greedy streaming completions of a `--prompt-tokens`-token prompt for
`--new-tokens` tokens. Per concurrency: generated tokens/s over the run, the median time per
output token, time to first token at p50 and p99; the ratios 8 streams / 1 stream. The same
request through `ShardedModel.generate` in a job of its own at the same TP gives the server's
overhead (one stream's request time over generate's).

    .venv/bin/python scripts/bench.py serve --np 1 2 --streams 1 8
"""

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tfshard.cli.bench import common


def _prompt(tokens):
    import numpy as np

    # Ordinary ids of SmolLM2's vocabulary (past its special tokens), fixed per length.
    return np.random.default_rng(tokens).integers(1000, 40000, tokens).tolist()


def reference_child(args):
    """The same request through `generate` (RESULT: seconds, tokens)."""
    import numpy as np

    import tfshard

    world = tfshard.init()
    sharded = tfshard.load("smollm2", world=world)
    ids = _prompt(args.prompt_tokens)
    total = len(ids) + args.new_tokens
    x = {"token_ids": np.zeros((1, total), np.int32), "padding_mask": np.zeros((1, total), bool)}
    x["token_ids"][0, :len(ids)] = ids
    x["padding_mask"][0, :len(ids)] = True
    run = lambda: sharded.generate(x, stop_token_ids=None, sampler="greedy")  # noqa: E731
    run()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    if world.rank == 0:
        print("RESULT " + json.dumps({"seconds": statistics.median(times)}), flush=True)


class ServerJob:
    """A `tfshard serve smollm2` job under ./horovodrun.sh, its output read line by line
    (the benchmarks' and the tests' server).

    Args:
        *args: options after `tfshard serve smollm2 --port 0`.
        np_: ranks.
    """

    def __init__(self, *args, np_=2):
        cmd = [str(common.ROOT / "horovodrun.sh"), "-np", str(np_), sys.executable, "-m",
               "tfshard", "serve", "smollm2", "--port", "0", *map(str, args)]
        self.proc = subprocess.Popen(cmd, cwd=common.ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1",
                                          "TF_CPP_MIN_LOG_LEVEL": "2"})
        self.port, self.lines = None, []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))

    @property
    def output(self):
        """What the job has written (all of it, once it has ended)."""
        if self.proc.poll() is not None:
            self._reader.join(30)
        return "".join(self.lines)

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout=600):
        """Returns once /health answers 200.

        Raises:
            RuntimeError: the job ended, or did not get there in `timeout` seconds (its
                output's end in the message).
        """
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n"
                                   f"{self.output[-4000:]}")
            if self.port:
                try:
                    if requests.get(self.url("/health"), timeout=5).status_code == 200:
                        return self
                except requests.RequestException:
                    pass
            time.sleep(0.5)
        raise RuntimeError(f"the server was not ready in {timeout} s:\n{self.output[-4000:]}")

    def stop(self, sig=signal.SIGKILL, timeout=120):
        """Ends the job (every process of it) unless it has ended."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout)


def _request(port, prompt, new_tokens):
    """One streaming completion: (time to first token, token times, tokens, seconds)."""
    import requests

    t0 = time.perf_counter()
    first, times, tokens = None, [], 0
    with requests.post(f"http://127.0.0.1:{port}/v1/completions", stream=True, timeout=600,
                       json={"prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                             "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                now = time.perf_counter()
                first = first if first is not None else now - t0
                times.append(now)
    return first, times, tokens, time.perf_counter() - t0


def _load(port, streams, requests_each, prompt, new_tokens):
    results = []

    def client(_):
        return [_request(port, prompt, new_tokens) for _ in range(requests_each)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        for part in pool.map(client, range(streams)):
            results += part
    wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    tpot = [(r[1][-1] - r[1][0]) / (len(r[1]) - 1) for r in results if len(r[1]) > 1]
    pct = lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))]  # noqa: E731
    return {"streams": streams, "requests": len(results),
            "tokens": sum(r[2] for r in results), "wall_s": wall,
            "tokens_s": sum(r[2] for r in results) / wall,
            "tpot_ms": 1e3 * statistics.median(tpot), "ttft_p50_s": pct(0.5),
            "ttft_p99_s": pct(0.99), "request_s": statistics.median(r[3] for r in results)}


def suite_serve(args):
    rows = []
    prompt = _prompt(args.prompt_tokens)
    for n in args.np:
        server = ServerJob("--slots", args.slots, "--max-len",
                           args.prompt_tokens + args.new_tokens + 8, np_=n)
        try:
            server.wait_ready(args.timeout)
            _load(server.port, 1, 1, prompt, 8)  # warm up: the step traced
            for streams in args.streams:
                r = _load(server.port, streams, args.requests, prompt, args.new_tokens)
                rows.append({"tp": n, **r})
                print(f"TP={n} {streams} stream(s): {r['tokens_s']:.1f} tokens/s, "
                      f"TPOT {r['tpot_ms']:.1f} ms, TTFT p50 {r['ttft_p50_s']:.3f} s", flush=True)
        finally:
            server.stop(signal.SIGTERM)
        ref = common.run(common.launch("mpi", n, list(common.CHILD) + [
            "_serve_ref", "--prompt-tokens", str(args.prompt_tokens), "--new-tokens",
            str(args.new_tokens), "--repeats", "3"]), args.timeout)
        rows.append({"tp": n, "generate_s": ref["seconds"]})
    print(f"\nserve: SmolLM2, greedy, {args.prompt_tokens}-token prompts, {args.new_tokens} new "
          f"tokens, {args.slots} slots, {args.requests} request(s) per stream; "
          f"{common.cpu_model()}")
    print(f"{'TP':>3} {'streams':>8} {'tokens/s':>9} {'x 1 stream':>11} {'TPOT ms':>8} "
          f"{'x 1 stream':>11} {'TTFT p50 s':>11} {'TTFT p99 s':>11}")
    for n in args.np:
        mine = [r for r in rows if r["tp"] == n and "streams" in r]
        one = next((r for r in mine if r["streams"] == 1), None)
        for r in mine:
            print(f"{n:>3} {r['streams']:>8} {r['tokens_s']:>9.1f} "
                  f"{(r['tokens_s'] / one['tokens_s'] if one else float('nan')):>10.2f}x "
                  f"{r['tpot_ms']:>8.1f} {(r['tpot_ms'] / one['tpot_ms'] if one else float('nan')):>10.2f}x "
                  f"{r['ttft_p50_s']:>11.3f} {r['ttft_p99_s']:>11.3f}")
        ref = next(r for r in rows if r["tp"] == n and "generate_s" in r)
        if one:
            print(f"{n:>3}  one stream's request {one['request_s']:.2f} s vs generate "
                  f"{ref['generate_s']:.2f} s: {one['request_s'] / ref['generate_s']:.2f}x "
                  "(the server's overhead)")
    common.write_report("serve-smollm2", args, {str(i): r for i, r in enumerate(rows)})


def add_parsers(sub):
    """Adds the suite `serve` and its job `_serve_ref`."""
    commands = {"serve": suite_serve, "_serve_ref": reference_child}
    for name, p in common.add_commands(sub, commands).items():
        p.add_argument("--prompt-tokens", type=int, default=64)
        p.add_argument("--new-tokens", type=int, default=64)
        p.add_argument("--repeats", type=int, default=3)
        if name == "serve":
            p.add_argument("--np", type=int, nargs="+", default=[1, 2])
            p.add_argument("--streams", type=int, nargs="+", default=[1, 8])
            p.add_argument("--requests", type=int, default=2,
                           help="requests each stream sends, one after the other")
            p.add_argument("--slots", type=int, default=8)
            p.add_argument("--timeout", type=int, default=1800)
