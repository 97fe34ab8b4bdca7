"""One run read top to bottom, its spec, its plan of time and memory, sweeps and tracking."""
