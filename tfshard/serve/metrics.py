"""The server's Prometheus metrics: one registry per app, updated by the front and the engine."""

import prometheus_client

# Buckets in seconds: a token on CPU takes milliseconds to seconds; a first token may wait
# for a long prefill or a full queue.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
                40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                0.75, 1.0, 2.5, 5.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
                   160.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)


class Metrics:
    """Every metric of one server, in a `CollectorRegistry` of its own.

    The front records the HTTP side; the engine records the scheduler's side. `create_app`
    gives the engine this object by setting its `metrics` attribute (see `api.Engine`);
    an engine updates the metrics below only when that attribute is not None.

    Recorded by the front (tfshard/serve/http.py and the routes):
        requests: counter `tfshard_http_requests_total{endpoint, status}`: finished HTTP
            requests by route template (e.g. "/v1/completions", "other" for unknown
            paths) and status code (a stream counts with the status it started with).
        http_in_flight: gauge `tfshard_http_requests_in_flight`: HTTP requests being
            answered (streams included).
        request_latency: histogram `tfshard_request_duration_seconds{endpoint}`: from
            arrival to the last byte of a generation or predict answer.
        time_to_first_token: histogram `tfshard_time_to_first_token_seconds`: from a
            generation request's submission to the engine (once checked and tokenized)
            to its first generated token.
        time_per_output_token: histogram `tfshard_time_per_output_token_seconds`: per
            request, (time of the last token - time of the first) / the tokens after
            the first (one observation per request of two tokens or more).
        prompt_tokens: counter `tfshard_prompt_tokens_total`.
        generation_tokens: counter `tfshard_generation_tokens_total`.
        finished: counter `tfshard_requests_finished_total{finish_reason}`: generation
            requests by how they ended ("stop", "length", "cancelled", "error").

    Recorded by the engine:
        requests_running: gauge `tfshard_requests_running`: requests holding a slot of
            the running batch.
        requests_queued: gauge `tfshard_requests_queued`: requests waiting for a slot.
        batch_size: histogram `tfshard_batch_size`: rows of each decode step.
        kv_cache_slots_in_use: gauge `tfshard_kv_cache_slots_in_use`.
        kv_cache_slots: gauge `tfshard_kv_cache_slots`: the KV cache's slots in all.
        collective_seconds: counter `tfshard_collective_seconds_total`: time rank 0 spent
            in collectives (the step plan's broadcast and the model's own).
        predict_batch_rows: histogram `tfshard_predict_batch_rows`: rows of each
            coalesced `:predict` batch.

    Args:
        registry: the `prometheus_client.CollectorRegistry` to register in (default: a
            new one, so two servers in one process never share counts).
    """

    def __init__(self, registry=None):
        self.registry = registry or prometheus_client.CollectorRegistry(auto_describe=True)
        r = self.registry
        # The front's.
        self.requests = prometheus_client.Counter(
            "tfshard_http_requests", "HTTP requests answered, by route and status code.",
            ["endpoint", "status"], registry=r)
        self.http_in_flight = prometheus_client.Gauge(
            "tfshard_http_requests_in_flight", "HTTP requests being answered (streams too).",
            registry=r)
        self.request_latency = prometheus_client.Histogram(
            "tfshard_request_duration_seconds",
            "From a generation or predict request's arrival to its answer's last byte.",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = prometheus_client.Histogram(
            "tfshard_time_to_first_token_seconds",
            "From a generation request's submission to its first generated token.",
            buckets=TTFT_BUCKETS, registry=r)
        self.time_per_output_token = prometheus_client.Histogram(
            "tfshard_time_per_output_token_seconds",
            "Per request: (last token's time - first token's time) / tokens after the first.",
            buckets=TPOT_BUCKETS, registry=r)
        self.prompt_tokens = prometheus_client.Counter(
            "tfshard_prompt_tokens", "Prompt tokens of generation requests.", registry=r)
        self.generation_tokens = prometheus_client.Counter(
            "tfshard_generation_tokens", "Tokens generated.", registry=r)
        self.finished = prometheus_client.Counter(
            "tfshard_requests_finished", "Generation requests ended, by finish reason.",
            ["finish_reason"], registry=r)
        # The engine's.
        self.requests_running = prometheus_client.Gauge(
            "tfshard_requests_running", "Requests holding a slot of the running batch.",
            registry=r)
        self.requests_queued = prometheus_client.Gauge(
            "tfshard_requests_queued", "Requests waiting for a slot.", registry=r)
        self.batch_size = prometheus_client.Histogram(
            "tfshard_batch_size", "Rows of each decode step.", buckets=BATCH_BUCKETS,
            registry=r)
        self.kv_cache_slots_in_use = prometheus_client.Gauge(
            "tfshard_kv_cache_slots_in_use", "KV-cache slots held by requests.", registry=r)
        self.kv_cache_slots = prometheus_client.Gauge(
            "tfshard_kv_cache_slots", "KV-cache slots in all.", registry=r)
        self.collective_seconds = prometheus_client.Counter(
            "tfshard_collective_seconds", "Time rank 0 spent in collectives.", registry=r)
        self.predict_batch_rows = prometheus_client.Histogram(
            "tfshard_predict_batch_rows", "Rows of each coalesced :predict batch.",
            buckets=BATCH_BUCKETS, registry=r)

    def render(self):
        """The registry in Prometheus's text format.

        Returns:
            `(body, content_type)`: bytes and the media type to answer with.
        """
        body = prometheus_client.generate_latest(self.registry)
        return body, prometheus_client.CONTENT_TYPE_LATEST

    def observe_generation(self, arrived, token_times, prompt_tokens, completion_tokens,
                           finish_reason):
        """Records one finished generation request (the front calls it once per request).

        Args:
            arrived: when the request was submitted (`time.monotonic()`).
            token_times: `time.monotonic()` of each event that carried tokens, with the
                number it carried: `[(t, n), ...]`.
            prompt_tokens, completion_tokens: its usage counts.
            finish_reason: "stop", "length", "cancelled" or "error".
        """
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.finished.labels(finish_reason=finish_reason or "unknown").inc()
        if token_times:
            self.time_to_first_token.observe(max(0.0, token_times[0][0] - arrived))
            later = sum(n for _, n in token_times[1:])  # tokens after the first event's
            if later > 0:
                span = token_times[-1][0] - token_times[0][0]
                self.time_per_output_token.observe(max(0.0, span) / later)
