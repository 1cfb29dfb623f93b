"""Online serving: the Ray Serve app (`app.py`, OpenAI-compatible), Prometheus metrics, and the opt-in
traffic sampler with the sample file format calibration reads. Importing this package imports no Ray;
`app.py` does."""
