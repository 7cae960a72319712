"""Factorized-checkpoint format (lowrank format version 1) and its loaders.

* ``lowrank_modeling``: ``LowRankLinear``, ``factorize_modules`` and ``make_lowrank_class``. Self-contained
  (torch + transformers only): its text is also the ``modeling_lowrank.py`` written into every factorized
  checkpoint, so those load with ``trust_remote_code=True`` on machines without lowrank_cli.
* ``export``: ``write_modeling_file``, ``lowrank_config``, ``is_factorized`` / ``ranks_of``, ``load_model``
  (loads factorized and ordinary checkpoints without remote code) and ``dense_weight``.

Nothing is imported here, so importing the package stays cheap.
"""
