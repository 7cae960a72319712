"""`lowrank decompose`: factorize linear layers into two low-rank linears (LoRD, plain SVD)."""
