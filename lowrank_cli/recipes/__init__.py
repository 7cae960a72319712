"""Recipes: YAML files that chain `lowrank` commands, and `--config` for every command.

  schema.py         one strict pydantic schema per registered command, derived from its Typer signature
  layers.py         precedence in one place: defaults < recipe/--config < --set < explicit flags
  recipe.py         recipe file -> validated plan (every problem reported at once)
  execute.py        run the plan: skip complete steps, stop at a failure, save the resolved recipe
  config_option.py  `--config FILE` on every command, added where the root group is built
  shipped.py        the recipes shipped in this folder (`*.yaml`, package data)

Nothing here imports torch; pydantic and yaml are imported when a recipe or config is actually read.
"""
