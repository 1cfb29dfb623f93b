"""IndexCache: DeepSeek Sparse Attention models with cross-layer index sharing, served on Ray Serve."""

__version__ = "0.1.0"
