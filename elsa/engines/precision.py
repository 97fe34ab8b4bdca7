"""Whether bf16 autocast makes training faster on the device it runs on (``method.autocast_bf16=auto``).

On CUDA: where the GPU supports bf16. On a CPU: a short measurement, the same matmul in fp32 and under bf16
autocast (AMX / AVX-512 bf16 run it several times faster; a CPU without them emulates bf16 and runs it slower);
bf16 is used when it is at least ``MIN_SPEEDUP`` faster. The result is cached per device and thread count for
the process and recorded in results.json, so a table says which precision a training row used.
"""
from __future__ import annotations

import os
import time

import torch

from elsa.methods.registry import Choice

MIN_SPEEDUP = 1.3
_CACHE: dict = {}


AUTOCAST = Choice((True, False, "auto"), "auto (bf16 where this device runs it faster), true or false")


def check_setting(value):
    AUTOCAST.check("method.autocast_bf16", value)
    return value


def _rate(device: torch.device, bf16: bool, n: int = 512, k: int = 1024, reps: int = 6) -> float:
    gen = torch.Generator(device=device).manual_seed(0)   # its own generator: the run's random stream is untouched
    a = torch.randn(n, k, device=device, generator=gen)
    b = torch.randn(k, k, device=device, generator=gen)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        a @ b   # warm-up: the kernels' first call
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t)
    return 2 * n * k * k / best / 1e9


def bf16_speedup(device) -> float:
    """bf16-autocast over fp32 matmul GFLOP/s on ``device`` at the current thread count, measured once per machine
    (cached in the process and on disk under the elsa cache dir), so that every process on a machine, a resumed
    run included, makes the same decision."""
    import json

    from elsa.assets import cache_dir
    from elsa.machine import cpu_id

    device = torch.device(device)
    key = (device.type, torch.get_num_threads())
    if key not in _CACHE:
        path = cache_dir() / "precision" / f"{device.type}-{key[1]}threads-{cpu_id()}.json"
        if path.exists():
            _CACHE[key] = float(json.loads(path.read_text())["bf16_matmul_speedup"])
        else:
            _CACHE[key] = _rate(device, True) / _rate(device, False)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"bf16_matmul_speedup": _CACHE[key]}))
            tmp.replace(path)
    return _CACHE[key]


def resolve(setting, device, recorded: dict | None = None) -> tuple[bool, dict]:
    """(use bf16 autocast, the record for results.json) for ``method.autocast_bf16`` = auto / true / false.

    ``recorded``: the record of the checkpoint this run resumes; under ``auto`` its decision is kept, so one run
    does not change precision halfway because the machine it resumed on measures otherwise. Under FSDP rank 0
    decides for every rank (each rank measuring for itself could disagree)."""
    device = torch.device(device)
    if setting != "auto":
        return bool(setting), {"setting": setting, "used": bool(setting)}
    if recorded is not None and recorded.get("setting") == "auto" and "used" in recorded:
        kept = {k: v for k, v in recorded.items() if k != "fast_path"}
        return bool(recorded["used"]), dict(kept, rule=f"{recorded.get('rule', 'auto')}; kept from the checkpoint")
    used, record = _decide(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        box = [(used, record)]
        torch.distributed.broadcast_object_list(box, src=0)
        used, record = box[0]
    return used, record


def _decide(device: torch.device) -> tuple[bool, dict]:
    if device.type == "cuda":
        used = torch.cuda.is_bf16_supported()
        return used, {"setting": "auto", "used": used, "rule": "CUDA device supports bf16"}
    speedup = bf16_speedup(device)
    used = speedup >= MIN_SPEEDUP
    return used, {"setting": "auto", "used": used, "bf16_matmul_speedup": round(speedup, 3),
                  "rule": f"bf16 when its matmul is >= {MIN_SPEEDUP}x fp32 here"}


@torch.no_grad()
def bf16_linear_weights(model: torch.nn.Module) -> None:
    """Store a frozen model's Linear weights (and biases) in bf16, as autocast would cast them on every forward:
    the same values under autocast, cast once. A weight shared with a non-Linear module (a tied embedding) gets a
    bf16 copy of its own in the Linear; the other module keeps the fp32 tensor."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.weight = torch.nn.Parameter(mod.weight.detach().to(torch.bfloat16), requires_grad=False)
            if mod.bias is not None:
                mod.bias = torch.nn.Parameter(mod.bias.detach().to(torch.bfloat16), requires_grad=False)
