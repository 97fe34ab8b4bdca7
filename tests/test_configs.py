"""Every option of every config group composes, and its component instantiates (no big model is built)."""
import pytest
from conftest import CONF, compose

from elsa.pipeline import build

GROUPS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml")) for g in ("model", "method", "dataset", "logger")}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_group_option_instantiates(group, option):
    overrides = [f"{group}={option}"] + (["model.path=/tmp/x"] if option == "hf" else [])
    cfg = compose(overrides)
    obj = build(cfg[group], group)
    assert obj is not None
    if group in ("model", "method", "dataset"):
        assert cfg[group].name


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "eval").glob("*.yaml")))
def test_eval_options_compose(option):
    cfg = compose([f"eval={option}"])
    assert list(cfg.eval.corpora) and cfg.eval.batch_size > 0


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "hardware").glob("*.yaml")))
def test_hardware_options_compose(option):
    cfg = compose([f"hardware={option}"])
    assert cfg.hardware.device


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiments_compose(option):
    compose([f"experiment={option}"])


@pytest.mark.parametrize("text,expected", [("0.9", 0.9), ("2:4", "2:4"), ("4:8", "4:8"), ("0", 0)])
def test_sparsity_override_parses_as_written(text, expected):
    assert compose([f"sparsity={text}"]).sparsity == expected
