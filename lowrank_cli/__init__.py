"""lowrank: make Hugging Face language models smaller and cheaper with low-rank methods.

Importing the package stays cheap (no torch): heavy imports live inside the functions that need them,
so `lowrank --help` answers quickly.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
