"""sllm: serverless functions for large language models (shared contracts and the CLI)."""

__version__ = "0.1.0"
