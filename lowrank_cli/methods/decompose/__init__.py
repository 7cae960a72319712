"""`lowrank decompose`: factorize linear layers into two low-rank linears (LoRD / whitened SVD, plain SVD)."""
