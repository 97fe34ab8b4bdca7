"""Pruning methods: one small class each, all behind :class:`elsa.methods.base.Pruner`."""
