"""Targets, allocation and masks: what to prune and to what ratio."""
