"""Loading a causal LM and finding its structure from its modules."""
