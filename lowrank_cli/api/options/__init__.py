"""The options of every job, one dataclass each: the library's arguments, and through their field metadata
(`fields.option`) the command's flags and the recipe keys. These modules import nothing heavy, so the CLI
can build every command from them for `lowrank --help`."""
