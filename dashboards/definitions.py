"""The four IndexCache dashboards: Serving, Cost and IndexCache, Recalibration, Operator health.

Metric names come from docs/contracts.md (the build checks every query against it). Serving metrics carry
`deployment`; operator metrics carry `namespace` and `name` (the same IndexCacheDeployment name), so the
`deployment` variable filters both.
"""
from __future__ import annotations

from .grafana import Dashboard, Panel, Query, Row, Variable

RATE = "$__rate_interval"
SERVING = '{deployment=~"$deployment"}'
OPERATOR = '{namespace=~"$namespace", name=~"$deployment"}'
QUANTILES = (0.5, 0.95, 0.99)

SERVING_DEPLOYMENTS = Variable("deployment", "Deployment", "label_values(indexcache_layers, deployment)")
OPERATOR_NAMESPACES = Variable("namespace", "Namespace", "label_values(indexcache_operator_replicas, namespace)")
OPERATOR_DEPLOYMENTS = Variable("deployment", "Deployment",
                                'label_values(indexcache_operator_replicas{namespace=~"$namespace"}, name)')


def _rate(metric: str, by: str = "deployment", selector: str = SERVING) -> str:
    return f"sum by ({by}) (rate({metric}{selector}[{RATE}]))"


def _quantiles(histogram: str, by: str = "deployment", selector: str = SERVING) -> list[Query]:
    label = "{{%s}}" % by.split(",")[0].strip()
    return [Query(f"histogram_quantile({q}, sum by ({by}, le) (rate({histogram}_bucket{selector}[{RATE}])))",
                  f"{label} p{int(q * 100)}") for q in QUANTILES]


def _tokens_per_second() -> str:
    return (f"{_rate('indexcache_prompt_tokens_total')} + {_rate('indexcache_generation_tokens_total')}")


SERVING_DASHBOARD = Dashboard(
    uid="indexcache-serving",
    title="IndexCache / Serving",
    description="Latency, throughput, queue and KV cache of IndexCache serving replicas (Ray Serve).",
    variables=[SERVING_DEPLOYMENTS],
    rows=[
        Row("Overview", [
            Panel("Requests per second", [Query(_rate("indexcache_requests_total"), "{{deployment}}")],
                  unit="reqps", kind="stat", width=6, height=4),
            Panel("Generated tokens per second", [Query(_rate("indexcache_generation_tokens_total"), "{{deployment}}")],
                  unit="short", kind="stat", width=6, height=4),
            Panel("TTFT p95", [Query(
                f"histogram_quantile(0.95, sum by (deployment, le) (rate(indexcache_time_to_first_token_seconds_bucket{SERVING}[{RATE}])))",
                "{{deployment}}")], unit="s", kind="stat", width=6, height=4),
            Panel("Error ratio", [Query(
                # `or ... * 0`: a replica that never failed has no error series yet; show 0 %, not "No data".
                f'(sum by (deployment) (rate(indexcache_requests_total{{deployment=~"$deployment", finish_reason=~"error|abort"}}[{RATE}]))'
                f" or 0 * {_rate('indexcache_requests_total')}) / {_rate('indexcache_requests_total')}", "{{deployment}}")],
                unit="percentunit", kind="stat", width=6, height=4,
                description="Share of finished requests that ended in error or abort."),
        ]),
        Row("Latency", [
            Panel("Time to first token", _quantiles("indexcache_time_to_first_token_seconds"), unit="s", width=8,
                  description="Request arrival to first streamed token; prefill dominates, so this is where IndexCache helps most."),
            Panel("Time per output token", _quantiles("indexcache_time_per_output_token_seconds"), unit="s", width=8,
                  description="Mean inter-token time per request after the first token (decode speed)."),
            Panel("End-to-end latency", _quantiles("indexcache_e2e_request_latency_seconds"), unit="s", width=8),
        ]),
        Row("Throughput", [
            Panel("Tokens per second", [
                Query(_rate("indexcache_prompt_tokens_total"), "{{deployment}} prompt"),
                Query(_rate("indexcache_generation_tokens_total"), "{{deployment}} generated"),
            ], unit="short"),
            Panel("Finished requests per second", [
                Query(_rate("indexcache_requests_total", by="deployment, finish_reason"), "{{deployment}} {{finish_reason}}"),
            ], unit="reqps"),
        ]),
        Row("HTTP and rejected requests", [
            Panel("HTTP responses by status code", [
                Query(_rate("indexcache_http_responses_total", by="deployment, code"), "{{deployment}} {{code}}"),
            ], unit="reqps", description="API responses per second by status: 4xx are the clients' to fix, 5xx ours, "
                                         "503 while a replica loads its model."),
            Panel("Rejected requests by reason", [
                Query(_rate("indexcache_requests_rejected_total", by="deployment, reason"), "{{deployment}} {{reason}}"),
            ], unit="reqps", description="Refused before generating: too_many_requests (429, at the app-wide limit: "
                                         "scale out), invalid_request and context_length (400), unauthorized, "
                                         "model_not_found, not_ready (503 while loading)."),
        ]),
        Row("Request phases and lengths", [
            Panel("Queue time", _quantiles("indexcache_request_queue_time_seconds"), unit="s", width=8,
                  description="Arrival to admission into the running batch; grows when every KV cache slot is busy."),
            Panel("Prefill time", _quantiles("indexcache_request_prefill_time_seconds"), unit="s", width=8,
                  description="Admission to the first token: the prompt's prefill, where the indexer costs most."),
            Panel("Decode time", _quantiles("indexcache_request_decode_time_seconds"), unit="s", width=8,
                  description="First token to the end of the request."),
            Panel("Prompt length", _quantiles("indexcache_request_prompt_tokens"), unit="short",
                  description="Tokens per accepted prompt."),
            Panel("Generation length", _quantiles("indexcache_request_generation_tokens"), unit="short",
                  description="Tokens generated per finished request, as its usage reports them."),
        ]),
        Row("Queue and KV cache", [
            Panel("Requests running and waiting", [
                Query(f"sum by (deployment) (indexcache_requests_running{SERVING})", "{{deployment}} running"),
                Query(f"sum by (deployment) (indexcache_requests_waiting{SERVING})", "{{deployment}} waiting"),
            ], unit="short", description="Waiting requests that keep growing mean the replicas are saturated: scale out."),
            Panel("KV cache usage", [
                Query(f"max by (deployment) (indexcache_kv_cache_usage_ratio{SERVING})", "{{deployment}} max replica"),
                Query(f"avg by (deployment) (indexcache_kv_cache_usage_ratio{SERVING})", "{{deployment}} mean"),
            ], unit="percentunit",
                description="Paged pool: blocks held by requests / pool blocks (cached prefix blocks nobody holds count as free)."),
            Panel("Prefix cache hit rate", [Query(
                f"{_rate('indexcache_prefix_cache_hits_total')} / {_rate('indexcache_prefix_cache_queries_total')}",
                "{{deployment}}")], unit="percentunit",
                description="Share of prompt tokens whose KV was reused from cached prefix blocks (system prompts, "
                            "chat history) instead of prefilled."),
            Panel("Preemptions per second", [Query(_rate("indexcache_num_preemptions_total"), "{{deployment}}")],
                  unit="short",
                  description="Requests preempted because decode ran out of KV blocks; they are recomputed later. "
                              "Sustained preemptions: the pool is too small for the load (raise "
                              "--gpu-memory-utilization or scale out)."),
        ]),
    ],
)

COST_DASHBOARD = Dashboard(
    uid="indexcache-cost",
    title="IndexCache / Cost and IndexCache",
    description="What serving costs per million tokens, what IndexCache saves, and how many indexers still run.",
    variables=[SERVING_DEPLOYMENTS],
    rows=[
        Row("Cost", [
            Panel("Cost per million tokens", [Query(
                f"1e6 * {_rate('indexcache_cost_usd_total')} / ({_tokens_per_second()})", "{{deployment}}")],
                unit="currencyUSD", decimals=3,
                description="Replica busy time x GPU hourly price, per million prompt + generated tokens."),
            Panel("Spend and savings per hour", [
                Query(f"3600 * {_rate('indexcache_cost_usd_total')}", "{{deployment}} spend"),
                Query(f"3600 * {_rate('indexcache_cost_saved_usd_total')}", "{{deployment}} saved by IndexCache"),
            ], unit="currencyUSD", decimals=2),
            Panel("Money saved by IndexCache (time range)", [Query(
                f"sum by (deployment) (increase(indexcache_cost_saved_usd_total{SERVING}[$__range]))", "{{deployment}}")],
                unit="currencyUSD", kind="stat", width=8, height=5, decimals=2),
            Panel("Spend (time range)", [Query(
                f"sum by (deployment) (increase(indexcache_cost_usd_total{SERVING}[$__range]))", "{{deployment}}")],
                unit="currencyUSD", kind="stat", width=8, height=5, decimals=2),
            Panel("Savings share", [Query(
                f"{_rate('indexcache_cost_saved_usd_total')} / ({_rate('indexcache_cost_usd_total')} + "
                f"{_rate('indexcache_cost_saved_usd_total')})", "{{deployment}}")],
                unit="percentunit", kind="stat", width=8, height=5,
                description="Saved / (spent + saved): the share of the all-F cost that IndexCache avoids."),
        ]),
        Row("IndexCache", [
            Panel("F layers active", [
                Query(f"max by (deployment) (indexcache_full_layers{SERVING})", "{{deployment}} F layers"),
                Query(f"max by (deployment) (indexcache_layers{SERVING})", "{{deployment}} layers"),
            ], unit="short", width=8,
                description="Layers that still run their indexer (F) out of all layers; the rest reuse top-k indices."),
            Panel("Indexer FLOPs skipped", [Query(
                f"{_rate('indexcache_indexer_flops_skipped_total')} / ({_rate('indexcache_indexer_flops_total')} + "
                f"{_rate('indexcache_indexer_flops_skipped_total')})", "{{deployment}}")],
                unit="percentunit", width=8),
            Panel("Indexer FLOP/s computed and skipped", [
                Query(_rate("indexcache_indexer_flops_total"), "{{deployment}} computed"),
                Query(_rate("indexcache_indexer_flops_skipped_total"), "{{deployment}} skipped"),
            ], unit="short", width=8),
            Panel("GPU price per replica-hour", [Query(
                f"max by (deployment) (indexcache_gpu_hourly_usd{SERVING})", "{{deployment}}")],
                unit="currencyUSD", kind="stat", width=8, height=4),
            Panel("Active pattern version", [Query(
                f"max by (deployment) (indexcache_pattern_version{SERVING})", "{{deployment}}")],
                unit="none", kind="stat", width=8, height=4),
            Panel("Fraction of indexers kept", [Query(
                f"max by (deployment) (indexcache_full_layers{SERVING}) / max by (deployment) (indexcache_layers{SERVING})",
                "{{deployment}}")], unit="percentunit", kind="stat", width=8, height=4),
        ]),
    ],
)

RECALIBRATION_DASHBOARD = Dashboard(
    uid="indexcache-recalibration",
    title="IndexCache / Recalibration",
    description="Recalibration runs, their loss deltas, the quality gate's decisions and the pattern in use.",
    variables=[OPERATOR_NAMESPACES, OPERATOR_DEPLOYMENTS],
    rows=[
        Row("Runs", [
            Panel("Recalibrations (time range)", [Query(
                f"sum by (name, result) (increase(indexcache_operator_recalibrations_total{OPERATOR}[$__range]))",
                "{{name}} {{result}}")], unit="short", kind="stat", width=8, height=5),
            Panel("Gate decisions (time range)", [Query(
                f"sum by (name, decision) (increase(indexcache_operator_gate_decisions_total{OPERATOR}[$__range]))",
                "{{name}} {{decision}}")], unit="short", kind="stat", width=8, height=5),
            Panel("Last loss delta vs all-F", [Query(
                f"max by (name) (indexcache_operator_recalibration_loss_delta{OPERATOR})", "{{name}}")],
                unit="none", kind="stat", width=8, height=5, decimals=4,
                description="Calibrated LM loss minus all-F loss (nats/token); the gate applies a pattern when this is within maxLossDelta."),
            Panel("Recalibrations finished", [Query(
                f"sum by (name, result) (indexcache_operator_recalibrations_total{OPERATOR})", "{{name}} {{result}}")],
                unit="short", description="Cumulative count; each step up is a finished recalibration Job."),
            Panel("Loss delta history", [Query(
                f"max by (name) (indexcache_operator_recalibration_loss_delta{OPERATOR})", "{{name}}")], unit="none"),
        ]),
        Row("Pattern", [
            Panel("F layers in the applied pattern", [Query(
                f"max by (name) (indexcache_operator_full_layers{OPERATOR})", "{{name}}")], unit="short", width=8),
            Panel("Pattern version served", [Query(
                'max by (deployment) (indexcache_pattern_version{deployment=~"$deployment"})', "{{deployment}}")],
                unit="none", width=8, description="Version of the pattern the serving replicas report (user_config)."),
            Panel("Calibrated condition", [Query(
                f'max by (name) (indexcache_operator_condition{{namespace=~"$namespace", name=~"$deployment", '
                f'condition="Calibrated", status="True"}})', "{{name}}")], unit="bool", width=8),
        ]),
    ],
)

OPERATOR_DASHBOARD = Dashboard(
    uid="indexcache-operator",
    title="IndexCache / Operator health",
    description="The kopf operator: reconcile rate, errors, durations, conditions and replicas per IndexCacheDeployment.",
    variables=[OPERATOR_NAMESPACES, OPERATOR_DEPLOYMENTS],
    rows=[
        Row("Operator", [
            Panel("Operator up", [Query('sum(up{job="indexcache-operator"})', "operators up")],
                  unit="short", kind="stat", width=6, height=4,
                  description="Scrape targets of the operator that answered (job label from the chart's ServiceMonitor)."),
            Panel("Reconcile errors (time range)", [Query(
                f"sum(increase(indexcache_operator_reconcile_errors_total{OPERATOR}[$__range]))", "errors")],
                unit="short", kind="stat", width=6, height=4),
            Panel("Deployments Ready", [Query(
                f'sum(indexcache_operator_condition{{namespace=~"$namespace", name=~"$deployment", condition="Ready", status="True"}})',
                "ready")], unit="short", kind="stat", width=6, height=4),
            Panel("Deployments Degraded", [Query(
                f'sum(indexcache_operator_condition{{namespace=~"$namespace", name=~"$deployment", condition="Degraded", status="True"}})',
                "degraded")], unit="short", kind="stat", width=6, height=4),
        ]),
        Row("Reconciles", [
            Panel("Reconciles per second", [Query(
                _rate("indexcache_operator_reconciles_total", by="name, result", selector=OPERATOR), "{{name}} {{result}}")],
                unit="ops", width=8),
            Panel("Reconcile errors per second", [Query(
                _rate("indexcache_operator_reconcile_errors_total", by="name, reason", selector=OPERATOR), "{{name}} {{reason}}")],
                unit="ops", width=8),
            Panel("Reconcile duration", _quantiles("indexcache_operator_reconcile_duration_seconds", by="name",
                                                   selector=OPERATOR), unit="s", width=8),
        ]),
        Row("Operator process", [
            Panel("Active operator replicas", [Query("sum(indexcache_operator_active)", "active")],
                  unit="short", kind="stat", width=6, height=8,
                  description="Replicas doing the work: 1 expected. With several replicas (kopf peering) the "
                              "others stand by at 0 and one takes over when the active one goes."),
            Panel("Operator errors per second", [Query(
                f"sum by (source, reason) (rate(indexcache_operator_errors_total[{RATE}]))", "{{source}} {{reason}}")],
                unit="ops", width=18,
                description="Errors outside one resource's reconcile: the periodic resync (ApiUnreachable: the API "
                            "server could not be reached), deletion cleanup, event handlers. /healthz fails when "
                            "the resync has not succeeded for a while."),
        ]),
        Row("Resources", [
            Panel("Replicas desired and ready", [
                Query(f"max by (name) (indexcache_operator_replicas{OPERATOR})", "{{name}} desired"),
                Query(f"max by (name) (indexcache_operator_ready_replicas{OPERATOR})", "{{name}} ready"),
            ], unit="short"),
            Panel("Conditions", [Query(
                f'max by (name, condition) (indexcache_operator_condition{{namespace=~"$namespace", name=~"$deployment", status="True"}})',
                "{{name}} {{condition}}")], unit="bool"),
        ]),
    ],
)

DASHBOARDS = (SERVING_DASHBOARD, COST_DASHBOARD, RECALIBRATION_DASHBOARD, OPERATOR_DASHBOARD)
