"""Text sources, disjoint splits and token windows for calibration, evaluation and training."""
