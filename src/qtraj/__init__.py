"""qtraj: post-training quantization robustness along LLM training trajectories."""

__version__ = "0.1.0"
