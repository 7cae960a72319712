"""The one training loop (accelerate) that finetune and trp-train share, and its training data."""
