"""The `sllm` command line."""
