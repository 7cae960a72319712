"""Target selection lives in `lowrank_cli.engine.targets` (shared by every job); re-exported here."""

from lowrank_cli.engine.targets import Target, by_block, matches, parse_patterns, select_targets

_matches = matches  # the name methods/finetune/targets.py imports

__all__ = ["Target", "select_targets", "parse_patterns", "by_block", "matches"]
