"""Every option of every config group composes, and its component instantiates (no big model is built)."""
import pytest
from conftest import CONF, compose
from hydra.utils import get_class
from omegaconf import OmegaConf

from elsa.run.recipe import build
from elsa.run.spec import constructor_keys

GROUPS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml")) for g in ("model", "method", "dataset", "logger")}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_group_option_instantiates(group, option):
    overrides = [f"{group}={option}"] + (["model.path=/tmp/x"] if option == "hf" else [])
    cfg = compose(overrides)
    obj = build(cfg[group], group)
    assert type(obj) is get_class(cfg[group]["_target_"])
    # a rehearsal's name says what it rehearses (model=shapes -> shapes-<like>-x<blocks>)
    name = cfg[group].get("name")
    if group in ("model", "method", "dataset"):
        assert name == option or option == "shapes" and name.startswith("shapes-")
    if group in ("model", "dataset"):
        assert obj.name == name
    if group == "method":   # every key of the file is an argument of the class (no key silently unused)
        keys = constructor_keys(type(obj))
        assert keys is not None and set(cfg.method) - {"_target_", "name", "budget"} <= keys


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "eval").glob("*.yaml")))
def test_eval_options_compose(option):
    cfg = compose([f"eval={option}"])
    assert list(cfg.eval.corpora) and cfg.eval.batch_size > 0


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "hardware").glob("*.yaml")))
def test_hardware_options_compose(option):
    cfg = compose([f"hardware={option}"])
    assert cfg.hardware.device


M4 = "magnitude,wanda,sparsegpt,elsa"
# what each experiment composes to: its grid (hydra.sweeper.params), its choices and the keys it sets
EXPERIMENTS = {
    "demo": ({"method": M4}, dict(budget="demo", start="sparsegpt", eval="quick", model="smollm2-135m"),
             dict(sparsity=0.7, nsamples=16, max_tokens=4096)),
    "field": ({"sparsity": "0.9,0.5,2:4,0.7",
               "method": "magnitude,wanda,ria,dsnot,sparsegpt,oats,alps,ladmm,sparsellm,safe,ast,ast_boosted,elsa,elsa_l"},
              dict(budget="quick", start="dense", eval="quick", model="smollm2-135m"),
              dict(nsamples=32, max_tokens=8192)),
    "frontier": ({"method": M4, "sparsity": "0.5,0.6,0.7,0.8,0.9"},
                 dict(budget="cpu", start="sparsegpt", eval="default", model="smollm2-135m"),
                 dict(nsamples=64, max_tokens=65536)),
    "frontier_small": ({"method": M4, "sparsity": "0.5,0.7,0.9"},
                       dict(budget="quick", start="dense", eval="quick", model="smollm2-135m"),
                       dict(nsamples=32, max_tokens=8192)),
    "llama2_7b_frontier": ({"method": M4, "sparsity": "0.5,0.6,0.7,0.8,0.9"},
                           dict(budget="paper", start="dense", eval="paper", model="llama2-7b", dataset="c4",
                                hardware="gpu"),
                           dict(nsamples=128, seqlen=2048, max_tokens=524288)),
    "quick": ({}, dict(budget="paper", start="dense", eval="quick", model="smollm2-135m"), dict(nsamples=64)),
}


def compose_with_hydra(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_every_experiment_is_in_the_table():
    assert set(EXPERIMENTS) == {p.stem for p in (CONF / "experiment").glob("*.yaml")}


@pytest.mark.parametrize("option", sorted(EXPERIMENTS))
def test_experiments_compose(option):
    """The grid, the choices (budget, start, eval, model) and the keys each experiment sets; every method of the
    grid composes under it, a training method with the experiment's budget part (conf/method_budget/)."""
    grid, choices, keys = EXPERIMENTS[option]
    cfg = compose_with_hydra([f"experiment={option}"])
    assert dict(cfg.hydra.sweeper.params or {}) == grid
    assert {k: cfg.hydra.runtime.choices[k] for k in choices} == choices
    assert cfg.save_model is False
    got = {"sparsity": cfg.sparsity, "nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "max_tokens": cfg.eval.max_tokens}
    assert {k: got[k] for k in keys} == keys
    for method in grid.get("method", "magnitude").split(","):
        m = compose([f"experiment={option}", f"method={method}"]).method
        part = CONF / "method_budget" / choices["budget"] / f"{method}.yaml"
        assert m.get("budget", "paper") == (choices["budget"] if part.exists() else "paper"), method
        own = {k: v for k, v in (OmegaConf.load(part) if part.exists() else {}).items()
               if k not in ("budget", "defaults")}
        assert {k: m[k] for k in own} == own, method   # the budget part's own values reached the method


@pytest.mark.parametrize("text,expected", [("0.9", 0.9), ("2:4", "2:4"), ("4:8", "4:8"), ("0", 0)])
def test_sparsity_override_parses_as_written(text, expected):
    assert compose([f"sparsity={text}"]).sparsity == expected
