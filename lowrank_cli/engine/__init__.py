"""The streaming block engine: a model skeleton on the meta device, one decoder block materialized at a time."""
