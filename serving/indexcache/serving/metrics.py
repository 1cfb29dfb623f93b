"""Serving metrics (Prometheus, prefix `indexcache_`, labels `model` and `deployment`) and the FLOP count
behind the IndexCache savings.

Where the numbers live: every `IndexCacheServer` replica owns one `ServingMetrics` with its own
registry (the engine runs in that process). Two ways out, one source:
  - the ingress' `/metrics` route asks the server deployment for its exposition text: in the embedded
    default (one replica) that is everything on the HTTP port;
  - with `metrics_port` set (Kubernetes), each replica also serves its registry on that port in its own
    pod, which the ServiceMonitor/PodMonitor scrapes per pod; Prometheus adds the pod label, so replicas
    never collide and none is missed (the ingress route would show only the replica it reached).

FLOPs (per forward, counted exactly from shapes): a query at position p sees p + 1 keys (causal, cache
included). For every F layer the lightning indexer costs `2 * H * D` FLOPs per (query, visible key) pair
(the q.k products of H heads of dim D; the ReLU, head weighting and top-k are not counted). An S layer
skips exactly that amount. "Money saved" (docs/serving.md): for each forward,
`seconds * skipped_flops / computed_flops * gpu_hourly_usd / 3600`, i.e. what the skipped indexer work
would have cost at the speed this forward actually ran.
"""
from __future__ import annotations

from collections import Counter as Tally
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from indexcache_contracts import metrics as contract

from ..model.config import ModelArgs

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
FINISH_REASONS = contract.FINISH_REASONS
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)


# ---------------------------------------------------------------------------------------------------
# FLOP accounting
# ---------------------------------------------------------------------------------------------------
def visible_pairs(start: int, n_queries: int) -> int:
    """(query, key) pairs of n_queries new tokens starting at position `start`: sum_t (start + t + 1)."""
    return n_queries * start + n_queries * (n_queries + 1) // 2


def sparse_pairs(start: int, n_queries: int, topk: int) -> int:
    """Pairs sparse attention reads: each query attends to min(topk, visible keys)."""
    total, first, last = 0, start + 1, start + n_queries     # visible keys of the first and last query
    dense_until = min(last, topk)                            # queries seeing <= topk keys attend to all
    if first <= dense_until:
        total += (first + dense_until) * (dense_until - first + 1) // 2
    total += max(0, last - max(first, topk + 1) + 1) * topk
    return total


@dataclass(frozen=True)
class FlopModel:
    """Per-token and per-pair FLOP constants of one model (2 FLOPs per multiply-add)."""
    indexer_per_pair: int       # one F layer: 2 * H * D
    dense_per_token: int        # all layers' weight matmuls except the indexer's (MoE: active experts)
    indexer_proj_per_token: int  # one F layer's indexer projections (wq_b, wk, weights_proj)
    attention_per_pair: int     # one layer's sparse attention per (query, selected key)
    lm_head_per_row: int
    n_layers: int
    topk: int

    @classmethod
    def of(cls, args: ModelArgs) -> "FlopModel":
        d, H, Di = args.dim, args.index_n_heads, args.index_head_dim
        if args.attention == "gqa":
            attn = d * args.n_heads * args.head_dim * 2 + d * args.n_kv_heads * args.head_dim * 2
            per_pair = 2 * args.n_heads * args.head_dim * 2            # q.k and p.v
            q_in = d
        else:  # MLA, weight-absorbed: scores and values in the latent (kv_lora_rank + rope) space
            qk = args.qk_nope_head_dim + args.qk_rope_head_dim
            attn = (d * args.q_lora_rank + args.q_lora_rank * args.n_heads * qk
                    + d * (args.kv_lora_rank + args.qk_rope_head_dim)
                    + args.kv_lora_rank * args.n_heads * (args.qk_nope_head_dim + args.v_head_dim)
                    + args.n_heads * args.v_head_dim * d)
            per_pair = 2 * args.n_heads * (2 * args.kv_lora_rank + args.qk_rope_head_dim)
            q_in = args.q_lora_rank
        ffn = 0
        for layer in range(args.n_layers):
            if args.is_moe_layer(layer):
                experts = args.n_activated_experts + args.n_shared_experts
                ffn += 3 * d * args.moe_inter_dim * experts + d * args.n_routed_experts
            else:
                ffn += 3 * d * args.inter_dim
        return cls(indexer_per_pair=2 * H * Di, dense_per_token=2 * (attn * args.n_layers + ffn),
                   indexer_proj_per_token=2 * (q_in * H * Di + d * Di + d * H),
                   attention_per_pair=per_pair, lm_head_per_row=2 * d * args.vocab_size,
                   n_layers=args.n_layers, topk=args.index_topk)

    def forward(self, rows: list[tuple[int, int]], n_full: int, logits_rows: int) -> tuple[int, int, int]:
        """rows: (start, n_queries) per sequence. Returns (indexer computed, indexer skipped, model total)."""
        pairs = sum(visible_pairs(s, t) for s, t in rows)
        tokens = sum(t for _, t in rows)
        attended = sum(sparse_pairs(s, t, self.topk) for s, t in rows)
        computed = n_full * self.indexer_per_pair * pairs
        skipped = (self.n_layers - n_full) * self.indexer_per_pair * pairs
        total = (computed + n_full * self.indexer_proj_per_token * tokens + self.dense_per_token * tokens
                 + self.n_layers * self.attention_per_pair * attended + self.lm_head_per_row * logits_rows)
        return computed, skipped, total


# ---------------------------------------------------------------------------------------------------
# the metric set
# ---------------------------------------------------------------------------------------------------
class ServingMetrics:
    """All `indexcache_*` series of one replica, in their own registry (see the module docstring)."""

    def __init__(self, model: str, deployment: str, n_layers: int, gpu_hourly_usd: float = 0.0,
                 registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.labels = {"model": model, "deployment": deployment}
        names = list(contract.SERVING_LABELS)
        r = self.registry

        def h(name, doc, buckets):
            return Histogram(name, doc, names, buckets=buckets, registry=r).labels(**self.labels)

        def c(name, doc):
            return Counter(name, doc, names, registry=r).labels(**self.labels)

        def g(name, doc):
            return Gauge(name, doc, names, registry=r).labels(**self.labels)

        self.ttft = h(contract.TTFT_SECONDS, "Request arrival to first token.", LATENCY_BUCKETS)
        self.tpot = h(contract.TPOT_SECONDS,
                      "Mean inter-token time of a request, after its first token.", TPOT_BUCKETS)
        self.e2e = h(contract.E2E_SECONDS, "Request arrival to last token.", LATENCY_BUCKETS)
        self.queue_time = h(contract.QUEUE_TIME_SECONDS, "Request arrival to its admission into the batch.",
                            LATENCY_BUCKETS)
        self.prefill_time = h(contract.PREFILL_TIME_SECONDS, "Admission to the first token (the prompt's prefill).",
                              LATENCY_BUCKETS)
        self.decode_time = h(contract.DECODE_TIME_SECONDS, "First token to the end of the request.", LATENCY_BUCKETS)
        self.request_prompt_tokens = h(contract.REQUEST_PROMPT_TOKENS, "Prompt length of accepted requests (tokens).",
                                       TOKEN_BUCKETS)
        self.request_generation_tokens = h(contract.REQUEST_GENERATION_TOKENS,
                                           "Tokens generated per finished request, as its usage counts them.",
                                           TOKEN_BUCKETS)
        self.prompt_tokens = c(contract.PROMPT_TOKENS, "Prompt tokens processed.")
        self.generation_tokens = c(contract.GENERATION_TOKENS,
                                   "Tokens generated, as the responses' usage counts them (no end-of-text token).")
        self._requests = Counter(contract.REQUESTS,
                                 "Finished requests by finish_reason (stop, length, abort, error).",
                                 names + ["finish_reason"], registry=r)
        for reason in FINISH_REASONS:  # export zeros so rate() works before the first abort/error
            self._requests.labels(**self.labels, finish_reason=reason)
        self._http = Counter(contract.HTTP_RESPONSES, "HTTP responses of the API, by route and status code.",
                             names + ["route", "code"], registry=r)
        self._rejected = Counter(contract.REQUESTS_REJECTED,
                                 "Requests refused before generating, by reason (429, 400, context length, ...).",
                                 names + ["reason"], registry=r)
        for reason in contract.REJECT_REASONS:
            self._rejected.labels(**self.labels, reason=reason)
        self.running = g(contract.REQUESTS_RUNNING, "Requests in the running batch.")
        self.waiting = g(contract.REQUESTS_WAITING, "Requests queued for a KV cache slot.")
        self.kv_usage = g(contract.KV_CACHE_USAGE, "KV cache in use (0..1): blocks held by requests / pool blocks "
                                                   "(paged), or cached tokens / slot rows (contiguous).")
        self.prefix_hits = c(contract.PREFIX_CACHE_HITS, "Prompt tokens whose KV came from cached prefix blocks.")
        self.prefix_queries = c(contract.PREFIX_CACHE_QUERIES,
                                "Prompt tokens looked up in the prefix cache (hits / queries = hit rate).")
        self.preemptions = c(contract.PREEMPTIONS,
                             "Requests preempted when the KV pool ran out of blocks (recomputed later).")
        self.full_layers = g(contract.FULL_LAYERS, "F (indexer-running) layers in the active pattern.")
        self.layers = g(contract.LAYERS, "Layers in the model.")
        self.layers.set(n_layers)
        self.pattern_version = g(contract.PATTERN_VERSION, "Version of the active pattern (from user_config).")
        self.indexer_flops = c(contract.INDEXER_FLOPS,
                               "Lightning-indexer FLOPs computed by F layers (2*H*D per query-key pair).")
        self.indexer_flops_skipped = c(contract.INDEXER_FLOPS_SKIPPED,
                                       "Lightning-indexer FLOPs skipped by S layers (2*H*D per query-key pair).")
        self.gpu_hourly = g(contract.GPU_HOURLY_USD, "Configured price of this replica's GPUs per hour (USD).")
        self.cost = c(contract.COST_USD, "Replica busy (forward) time x gpu_hourly_usd / 3600.")
        self.cost_saved = c(contract.COST_SAVED_USD,
                            "Money IndexCache saved: per forward, seconds x indexer FLOPs skipped / model FLOPs "
                            "computed x gpu_hourly_usd / 3600 (the skipped work priced at the measured speed).")
        self.set_price(gpu_hourly_usd)

    def set_price(self, gpu_hourly_usd: float) -> None:
        self.gpu_hourly_usd = float(gpu_hourly_usd)
        self.gpu_hourly.set(self.gpu_hourly_usd)

    def set_pattern(self, pattern: str, version: int) -> None:
        self.full_layers.set(pattern.count("F"))
        self.pattern_version.set(version)

    def observe_forward(self, seconds: float, indexer_computed: int, indexer_skipped: int, model_flops: int) -> None:
        self.indexer_flops.inc(indexer_computed)
        self.indexer_flops_skipped.inc(indexer_skipped)
        usd_per_second = self.gpu_hourly_usd / 3600
        self.cost.inc(seconds * usd_per_second)
        if model_flops > 0:
            self.cost_saved.inc(seconds * indexer_skipped / model_flops * usd_per_second)

    def observe_finished(self, reason: str, ttft: float | None, tpot: float | None, e2e: float,
                         queue: float | None = None, prefill: float | None = None,
                         decode: float | None = None) -> None:
        """One request the engine finished (any reason), with its phases in seconds (None: never reached)."""
        self._requests.labels(**self.labels, finish_reason=reason).inc()
        for hist, value in ((self.ttft, ttft), (self.tpot, tpot), (self.queue_time, queue),
                            (self.prefill_time, prefill), (self.decode_time, decode)):
            if value is not None:
                hist.observe(value)
        self.e2e.observe(e2e)

    def observe_failed_before_engine(self) -> None:
        """A request that failed in the server before the engine took it (the engine counts all others)."""
        self._requests.labels(**self.labels, finish_reason="error").inc()

    def observe_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """A request's final usage, as its response reports it."""
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(completion_tokens)

    def observe_http(self, responses: dict[tuple[str, str], int], rejected: dict[str, int]) -> None:
        """Counts the ingress collected since its last report: {(route, code): n}, {reason: n}."""
        for (route, code), n in responses.items():
            route = route if route in contract.HTTP_ROUTES else "other"
            self._http.labels(**self.labels, route=route, code=str(code)).inc(n)
        for reason, n in rejected.items():
            if reason in contract.REJECT_REASONS:
                self._rejected.labels(**self.labels, reason=reason).inc(n)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# ---------------------------------------------------------------------------------------------------
# HTTP outcomes, counted by the ingress (its process has no registry) and reported to a server replica
# ---------------------------------------------------------------------------------------------------
class HttpOutcomes:
    """Responses by (route, code) and rejections by reason since the last report to the server."""

    def __init__(self):
        self.responses: Tally = Tally()
        self.rejected: Tally = Tally()

    def take(self) -> tuple[dict, dict]:
        out = (dict(self.responses), dict(self.rejected))
        self.responses.clear()
        self.rejected.clear()
        return out

    def give_back(self, responses: dict, rejected: dict) -> None:
        self.responses.update(responses)
        self.rejected.update(rejected)


HTTP_OUTCOMES = HttpOutcomes()   # one ingress replica per process
