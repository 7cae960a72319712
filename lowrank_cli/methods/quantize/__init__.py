"""GPTQ weight quantization: the grid, the solver, and the GPTQ checkpoint packing."""
