"""The `lowrank` command line: thin Typer commands over `lowrank_cli.api` (no tensors here)."""
