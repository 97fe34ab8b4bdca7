"""Methods declare themselves (elsa.methods.registry): the registry matches conf/, the declared keys check their
values, and a method defined here (a toy) runs through the CLI, a sweep and the report with one conf file written
to a temp config dir, touching nothing else in the repository.

The toy's class lives at this module's top level so that Hydra can import it (``_target_: test_registry.Toy``)
in the CLI's process; this module imports nothing from conftest at its top for the same reason.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from elsa.errors import ElsaError
from elsa.methods import registry
from elsa.methods.base import Annotated, Choice, Number, PruneContext, Pruner

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"


class Toy(Pruner, name="toy", position=99):
    """A toy one-shot method: prune the smallest |w|^power (the tests' method; not a built-in)."""

    def __init__(self, power: Annotated[float, Number(gt=0)] = 1.0, group: Annotated[str, Choice(("row", "layer"))]
                 = "row"):
        self.power, self.group = float(power), group

    @torch.no_grad()
    def prune(self, ctx: PruneContext) -> dict:
        for wid, w in ctx.plan.weights.items():      # each weight to its target(s) in the run's plan
            w.param.mul_(ctx.plan.mask(wid, w.param.abs().float().pow(self.power), self.group))
        return {"power": self.power}


TOY_YAML = """# a toy method (tests/test_registry.py): |w|^power, compared within each row
_target_: test_registry.Toy
name: toy
power: 1.0
group: row
"""


def builtin() -> dict[str, type]:
    """The registered methods that elsa itself defines (a test session may have registered the toy too)."""
    return {n: c for n, c in registry.methods().items() if c.__module__.startswith("elsa.")}


def test_every_conf_method_file_is_a_registered_name_of_its_class():
    from hydra.utils import get_class

    files = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
    assert sorted(builtin()) == files and len(files) == 17
    for name in files:
        target = OmegaConf.load(CONF / "method" / f"{name}.yaml").get("_target_")
        cls = registry.get(name)
        assert name in cls.names and (target is None or get_class(target) is cls), name
    assert registry.get("ast_boosted") is registry.get("ast") and registry.get("nope") is None


def _raw_keys(name: str) -> dict:
    """The keys a conf/method file sets itself (not those it takes from the file its defaults name)."""
    node = OmegaConf.to_container(OmegaConf.load(CONF / "method" / f"{name}.yaml"))
    return {k: v for k, v in node.items() if k not in ("_target_", "name", "defaults")}


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "method").glob("*.yaml")))
def test_conf_file_and_class_declare_the_same_defaults(name):
    """A key a conf/method file sets is a declared key of its class with the same default, except the keys a
    variant (ast_boosted) sets on purpose; every declared default passes its own rule."""
    cls = registry.get(name)
    keys = registry.declared(cls)
    for key, value in _raw_keys(name).items():
        assert key in keys, (name, key)
        rule, default = keys[key]
        if name == cls.name:
            assert value == (list(default) if isinstance(default, tuple) else default), (name, key, value, default)
        if rule is not None:
            assert rule.ok(value), (name, key, value)
    for key, (rule, default) in keys.items():
        assert default is not inspect.Parameter.empty, (name, key)
        assert rule is not None, (name, key)       # every key of a method is typed
        assert rule.ok(default), (name, key, default)


def test_flags_follow_the_family_and_the_conf_files_follow_the_flags():
    training = [n for n, c in builtin().items() if c.family is registry.TRAINING]
    assert training == ["ast", "ast_boosted", "maskllm", "leap", "elsa", "elsa_l"]
    assert [n for n in registry.names("supports_fsdp") if n in builtin()] == training
    assert [n for n in registry.names("takes_start") if n in builtin()] == training
    budget = [n for n in registry.names("has_budget") if n in builtin()]
    assert budget == ["safe", *training]                  # SAFE: layer-wise, with epochs
    for part in ("cpu", "quick", "demo"):
        assert sorted(p.stem for p in (CONF / "method_budget" / part).glob("*.yaml")) == sorted(budget), part
    starts = [n for n in registry.names("start_eligible") if n in builtin()]
    assert sorted(p.stem for p in (CONF / "start").glob("*.yaml")) == sorted(["dense", *starts])
    assert "oats" not in starts and "wanda" in starts     # OATS's low-rank branches: no start
    layerwise = [n for n, c in builtin().items() if c.family is registry.LAYER_WISE]
    assert [n for n in registry.names("needs_calibration") if n in builtin()] == layerwise
    assert list(builtin())[:3] == ["dense", "magnitude", "wanda"]


@pytest.mark.parametrize("overrides,message", [
    (["method=wanda", "method.group=col"], "method.group=col is not allowed: one of row, layer, column"),
    (["method=sparsegpt", "method.blocksize=abc"], "method.blocksize=abc is not allowed: a whole number > 0 "
                                                   "(the paper: 128)"),
    (["method=oats", "method.rank_ratio=1.5"], "method.rank_ratio=1.5 is not allowed: a number in [0, 1) "
                                               "(the paper: 0.25)"),
    (["method=elsa", "method.steps=0"], "method.steps=0 is not allowed: a whole number > 0"),
    (["method=elsa", "method.resume=maybe"], "method.resume=maybe is not allowed: true or false"),
    (["method=leap", "method.gumbel_scale=[1]"], "method.gumbel_scale=[1] is not allowed: [start, end], two "
                                                 "numbers > 0 (linear from the first step to the last)"),
    (["method=alps", "method.rho_growth=[1.3,0.5,1.1]"], "method.rho_growth=[1.3, 0.5, 1.1] is not allowed: three "
                                                         "factors >= 1"),
    (["method=elsa_l", "method.z_dtype=fp4"], "method.z_dtype=fp4 is not allowed: one of fp32, bf16, fp8, sparse_bf16"),
    (["start=sparsegpt", "method=elsa", "start.percdamp=-1"], "start.percdamp=-1 is not allowed: a number > 0 "
                                                              "(the paper: 0.01)"),
])
def test_a_declared_key_refuses_a_bad_value_in_one_line(overrides, message):
    from conftest import compose

    from elsa.run.recipe import build

    cfg = compose(overrides)
    key = "start" if overrides[-1].startswith("start.") else "method"
    with pytest.raises(ElsaError) as exc:
        build(cfg[key], key)
    assert str(exc.value) == message


def test_fsdp_refusal_lists_the_registry_training_methods(tmp_path):
    from conftest import run_pipeline

    with pytest.raises(ElsaError) as exc:
        run_pipeline(tmp_path, "method=wanda", "hardware=fsdp_cpu")
    assert str(exc.value) == ("hardware=fsdp is not allowed: a method that trains sharded (ast, ast_boosted, maskllm, "
                              "leap, elsa, elsa_l); method=wanda is layer-wise and runs on one device")


def _cli_env(tmp_path: Path) -> dict:
    conf = tmp_path / "conf" / "method"
    conf.mkdir(parents=True)
    (conf / "toy.yaml").write_text(TOY_YAML)
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")


def _run(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_toy_method_runs_through_the_cli_a_sweep_and_the_report(tmp_path):
    """One conf file (method/toy.yaml) in a temp config dir on Hydra's search path is all the toy needs."""
    from conftest import TINY, read_results

    tracked = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    env, search = _cli_env(tmp_path), f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    run, common = str(REPO / "run.py"), [search, *TINY, "save_model=false", "hardware.threads=1"]
    bad = _run(env, run, *common, "method=toy", "method.power=-1", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == \
        "elsa: error: method.power=-1 is not allowed: a number > 0", bad.stderr[-2000:]
    assert read_results(tmp_path / "bad")["status"] == "failed"      # no record claiming done
    one = _run(env, run, *common, "method=toy", "sparsity=0.6", f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    r = read_results(tmp_path / "one")
    assert r["status"] == "done" and r["method"] == "toy" and r["method_stats"] == {"power": 1.0}
    assert abs(r["sparsity"]["measured"] - 0.6) < 0.01
    sweep = _run(env, run, "-m", *common, "method=toy,magnitude", "sparsity=0.5", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    rep = _run(env, "-m", "elsa.report", str(tmp_path / "sweep"))
    assert rep.returncode == 0, rep.stderr[-3000:]
    rows = [line for line in rep.stdout.splitlines() if "| toy |" in line or "| magnitude |" in line]
    assert len(rows) >= 2 and "| magnitude |" in rows[0], rep.stdout   # a method the report's process does not
    assert any("| toy |" in row and "| done |" in row for row in rows)    # know is listed after the known ones
    assert subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                          text=True).stdout == tracked


def test_rule_messages_and_a_name_taken_twice():
    from elsa.methods.registry import Flag, Numbers

    assert Number(ge=0, lt=1, paper="0.25").allowed() == "a number in [0, 1) (the paper: 0.25)"
    assert Number(gt=0, le=1, also=("auto",)).allowed() == "a number in (0, 1] or auto"
    assert Number(ge=0, whole=True, note="(0: no refinement)").allowed() == "a whole number >= 0 (0: no refinement)"
    assert Number(gt=0, also=(None,)).allowed() == "a number > 0 or null"
    assert not Number(gt=0).ok(True) and not Number(gt=0).ok(float("inf")) and not Number(whole=True).ok(2.5)
    assert Choice((None, "sparsegpt")).allowed() == "one of null, sparsegpt" and not Choice((True,)).ok(1)
    assert Flag().ok(False) and not Flag().ok("false")
    assert Numbers(2, Number(gt=0), "two").ok((1, 2.0)) and not Numbers(2, Number(gt=0), "two").ok([1])
    before = registry.get("magnitude")
    with pytest.raises(TypeError, match="two methods named magnitude"):
        class Impostor(Pruner, name="magnitude"):
            pass
    assert registry.get("magnitude") is before
