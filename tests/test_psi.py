"""psi, the weight of PoGDiff's consistency term (pogdiff/psi.py): hand-computed values and its validation."""

import math

import pytest
import torch

from pogdiff.errors import UserError
from pogdiff.psi import PSI_TERMS, PsiParams, compute_psi, expected_psi, psi_img


def test_psi_img_paper_example_and_edge_cases():
    s = torch.tensor([0.4, 0.4])
    out = psi_img(s, torch.tensor([True, False]), PsiParams(a1=1.0, a2=1.0))
    assert out.tolist() == pytest.approx([0.4, 0.16], rel=1e-6)
    neg = torch.tensor([-0.3, -0.3, -1.0, 0.0])
    same = torch.tensor([True, False, False, True])
    assert psi_img(neg, same, PsiParams(a1=1.0, a2=1.0)).tolist() == [0.0, 0.0, 0.0, 0.0]
    fractional = psi_img(neg, same, PsiParams(a1=0.5, a2=0.7))
    assert not bool(fractional.isnan().any()) and fractional.tolist() == [0.0, 0.0, 0.0, 0.0]
    # Rounding can put a cosine a hair above 1: clamped, so psi_img <= 1.
    assert psi_img(torch.tensor([1.0000001]), torch.tensor([False]), PsiParams()).item() == 1.0
    # 0 ** 0 = 1: with a1 = 0 a same-identity pair gets 1 whatever its similarity.
    assert psi_img(
        torch.tensor([-0.3, 0.25]), torch.tensor([True, False]), PsiParams(a1=0.0, a2=2.0)
    ).tolist() == [
        1.0,
        0.0625,
    ]
    with pytest.raises(ValueError, match="--psi_a1 and --psi_a2"):
        psi_img(s, torch.tensor([True, False]), PsiParams(a1=-1.0))


def test_compute_psi_every_terms_option():
    sim = torch.tensor([0.4, 0.4, 0.9, -0.2])
    same = torch.tensor([True, False, False, True])
    log_w = torch.tensor([0.0, math.log(2.0), math.log(0.5), math.log(3.0)])
    expected = {
        "img,txt": [0.4 / 2, 0.16 * 2 / 2, 0.81 * 0.5 / 2, 0.0],
        "txt,img": [0.4 / 2, 0.16 * 2 / 2, 0.81 * 0.5 / 2, 0.0],
        "img": [0.4 / 2, 0.16 / 2, 0.81 / 2, 0.0],
        "txt": [1 / 2, 2 / 2, 0.5 / 2, 3 / 2],
        "none": [0.0, 0.0, 0.0, 0.0],
    }
    for terms, values in expected.items():
        psi = compute_psi(sim, same, log_w, PsiParams(a1=1.0, a2=1.0, a3=2.0, terms=terms))
        assert psi.dtype == torch.float32
        assert psi.tolist() == pytest.approx(values, rel=1e-6, abs=0), terms
    with pytest.raises(ValueError, match="--psi_terms must be one of img,txt"):
        compute_psi(sim, same, log_w, PsiParams(1.0, 1.0, 1.0, terms="img+txt"))
    with pytest.raises(ValueError, match="--psi_a3 must be > 0"):
        compute_psi(sim, same, log_w, PsiParams(1.0, 1.0, 0.0))


def test_expected_psi_hand_computed():
    sims = torch.tensor([[0.6, 0.4, -0.1], [-0.2, -0.3, -0.4]])
    same = torch.tensor([[True, False, False], [True, False, False]])
    log_w = torch.tensor([math.log(2.0), 0.0])
    out = expected_psi(sims, same, log_w, PsiParams(a1=1.0, a2=1.0, a3=1.0))
    # Row 0: w = (0.6, 0.4, 0); psi_j = (0.6 * 2, 0.16 * 2, 0). Row 1: uniform w, every psi 0.
    assert out.tolist() == pytest.approx([0.6 * 1.2 + 0.4 * 0.32, 0.0], rel=1e-6)


def test_psi_params_validates_once_and_names_the_flag():
    assert PsiParams() == PsiParams(1.0, 1.0, 1.0, "img,txt")
    for kwargs, message in (
        ({"a1": float("nan")}, "--psi_a1 must be a finite number"),
        ({"a2": float("inf")}, "--psi_a2 must be a finite number"),
        ({"a2": -0.5}, "--psi_a1 and --psi_a2 must be >= 0"),
        ({"a3": 0.0}, "--psi_a3 must be > 0"),
        ({"a3": -1.0}, "--psi_a3 must be > 0"),
        ({"terms": "img+txt"}, "--psi_terms must be one of"),
    ):
        with pytest.raises(UserError, match=message):
            PsiParams(**kwargs)
    with pytest.raises(AttributeError):
        PsiParams().a1 = 2.0  # frozen: one validated value, passed whole
    assert [(PsiParams(terms=t).uses_img, PsiParams(terms=t).uses_txt) for t in PSI_TERMS] == [
        (True, True), (True, True), (True, False), (False, True), (False, False),
    ]  # fmt: skip


def test_cli_choices_are_the_one_list_of_terms():
    import argparse

    from pogdiff.arguments import add_index_arguments

    parser = argparse.ArgumentParser()
    add_index_arguments(parser)
    (action,) = [a for a in parser._actions if a.dest == "psi_terms"]
    assert tuple(action.choices) == PSI_TERMS
