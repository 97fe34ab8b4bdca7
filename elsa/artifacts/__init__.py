"""The saved pruned model: the compressed format, the sparse kernels that read it, generation."""
