"""What a run measures: perplexity, zero-shot accuracy, compute and memory."""
