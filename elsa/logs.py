"""Logging set-up shared by the entry points (run.py's pipeline, python -m elsa.generate)."""
import logging


def quiet_third_party_logs() -> None:
    """transformers imports torchao when it is installed; its CUDA-kernel probes are noise on a CPU run."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
