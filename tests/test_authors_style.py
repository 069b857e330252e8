"""benchmarks/authors_style.py, the eager peer written the authors' way, computes what the
reference computes: every variant, train and eval, with and without BN; outputs, input and
parameter gradients, running statistics. It also takes an aia_kernels module's state as is."""

import pytest
import torch

import aia_kernels
from benchmarks import authors_style

from aia_testing import assert_close_results, make_pair, run


@pytest.mark.parametrize("variant", aia_kernels.VARIANTS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("use_bn", [True, False], ids=["bn", "nobn"])
def test_matches_reference_float64(variant, train, use_bn):
    ref, _ = make_pair(variant, "reference", use_bn=use_bn, train=train)
    authors = authors_style.copy_of(ref)
    assert [n for n, _ in authors.named_parameters()] == [n for n, _ in ref.named_parameters()]
    x = torch.randn(6, 5, 4, 7, dtype=torch.float64)
    grad = torch.randn_like(x)
    # Same operations, other association ((x / 3) * sum vs (sum / 3) * x): rounding only.
    assert_close_results(run(ref, x, grad), run(authors, x, grad), atol=1e-12, rtol=1e-10)


def test_takes_each_submodule_training_flag():
    ref, _ = make_pair("CinST->STinC", "reference", train=True)
    ref.eft2.T_bn.eval()
    authors = authors_style.copy_of(ref)
    assert authors.training and authors.eft1.C_bn.training and not authors.eft2.T_bn.training
    x = torch.randn(6, 5, 4, 7, dtype=torch.float64)
    assert_close_results(run(ref, x, torch.ones_like(x)), run(authors, x, torch.ones_like(x)), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("variant", ["CinST->STinC", "CinST+STinC", "C+ST"])
def test_units_in_the_module_order(variant):
    ref, _ = make_pair(variant, "reference")
    authors = authors_style.copy_of(ref)
    assert [authors.eft1.kind, authors.eft2.kind] == [kind for kind, _ in ref.units()]
