"""Plans: the limits every backend assumes, checked by build_plan, and the int encoding
that the native plan ops read, written once (aia_kernels/plan.py) and round-trip tested."""
import pytest
import torch

import aia_kernels
from aia_kernels import plan as plans
from aia_kernels.plan import Plan, Stage, Weight, build_plan, check_plan, decode_plan, encode_plan


def c_chain(n_gates: int) -> Plan:
    """n C gates, each pooled from plain v in its own stage; the output uses the first."""
    stages = tuple(Stage("C", Weight(), (g,)) for g in range(n_gates))
    return Plan("synthetic", ("C",) * n_gates, stages, Weight(((0,),)))


@pytest.mark.parametrize("variant", aia_kernels.VARIANTS)
def test_every_variant_is_within_the_limits_and_round_trips(variant):
    plan = build_plan(variant)
    assert check_plan(plan) is plan
    assert decode_plan(encode_plan(plan), variant) == plan


def test_encoding_of_the_simplest_plans():
    # "C": 1 gate (axis C); 1 stage pooling C with no weight, gate 0, kept; output weight = the C gate.
    assert encode_plan(build_plan("C")) == (1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0)
    # "ST": gates T, H, W; 1 stage pooling T, H, W with no weight, gates 0-2, recomputed; output = their mean.
    assert encode_plan(build_plan("ST")) == (3, 1, 2, 3, 1, 1, 0, 0, 3, 0, 1, 2, 1, 0, 1, 3, 0, 1, 2)


@pytest.mark.parametrize("variant", aia_kernels.VARIANTS)
def test_the_backward_recomputes_exactly_the_t_h_w_stages(variant):
    """A T, H, W stage keeps (2 + 1 + 1) / T + 4 / H + 4 / W of the input, a C stage 4 / C
    (plan.py): the first are recomputed, the second kept; without_recompute keeps both."""
    plan = build_plan(variant)
    assert [stage.recompute for stage in plan.stages] == [stage.axes == "THW" for stage in plan.stages]
    kept = plans.without_recompute(plan)
    assert not any(stage.recompute for stage in kept.stages)
    assert [(s.axes, s.weight, s.gates) for s in kept.stages] == [(s.axes, s.weight, s.gates) for s in plan.stages]
    assert build_plan(variant, recompute=False) == kept  # what AIAModule(recompute=False) runs


BROKEN = {
    "three factors": (Plan("synthetic", ("C", "C", "C"), tuple(Stage("C", Weight(), (g,)) for g in range(3)),
                           Weight(((0,), (1,), (2,)))), "output weight that has 3 factors; the kernels take at most 2"),
    "a factor of two gates": (Plan("synthetic", ("T", "H", "W"), (Stage("THW", Weight(), (0, 1, 2)),),
                                   Weight(((0, 1),))), "factor of the TH gates"),
    "another combine": (Plan("synthetic", ("C",), (Stage("C", Weight(), (0,)),), Weight(((0,),), "max")),
                        "combines its factors by 'max'"),
    "a stage pooling T alone": (Plan("synthetic", ("T",), (Stage("T", Weight(), (0,)),), Weight(((0,),))),
                                "pools stage 0 along 'T'"),
    "too many gates": (c_chain(plans.MAX_GATES + 1), "has 17 gates; the kernels take 1 to 16"),
    "too many stages": (c_chain(plans.MAX_STAGES + 1), "has 8 stages; input_grad sums one term per stage"),
    "a gate used before it is computed": (Plan("synthetic", ("C", "C"), (Stage("C", Weight(((1,),)), (0,)),
                                                                        Stage("C", Weight(), (1,))),
                                               Weight(((0,),))), "uses gates \\[1\\] before a stage computes them"),
    "a gate computed twice": (Plan("synthetic", ("C",), (Stage("C", Weight(), (0,)), Stage("C", Weight(), (0,))),
                                   Weight(((0,),))), "computes gates \\[0\\] twice"),
    "a gate never computed": (Plan("synthetic", ("C", "C"), (Stage("C", Weight(), (0,)),), Weight(((0,),))),
                              "never computes gates \\[1\\]"),
    "a stage gate of another axis": (Plan("synthetic", ("T",), (Stage("C", Weight(), (0,)),), Weight()),
                                     "one gate of each axis"),
    "a recompute flag that is not a bool": (Plan("synthetic", ("C",), (Stage("C", Weight(), (0,), 1),),
                                                 Weight(((0,),))), "says recompute=1 for stage 0"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_check_plan_names_the_limit(case):
    plan, message = BROKEN[case]
    with pytest.raises(ValueError, match=f"the plan of AIA variant 'synthetic' .*{message}"):
        check_plan(plan)


def test_a_variant_beyond_the_limits_fails_in_build_plan(monkeypatch):
    """A three-unit chain (not one of the ten variants) needs a 3-factor output weight."""
    monkeypatch.setattr(plans, "parse_variant", lambda variant: ("->", ("C", "ST", "C")))
    message = "'C->ST->C' has an output weight that has 3 factors; the kernels take at most 2"
    with pytest.raises(ValueError, match=message):
        build_plan("C->ST->C")


def test_limits_are_the_native_library_s():
    from aia_kernels import native
    native.load()
    assert torch.ops.aia_native.plan_limits() == [plans.MAX_FACTORS, 3, 3, plans.MAX_INPUT_GRAD_TERMS,
                                                  plans.MAX_GATES]
    assert max(len(axes) for axes in plans.FACTOR_AXES) == 3 and max(len(a) for a in plans.STAGE_AXES) == 3


@pytest.mark.parametrize("variant", aia_kernels.VARIANTS)
def test_native_library_decodes_and_reencodes_every_plan(variant):
    from aia_kernels import native
    native.load()
    codes = list(encode_plan(build_plan(variant)))
    assert torch.ops.aia_native.plan_encoding_roundtrip(codes) == codes


def test_native_library_refuses_a_plan_beyond_the_limits():
    """C++ checks the limits too (the ints may come from anywhere): 8 stages would overflow input_grad."""
    from aia_kernels import native
    native.load()
    codes = list(encode_plan(c_chain(plans.MAX_STAGES + 1)))
    assert decode_plan(codes, "synthetic") == c_chain(plans.MAX_STAGES + 1)
    with pytest.raises(RuntimeError, match="aia_native: a plan has 0 to 7 stages"):
        torch.ops.aia_native.plan_encoding_roundtrip(codes)
    assert torch.ops.aia_native.plan_encoding_roundtrip(list(encode_plan(c_chain(plans.MAX_STAGES)))) == list(
        encode_plan(c_chain(plans.MAX_STAGES)))
