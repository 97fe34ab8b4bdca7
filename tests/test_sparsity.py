import pytest
import torch

from elsa.errors import ElsaError
from elsa.sparsity.patterns import Sparsity, mask_from_scores, nm_violations, project


@pytest.mark.parametrize("value,ratio,nm", [(0.9, 0.9, None), ("0.5", 0.5, None), (0, 0.0, None),
                                            ("2:4", 0.5, (2, 4)), ("4:8", 0.5, (4, 8)), ("1:4", 0.75, (1, 4))])
def test_parse_valid(value, ratio, nm):
    s = Sparsity.parse(value)
    assert s.ratio == pytest.approx(ratio)
    assert (s.n, s.m) == (nm or (None, None))


@pytest.mark.parametrize("value", [1.2, -0.1, 1.0, "3:2", "0:4", "4:4", "abc", "2:", None, True, float("nan")])
def test_parse_invalid_names_key_value_and_allowed(value):
    with pytest.raises(ElsaError) as err:
        Sparsity.parse(value)
    msg = str(err.value)
    assert msg.startswith(f"sparsity={value}") and "N:M" in msg and "[0, 1)" in msg


@pytest.mark.parametrize("group", ["layer", "row"])
@pytest.mark.parametrize("ratio", [0.5, 0.7, 0.9, 0.37])
def test_exact_ratio_with_ties(group, ratio):
    torch.manual_seed(0)
    # heavily tied scores, like de-quantised 4-bit weights
    w = torch.randint(-3, 4, (64, 96)).float()
    mask = mask_from_scores(w.abs(), Sparsity(ratio), group)
    if group == "row":
        assert ((~mask).sum(1) == round(96 * ratio)).all()
    else:
        assert int((~mask).sum()) == round(w.numel() * ratio)
    # deterministic: same input, same mask
    assert torch.equal(mask, mask_from_scores(w.abs(), Sparsity(ratio), group))
    # pruned scores never exceed kept scores (within the comparison group)
    s = w.abs()
    if group == "layer":
        assert s[~mask].max() <= s[mask].min()


def test_nm_mask_and_projection():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    t = Sparsity.parse("2:4")
    p = project(w, t)
    assert nm_violations(p, 2, 4) == 0
    assert int((p == 0).sum()) == w.numel() // 2
    # kept values are the two largest |w| in every group of four
    g = w.abs().reshape(32, 16, 4)
    kept = (p != 0).reshape(32, 16, 4)
    top2 = g.topk(2, dim=-1).indices
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, top2, True))


def test_nm_shape_check():
    with pytest.raises(ElsaError, match="does not divide"):
        Sparsity.parse("2:4").check_shape("layers.0.mlp.down_proj", (8, 10))
