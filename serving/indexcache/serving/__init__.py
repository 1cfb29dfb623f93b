"""Online serving, as the roles of `ray.serve.llm`: `app.py` (`build_app`, the Ray Serve application the
operator deploys; local start), `ingress.py` (OpenAI-compatible HTTP routes, SSE), `server.py` (the
replica deployment that owns the engine), `protocol.py` (what crosses those boundaries),
`detokenizer.py` (streamed text and stop strings), `metrics.py` (Prometheus), `sampler.py` and
`samples.py` (opt-in traffic sampling into the file format calibration reads). Importing this package
imports no Ray; `app.py` and `ingress.py` do."""
