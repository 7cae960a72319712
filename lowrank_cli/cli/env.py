"""`lowrank env`: help text and examples.
Its flags are generated from the job's options dataclass
(`lowrank_cli/api/options/`, see `cli/commands.py`)."""

EPILOG = """\
[bold]Examples[/bold]

  lowrank env
  lowrank env --json > env.json     # attach to a bug report
"""

HELP = """Print versions (lowrank, Python, torch with CUDA, transformers, peft, accelerate) and devices.
"""
