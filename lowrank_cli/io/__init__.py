"""Checkpoint I/O: resolve a model, read config and safetensors lazily, write shards and output folders."""
