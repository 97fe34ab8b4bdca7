"""The three choices of a run: method= (what a method is), budget= (how long it runs), start= (where it starts).

Every old method preset (tests/data/old_presets/, conf/method/ before issue 13) is reproduced by its new
spelling: the same hyperparameters key by key, and the same weights on the tiny model as the old procedure
(the preset's keys given to the method class directly; for ``init: <one-shot>`` the one-shot method's defaults
pruning the model first and the dense model kept as the teacher, as the old SparseTrainer.prune did).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import CONF, TINY, compose, run_cli, run_pipeline
from omegaconf import OmegaConf

from elsa.run.renamed import OLD_METHODS, refuse_old_spellings, spelling

OLD = Path(__file__).parent / "data" / "old_presets"
PRESETS = ["elsa_cpu", "elsa_quick", "elsa_quick_sgpt", "elsa_l_quick", "ast_cpu", "ast_quick", "safe_cpu"]
SHORT = {"elsa": ["method.steps=5"], "elsa_l": ["method.steps=5"], "ast": ["method.steps=5"], "safe": []}
DROPPED = ("init",)                             # gone: init is start=
# keys added after the presets (issue 15: ELSA's options; AST-Boosted's SLoRB and SquareHead), at the values that
# are the old behaviour: only these values are dropped from a new config before comparing (any other value would
# be a change and fail)
ADDED = {"sparsity_schedule": "cubic", "sparsity_initial": 0.0, "relaxation": 1.0, "trainable_projection": True,
         "squarehead_weight": 0.0,
         "dual_timing": "interval", "lam_scaling": "global", "eval_split": "validation"}   # issue 26
# defaults changed on purpose since the presets, as {key: {new value: the old one}}: issue 26 made bf16 autocast
# the default where the device runs it faster; the presets' fp32 step is autocast_bf16=false
CHANGED = {"autocast_bf16": {"auto": False}}


def without_added(keys: dict) -> dict:
    keys = {k: CHANGED[k].get(v, v) if k in CHANGED and isinstance(v, str) else v for k, v in keys.items()}
    return {k: v for k, v in keys.items() if not (k in ADDED and v == ADDED[k])}


def old_preset(name: str) -> dict:
    """An old preset with its defaults chain merged, as Hydra composed it."""
    node = OmegaConf.load(OLD / f"{name}.yaml")
    merged = OmegaConf.create()
    for parent in node.pop("defaults", []):
        if parent != "_self_":
            merged = OmegaConf.merge(merged, old_preset(parent))
    return OmegaConf.to_container(OmegaConf.merge(merged, node))


def new_spelling(name: str) -> list[str]:
    return spelling(*OLD_METHODS[name]).split()


@pytest.mark.parametrize("preset", PRESETS)
def test_new_spelling_has_the_old_presets_keys(preset):
    old = old_preset(preset)
    method, budget, start = OLD_METHODS[preset]
    cfg = compose(new_spelling(preset))
    new = without_added(OmegaConf.to_container(cfg.method))
    assert new.pop("budget", "paper") == budget and cfg.budget.name == budget
    assert cfg.start.name == old.get("init", "dense") == start
    assert new.pop("name") == method
    old.pop("name")
    assert without_added(new) == {k: v for k, v in old.items() if k not in DROPPED}


def _weights_via_pipeline(tmp_path: Path, overrides: list[str]) -> dict:
    from safetensors.torch import load_file

    run_pipeline(tmp_path, *overrides, "sparsity=0.7", "save_model=true", "eval.dense=false")
    return load_file(str(tmp_path / "model" / "model.safetensors"))


def _weights_the_old_way(tmp_path: Path, preset: str, short: list[str]) -> dict:
    """The old procedure from the public pieces: the preset's keys straight into its class; ``init`` run inside
    the method's prune, the dense model kept as the teacher when the loss distils."""
    from hydra.utils import get_class

    from elsa.data.corpora import sample_starts, token_stream, windows
    from elsa.engines.training import TrainEngine
    from elsa.eval.perplexity import bos_id
    from elsa.methods.base import PruneContext
    from elsa.methods.sparsegpt import SparseGPT
    from elsa.methods.wanda import Wanda
    from elsa.run.recipe import build, seed_everything
    from elsa.sparsity.patterns import Sparsity

    keys = old_preset(preset)
    init = keys.get("init", "dense")
    keys.update({o.split("=")[0].split(".", 1)[1]: int(o.split("=")[1]) for o in short})
    cls = get_class(keys.pop("_target_"))
    method = cls(**{k: v for k, v in keys.items() if k not in ("name", *DROPPED)})
    cfg = compose(TINY)
    seed_everything(cfg.seed)
    model, tok = build(cfg.model, "model").load()
    dataset = build(cfg.dataset, "dataset")
    calib = None
    if method.needs_calibration or init != "dense":
        train = token_stream(tok, dataset, "train")
        calib = windows(train, cfg.seqlen, bos_id(tok, True), sample_starts(len(train), cfg.nsamples, cfg.seqlen,
                                                                             cfg.seed))
    ctx = PruneContext(model=model, tokenizer=tok, target=Sparsity(0.7), calibration=calib, dataset=dataset,
                       seqlen=cfg.seqlen, seed=cfg.seed, output_dir=tmp_path)
    if init == "dense":
        method.prune(ctx)
    else:
        teacher = copy.deepcopy(model) if method.loss_terms.kl else None
        with torch.no_grad():
            {"wanda": Wanda, "sparsegpt": SparseGPT}[init]().prune(ctx)
        TrainEngine(method).run(ctx, teacher)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("preset", PRESETS)
def test_new_spelling_gives_the_old_presets_weights(tmp_path, preset):
    short = SHORT[OLD_METHODS[preset][0]]
    fp32 = [f"method.{k}={v}".lower() for k, change in CHANGED.items() for v in change.values()] \
        if OLD_METHODS[preset][0] != "safe" else []       # the presets' fp32 step (CHANGED)
    new = _weights_via_pipeline(tmp_path / "new", [*new_spelling(preset), *short, *fp32])
    old = _weights_the_old_way(tmp_path / "old", preset, short)
    assert new.keys() <= old.keys() and len(new) > 10
    changed = 0
    for k, v in new.items():
        assert torch.equal(v, old[k]), k
        changed += int((v == 0).float().mean() > 0.6)
    assert changed == 14          # the 14 Linears of the tiny model are pruned (so the comparison is not vacuous)


def test_old_names_error_with_the_new_spelling(tmp_path):
    proc = run_cli("method=elsa_quick", f"hydra.run.dir={tmp_path}", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "elsa: error: method=elsa_quick is now method=elsa budget=quick (method= is what a method is, budget= how "
        "long it runs, start= where it starts)")
    for args, needle in ((["-m", "method=wanda,elsa_quick_sgpt"], "is now method=elsa budget=quick start=sparsegpt"),
                         (["method.init=wanda"], "method.init=wanda is now start=wanda"),
                         (["method=safe_cpu"], "is now method=safe budget=cpu")):
        with pytest.raises(Exception, match=needle):
            refuse_old_spellings(args)
    refuse_old_spellings(["method=elsa", "budget=quick", "start=sparsegpt"])  # the new spelling passes


def test_conf_method_holds_one_file_per_method():
    from elsa.methods import registry

    files = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
    assert files == sorted(n for n, c in registry.methods().items() if c.__module__.startswith("elsa."))
    for name in files:
        assert compose([f"method={name}"]).method.name == name


def test_every_budget_has_a_part_for_every_method_with_steps():
    from elsa.run.recipe import build

    budgets = sorted(p.stem for p in (CONF / "budget").glob("*.yaml"))
    assert budgets == ["cpu", "demo", "paper", "quick"]
    for name in sorted(p.stem for p in (CONF / "method").glob("*.yaml")):
        method = build(compose([f"method={name}"]).method, "method")
        for budget in budgets:
            part = CONF / "method_budget" / budget / f"{name}.yaml"
            assert part.exists() == (method.has_budget and budget != "paper"), (name, budget)


def test_budget_without_a_part_for_the_method_is_refused(tmp_path, monkeypatch):
    from elsa.errors import ElsaError

    with pytest.raises(ElsaError, match=r"^budget=quick is not allowed: one of paper, cpu, demo, quick for method=elsa"):
        run_pipeline(tmp_path, "method=elsa", "budget=quick", "~method.budget")
    r = run_pipeline(tmp_path / "mag", "method=magnitude", "budget=quick", "start=sparsegpt", "save_model=false")
    assert r["budget"] is None and r["start"] == {"name": "dense", "skipped": "sparsegpt"}
    assert "calibration" not in r          # the skipped start drew no calibration windows


@pytest.mark.parametrize("overrides,needle", [
    (["start=sparsegpt", "start.percdamp=0"], r"^start\.percdamp=0 is not allowed"),   # the start's own key
    (["budget=nope"], None),                                                           # Hydra lists the budgets
])
def test_bad_start_or_budget_fails_before_loading(tmp_path, overrides, needle):
    from elsa.errors import ElsaError

    if needle is None:
        proc = run_cli(*TINY, "method=elsa", *overrides, f"hydra.run.dir={tmp_path}", timeout=60)
        assert proc.returncode != 0 and "Could not find 'budget/nope'" in proc.stderr
        assert "cpu" in proc.stderr and "quick" in proc.stderr
        return
    with pytest.raises(ElsaError, match=needle):
        run_pipeline(tmp_path, "method=elsa", *overrides)


def test_start_runs_before_the_method_and_the_dense_model_stays_the_teacher(tmp_path):
    r = run_pipeline(tmp_path, "method=elsa", "budget=quick", "start=wanda", "method.steps=3", "method.finetune_fraction=0",
                     "method.eval_initial=true", "save_model=false")
    start = r["start"]
    assert start["name"] == "wanda" and start["time_s"] > 0 and "start" in r["time_s"]
    assert start["perplexity"]["wiki"] > r["dense_perplexity"]["wiki"]
    assert r["calibration"]["nsamples"] == 4
    assert "initial_projection_perplexity" not in r["method_stats"]
    assert r["method_stats"]["history"][0]["mask_iou_init"] > 0.5   # z0 is the start's support


def test_training_engine_imports_no_method():
    import ast as pyast

    for path in ("elsa/engines/training.py", "elsa/methods/training_method.py"):
        src = (Path(__file__).parent.parent / path).read_text()
        imported = {n.module for n in pyast.walk(pyast.parse(src)) if isinstance(n, pyast.ImportFrom)}
        imported |= {a.name for n in pyast.walk(pyast.parse(src)) if isinstance(n, pyast.Import) for a in n.names}
        concrete = {m for m in imported if m.startswith("elsa.methods.") and m not in (
            "elsa.methods.base", "elsa.methods.training_method", "elsa.methods.registry")}   # the registry: no method
        assert not concrete, (path, concrete)


def test_one_budget_and_one_start_for_several_methods(tmp_path):
    """The issue's acceptance grid on the tiny model: three training methods x two sparsities at budget=quick
    from SparseGPT's solution (steps cut to 2 for speed), and a report with six rows labelled from the choices."""
    from elsa.report import tables as report
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "method=elsa,elsa_l,ast", "budget=quick", "start=sparsegpt", "sparsity=0.7,0.9", *TINY,
                   "++method.steps=2", "save_model=false", "hardware.threads=1", f"hydra.sweep.dir={sweep}",
                   timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = report.collect(sweep)
    assert len(df) == 6 and set(df["status"]) == {"done"}
    # ++method.steps=2 is a command-line method key: the labels name it, and the tokens trained on (2 x 128)
    assert df["method"].tolist() == [f"{m} (from sparsegpt, quick, steps=2) [256 tokens]"
                                     for m in ("ast", "elsa", "elsa_l") for _ in (0.7, 0.9)]
    assert df["sparsity"].tolist() == ["0.7", "0.9"] * 3
    # per-row top-k (AST) on the tiny model's 64-wide rows rounds 0.7 x 64 up to 45
    assert all(abs(m - float(s)) < 1e-2 for m, s in zip(df["measured_sparsity"], df["sparsity"]))
    md = report.markdown(df)
    assert md.count("(from sparsegpt, quick, steps=2) [256 tokens] |") >= 6


# the grids as they were written with preset names (conf/experiment/ at 88f3a7c)
OLD_GRIDS = {
    "field": "magnitude,wanda,sparsegpt,alps,ladmm,sparsellm,safe_cpu,ast_quick,elsa_quick,elsa_l_quick,elsa_quick_sgpt",
    "frontier": "magnitude,wanda,sparsegpt,elsa_cpu",
    "frontier_small": "magnitude,wanda,sparsegpt,elsa_quick",
}
# cells a grid gained after the preset names went (issue 14: AST-Boosted next to AST-Naive in the field)
ADDED_CELLS = {"field": [["method=ast_boosted"], ["method=ria"], ["method=dsnot"], ["method=oats"]]}   # issue 29


def _effective(cfg) -> tuple[dict, str]:
    """(method keys without metadata, the start that runs) of a composed config."""
    from elsa.run.recipe import build

    keys = {k: v for k, v in without_added(OmegaConf.to_container(cfg.method)).items() if k not in ("name", "budget")}
    takes = build(cfg.method, "method").takes_start
    return keys, cfg.start.name if takes else "dense"


@pytest.mark.parametrize("experiment", sorted(OLD_GRIDS))
def test_experiment_grids_run_the_cells_they_ran_with_preset_names(experiment):
    """Every cell of the new grid (the sweep axis, plus the field's second command for ELSA from SparseGPT) has
    the method keys and the start of the old grid's cell, except the cells the grid gained since (ADDED_CELLS)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        grid = hydra_compose(config_name="config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    new_cells = [[f"method={m}"] for m in grid.hydra.sweeper.params.method.split(",")]
    if experiment == "field":
        new_cells.append(["method=elsa", "start=sparsegpt"])
    new = [_effective(compose([f"experiment={experiment}", *c])) for c in new_cells]
    old = []
    for name in OLD_GRIDS[experiment].split(","):
        if name in OLD_METHODS:
            keys = {k: v for k, v in old_preset(name).items() if k not in ("name", *DROPPED)}
            old.append((keys, OLD_METHODS[name][2]))
        else:   # the one-shot methods' files did not change
            old.append(_effective(compose([f"method={name}"])))
    added = [_effective(compose([f"experiment={experiment}", *c])) for c in ADDED_CELLS.get(experiment, [])]
    assert len(new) == len(old) + len(added)
    for cell in old + added:
        assert cell in new, cell
    for cell in added:   # a gained cell is a new method, not a re-spelling of an old one
        assert cell not in old, cell


def test_demo_is_the_four_methods_at_one_sparsity():
    """experiment=demo (make run) is a sweep of magnitude, Wanda, SparseGPT and ELSA at 70%, ELSA from
    SparseGPT's solution at budget=demo (budget=quick at 30 steps): its ELSA cell has exactly those keys."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=["experiment=demo"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"   # make run needs no -m
    assert str(cfg.hydra.sweeper.params.method).split(",") == ["magnitude", "wanda", "sparsegpt", "elsa"]
    assert str(cfg.sparsity) == "0.7"
    demo_elsa = _effective(compose(["experiment=demo", "method=elsa"]))
    assert demo_elsa == _effective(compose(["method=elsa", "budget=demo", "start=sparsegpt"]))
    quick = _effective(compose(["method=elsa", "budget=quick", "start=sparsegpt"]))
    assert {k: v for k, v in demo_elsa[0].items() if k not in ("steps", "checkpoint_every")} == \
        {k: v for k, v in quick[0].items() if k not in ("steps", "checkpoint_every")} and demo_elsa[0]["steps"] == 30
    assert demo_elsa[1] == "sparsegpt"
    for one_shot in ("magnitude", "wanda", "sparsegpt"):   # these prune the dense model: start is skipped
        assert _effective(compose(["experiment=demo", f"method={one_shot}"]))[1] == "dense"


def test_help_shows_the_three_groups():
    proc = run_cli("--help", timeout=60)
    assert proc.returncode == 0
    groups = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line and " " not in
                  line.split(": ", 1)[0])
    assert groups["method"] == ("alps, ast, ast_boosted, dense, dsnot, elsa, elsa_l, ladmm, leap, magnitude, maskllm, "
                                "oats, ria, safe, sparsegpt, sparsellm, wanda")
    assert groups["budget"] == "cpu, demo, paper, quick"
    assert groups["start"] == "alps, dense, dsnot, ladmm, magnitude, ria, safe, sparsegpt, sparsellm, wanda"
    assert "start=    where it starts" in proc.stdout


def test_a_sweep_reuses_its_one_shot_solution_as_the_start(tmp_path):
    """-m method=sparsegpt,elsa start=sparsegpt: the ELSA job starts from the SparseGPT job's weights (same
    process, same model, data, keys and target) instead of recomputing them, says so in results.json, and ends
    with the weights a run that computes its own start gets, bit for bit."""
    from safetensors.torch import load_file

    common = [*TINY, "budget=quick", "start=sparsegpt", "sparsity=0.7", "save_model=true",
              "eval.dense=false", "hardware.threads=1"]
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *common[:-1], "method=sparsegpt,elsa", f"hydra.sweep.dir={sweep}", "hardware.threads=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = {json.loads((d / "results.json").read_text())["method"]: d for d in sweep.iterdir()
            if (d / "results.json").exists()}
    elsa = json.loads((jobs["elsa"] / "results.json").read_text())
    assert elsa["start"]["reused_from"] == str(jobs["sparsegpt"])
    alone = tmp_path / "alone"
    proc = run_cli(*common, "method=elsa", f"hydra.run.dir={alone}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reused_from" not in json.loads((alone / "results.json").read_text())["start"]
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (jobs["elsa"], alone))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    one_shot = load_file(str(jobs["sparsegpt"] / "model" / "model.safetensors"))
    assert any(not torch.equal(a[k], one_shot[k]) for k in a)   # ELSA trained on from there


def test_a_stored_solution_is_not_reused_under_another_allocation():
    """The reuse key holds the allocated per-matrix ratios: a uniform SparseGPT solution is not an OWL start."""
    from types import SimpleNamespace

    from elsa.run.recipe import SolutionMemo
    from elsa.sparsity.patterns import Sparsity

    class Fp:
        def fingerprint(self, *_):
            return "same"

    node = OmegaConf.create({"_target_": "x", "name": "sparsegpt", "blocksize": 128})
    def plan(ratios):
        return SimpleNamespace(allocated_ratios=lambda: ratios)

    run = SimpleNamespace(source=Fp(), dataset=Fp(), target=Sparsity(0.7), plan=plan(None), seqlen=8, seed=0,
                          ignore=[], targets=[], device="cpu")
    uniform = SolutionMemo.key(run, node, None)
    run.plan = plan({"a": 0.6, "b": 0.8})
    owl = SolutionMemo.key(run, node, None)
    run.plan = plan({"a": 0.65, "b": 0.75})
    assert len({uniform, owl, SolutionMemo.key(run, node, None)}) == 3
