"""Recipes: YAML files that chain `lowrank` jobs, and the schemas `--config` checks files against.

  schema.py         one strict pydantic schema per job, generated from its options dataclass
  layers.py         precedence in one place: defaults < recipe/--config < --set < explicit flags
  recipe.py         recipe file -> validated plan (every problem reported at once)
  execute.py        run the plan through the library: skip complete steps, stop at a failure, save the
                    resolved recipe
  shipped.py        where the shipped recipes are (the repository's top-level recipes/, or the wheel's copy)

`--config FILE` itself is click machinery and lives in `lowrank_cli/cli/config_option.py`. Nothing here
imports the CLI or torch; pydantic and yaml are imported when a recipe or config is actually read.
"""
