"""Checkpoints of a training run (atomic, single-process or FSDP2-sharded) and the RNG state they carry."""
from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from elsa.errors import ElsaError

log = logging.getLogger(__name__)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class Checkpointer:
    """One checkpoint per run, written atomically: a crash or SIGKILL mid-write leaves the previous one intact.

    Single process: one file ``checkpoints/<name>.pt`` (temp file + fsync + rename). Under FSDP2 (``model``
    and ``optimizer`` given and a process group of more than one rank): a directory ``checkpoints/<name>.dcp``
    holding the sharded model and optimizer (torch.distributed.checkpoint, each rank writes its shards), one
    ``rank<r>.pt`` per rank with that rank's own state (ADMM z/u rows, RNG, step) and the signature; every rank
    writes into a temp directory that rank 0 swaps in once all ranks are done.

    With ``model``/``optimizer`` given, :meth:`save` adds their state and :meth:`load` restores them in place;
    without, the caller puts them in the state dict itself.
    """

    def __init__(self, directory: Path | None, name: str, signature: dict, model=None, optimizer=None):
        from elsa.engines import distributed as D
        self.world = D.world_size()
        self.sharded = self.world > 1
        self.model, self.optimizer = model, optimizer   # a sharded checkpoint needs both (save / load)
        self.signature = dict(signature, world_size=self.world) if self.sharded else signature
        suffix = "dcp" if self.sharded else "pt"
        self.path = Path(directory) / "checkpoints" / f"{name}.{suffix}" if directory else None

    # -- single process --------------------------------------------------------------------------------
    def _save_file(self, path: Path, payload: dict) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def _check(self, old: dict) -> None:
        if old != self.signature:
            keys = sorted(k for k in set(old) | set(self.signature) if old.get(k) != self.signature.get(k))
            diffs = ", ".join(f"{k}: {old.get(k)!r} -> {self.signature.get(k)!r}" for k in keys)
            raise ElsaError(f"resume refused: the checkpoint {self.path} was written with a different config "
                            f"({diffs}); use another output dir or delete the checkpoint")

    def _need_model(self) -> None:
        if self.sharded and (self.model is None or self.optimizer is None):
            raise ValueError("a sharded checkpoint needs the model and the optimizer")

    def save(self, state: dict) -> None:
        if self.path is None:
            return
        self._need_model()
        if self.sharded:
            return self._save_sharded(state)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"signature": self.signature, **state}
        if self.model is not None:
            payload.update(model=self.model.state_dict(), optimizer=self.optimizer.state_dict())
        self._save_file(self.path, payload)
        log.info("checkpoint saved at step %s: %s", state.get("step"), self.path)

    def load(self) -> dict | None:
        """The saved state, or None. Refuses a checkpoint written under a different configuration."""
        if self.path is None:
            return None
        self._refuse_other_layout()
        self._need_model()
        if self.sharded:
            return self._load_sharded()
        if not self.path.exists():
            return None
        state = torch.load(self.path, weights_only=False)
        self._check(state.pop("signature", {}))
        if self.model is not None:
            self.model.load_state_dict(state.pop("model"))
            self.optimizer.load_state_dict(state.pop("optimizer"))
        return state

    def remove(self) -> None:
        from elsa.engines import distributed as D
        if self.path is None:
            return
        if self.sharded:
            D.barrier()
            if D.is_main():
                for p in (self.path, self._old):
                    shutil.rmtree(p, ignore_errors=True)
            D.barrier()
        elif self.path.exists():
            self.path.unlink()

    def _refuse_other_layout(self) -> None:
        """A checkpoint of this run written by another number of processes cannot be resumed here."""
        other = self.path.with_suffix(".pt" if self.sharded else ".dcp")
        if other.exists() and not self.path.exists():
            who = "one process" if self.sharded else "2 processes or more (FSDP)"
            if not self.sharded and (other / "rank0.pt").exists():
                n = len(list(other.glob("rank*.pt")))
                who = f"{n} processes (FSDP)"
            raise ElsaError(f"resume refused: the checkpoint {other} was written by {who}, this run has "
                            f"{self.world}; resume with the same hardware, or use another output dir or delete it")

    def recorded(self, key: str):
        """``stats[key]`` as the checkpoint holds it (None: no checkpoint, another config, or not recorded), read
        without loading the weights (memory-mapped; under FSDP rank 0's small state file), so a decision taken
        when the run started (bf16 or not) can be followed before the model and optimizer are set up."""
        if self.path is None:
            return None
        path = (self.path / "rank0.pt") if self.sharded else self.path
        if not path.exists():
            return None
        try:
            state = torch.load(path, weights_only=False, mmap=not self.sharded)
        except Exception:  # noqa: BLE001 - an unreadable file is load()'s to refuse
            return None
        if state.get("signature") != self.signature:
            return None
        return (state.get("stats") or {}).get(key)

    # -- FSDP2: torch.distributed.checkpoint --------------------------------------------------------------
    @property
    def _tmp(self) -> Path:
        return self.path.with_name(f".{self.path.name}.tmp")

    @property
    def _old(self) -> Path:
        return self.path.with_name(f".{self.path.name}.old")

    def _save_sharded(self, state: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from elsa.engines import distributed as D
        if D.is_main():
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp.mkdir(parents=True)
        D.barrier()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(self._tmp))
        self._save_file(self._tmp / f"rank{D.rank()}.pt", {"signature": self.signature, **state})
        D.barrier()
        if D.is_main():  # swap: final -> old, tmp -> final, drop old (a crash in between keeps old or final)
            shutil.rmtree(self._old, ignore_errors=True)
            if self.path.exists():
                os.replace(self.path, self._old)
            os.replace(self._tmp, self.path)
            shutil.rmtree(self._old, ignore_errors=True)
            log.info("checkpoint saved at step %s: %s (%d ranks)", state.get("step"), self.path, self.world)
        D.barrier()

    def _load_sharded(self) -> dict | None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from elsa.engines import distributed as D
        where = self.path if self.path.exists() else self._old if self._old.exists() else None
        found = torch.tensor([where is not None], dtype=torch.int64)
        torch.distributed.all_reduce(found)
        if int(found) != self.world:     # every rank must see it (one shared output dir)
            return None
        mine = where / f"rank{D.rank()}.pt"
        if not mine.exists():
            raise ElsaError(f"resume refused: {where} has no state for rank {D.rank()} (written by "
                            f"another number of processes?); use another output dir or delete the checkpoint")
        state = torch.load(mine, weights_only=False)
        self._check(state.pop("signature", {}))
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        sharded = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(sharded, checkpoint_id=str(where))
        set_state_dict(self.model, self.optimizer, model_state_dict=sharded["model"],
                       optim_state_dict=sharded["optimizer"])
        return state
