"""Offline tools, run as CLI commands or Jobs, never inside a replica: calibration (greedy F/S layer
search), training-aware distillation, indexer training and evaluation, SmolLM2 conversion, text corpora."""
