"""Quality measurement: perplexity over token windows, full-model or streamed block by block."""
