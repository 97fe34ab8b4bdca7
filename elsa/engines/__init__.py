"""The two engines every method runs in (layer-wise, training) and what training needs."""
