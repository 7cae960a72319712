"""`compress`: candidate families across factorization and quantization, and the choice among them."""
