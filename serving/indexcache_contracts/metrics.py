"""Metric names as Prometheus shows them (docs/contracts.md's tables; dashboards and alert rules query
these). Serving replicas export SERVING_METRICS with SERVING_LABELS; the operator OPERATOR_METRICS
with OPERATOR_LABELS. Counters are named with their `_total` suffix, as scraped."""
from __future__ import annotations

SERVING_LABELS = ("model", "deployment")
FINISH_REASONS = ("stop", "length", "abort", "error")    # label of indexcache_requests_total
# label `reason` of indexcache_requests_rejected_total: requests answered with a 4xx or 503 before generating
REJECT_REASONS = ("too_many_requests", "invalid_request", "context_length", "unauthorized", "model_not_found",
                  "not_ready")
# label `route` of indexcache_http_responses_total (any other path counts as "other"); `code` is the status
HTTP_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/admin/pattern", "other")

TTFT_SECONDS = "indexcache_time_to_first_token_seconds"
TPOT_SECONDS = "indexcache_time_per_output_token_seconds"
E2E_SECONDS = "indexcache_e2e_request_latency_seconds"
PROMPT_TOKENS = "indexcache_prompt_tokens_total"
GENERATION_TOKENS = "indexcache_generation_tokens_total"
REQUESTS = "indexcache_requests_total"
REQUESTS_RUNNING = "indexcache_requests_running"
REQUESTS_WAITING = "indexcache_requests_waiting"
KV_CACHE_USAGE = "indexcache_kv_cache_usage_ratio"
FULL_LAYERS = "indexcache_full_layers"
LAYERS = "indexcache_layers"
PATTERN_VERSION = "indexcache_pattern_version"
INDEXER_FLOPS = "indexcache_indexer_flops_total"
INDEXER_FLOPS_SKIPPED = "indexcache_indexer_flops_skipped_total"
GPU_HOURLY_USD = "indexcache_gpu_hourly_usd"
COST_USD = "indexcache_cost_usd_total"
COST_SAVED_USD = "indexcache_cost_saved_usd_total"
HTTP_RESPONSES = "indexcache_http_responses_total"
REQUESTS_REJECTED = "indexcache_requests_rejected_total"
QUEUE_TIME_SECONDS = "indexcache_request_queue_time_seconds"
PREFILL_TIME_SECONDS = "indexcache_request_prefill_time_seconds"
DECODE_TIME_SECONDS = "indexcache_request_decode_time_seconds"
REQUEST_PROMPT_TOKENS = "indexcache_request_prompt_tokens"
REQUEST_GENERATION_TOKENS = "indexcache_request_generation_tokens"
PREFIX_CACHE_HITS = "indexcache_prefix_cache_hits_total"         # prompt tokens served from cached KV blocks
PREFIX_CACHE_QUERIES = "indexcache_prefix_cache_queries_total"   # prompt tokens looked up in the prefix cache
PREEMPTIONS = "indexcache_num_preemptions_total"                 # requests preempted (out of KV blocks)

SERVING_METRICS = {
    TTFT_SECONDS: "histogram", TPOT_SECONDS: "histogram", E2E_SECONDS: "histogram",
    PROMPT_TOKENS: "counter", GENERATION_TOKENS: "counter", REQUESTS: "counter",
    REQUESTS_RUNNING: "gauge", REQUESTS_WAITING: "gauge", KV_CACHE_USAGE: "gauge", FULL_LAYERS: "gauge",
    LAYERS: "gauge", PATTERN_VERSION: "gauge", INDEXER_FLOPS: "counter", INDEXER_FLOPS_SKIPPED: "counter",
    GPU_HOURLY_USD: "gauge", COST_USD: "counter", COST_SAVED_USD: "counter",
    HTTP_RESPONSES: "counter", REQUESTS_REJECTED: "counter", QUEUE_TIME_SECONDS: "histogram",
    PREFILL_TIME_SECONDS: "histogram", DECODE_TIME_SECONDS: "histogram", REQUEST_PROMPT_TOKENS: "histogram",
    REQUEST_GENERATION_TOKENS: "histogram", PREFIX_CACHE_HITS: "counter", PREFIX_CACHE_QUERIES: "counter",
    PREEMPTIONS: "counter",
}

OPERATOR_LABELS = ("namespace", "name")
OPERATOR_METRICS = {
    "indexcache_operator_reconciles_total": "counter",
    "indexcache_operator_reconcile_errors_total": "counter",
    "indexcache_operator_reconcile_duration_seconds": "histogram",
    "indexcache_operator_condition": "gauge",
    "indexcache_operator_replicas": "gauge",
    "indexcache_operator_ready_replicas": "gauge",
    "indexcache_operator_full_layers": "gauge",
    "indexcache_operator_recalibrations_total": "counter",
    "indexcache_operator_gate_decisions_total": "counter",
    "indexcache_operator_recalibration_loss_delta": "gauge",
    "indexcache_operator_errors_total": "counter",       # failures outside a reconcile, by source
    "indexcache_operator_active": "gauge",               # 1 on the replica that holds the peering lease
}
