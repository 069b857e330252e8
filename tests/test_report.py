"""The parameter/FLOP report: the spec's parameter facts and the paper's Table I."""
import pytest

from aia_kernels.models import tsn_resnet50
from aia_kernels.models.report import PAPER_TABLE_I, count, main


@pytest.mark.parametrize("variant,params", [(None, 23_864_558), ("CinST", None), ("CinST->STinC", 23_871_726)])
def test_counts_match_table_one(variant, params):
    model = tsn_resnet50(174, num_segments=8, variant=variant, backend="reference").to("meta")
    c = count(model, 8, 224)
    paper_style = c["conv/fc MACs"] + c.get("AIA conv3d MACs", 0) + 2 * (c["BN elements"]
                                                                        + c.get("AIA BN elements", 0))
    assert round(paper_style / 1e9, 2) == PAPER_TABLE_I[variant or "plain"]
    assert round(c["conv/fc MACs"] / 1e9, 3) == 32.700  # ResNet-50's 4.09 GMACs per frame, 174-class fc
    if params is not None:
        assert sum(p.numel() for p in model.parameters()) == params


def test_report_runs(capsys):
    main(["--frames", "2", "--size", "32"])
    out = capsys.readouterr().out
    assert "CinST+STinC" in out and "23,864,558" in out and "23,871,726" in out and "23,865,454" in out
