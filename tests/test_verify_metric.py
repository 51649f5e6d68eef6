"""How ``verify`` measures a difference (README: max |diff| / max |reference output|).

The reported numbers are checked against an independent computation from the two models'
own outputs on the same inputs, for a candidate that really differs from its reference.
"""

from __future__ import annotations

import timm
import torch
from _core_helpers import randomize_norms

import wsurgery
from wsurgery.data import random_inputs

SIZE = 32


def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A converted resnet10t (the reference) and its folded copy with one head row perturbed."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    randomize_norms(model)
    model, _ = wsurgery.convert(model, mode="aws")
    model.eval()
    folded = wsurgery.fold(model).eval()
    with torch.no_grad():  # only class 3's logit moves: the largest difference is far above the mean one
        folded.get_classifier().weight[3] += 0.05 * torch.randn_like(folded.get_classifier().weight[3])
        folded.get_classifier().bias[3] += 0.3
    return model, folded


def test_verify_reports_max_abs_over_max_reference_output():
    reference, candidate = _pair()
    result = wsurgery.verify(candidate, reference, num_random=6, seed=3, img_size=SIZE)

    # independently: the same seeded inputs through both models, in float64
    x = random_inputs(reference, 6, seed=3, img_size=SIZE)
    assert x.shape == (6, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = reference(x).double()
        out = candidate(x).double()
    diff = (out - ref).abs()
    expected_abs = diff.max().item()
    expected_rel = expected_abs / ref.abs().max().item()
    expected_agree = (out.argmax(-1) == ref.argmax(-1)).double().mean().item()

    # the perturbation is what verify has to see: one class only, so max and mean differ widely
    assert diff[:, 3].min() > 0 and diff.mean().item() < expected_abs / 5
    assert result.num_inputs == 6
    torch.testing.assert_close(result.max_abs, expected_abs, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(result.max_rel, expected_rel, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(result.top1_agreement, expected_agree, rtol=0.0, atol=1e-9)
    # an fp32 candidate is judged at 1e-5 on max_rel, and this one is far off
    assert result.rtol == 1e-5
    assert expected_rel > 1e-3 and result.passed is False


def test_verify_passes_exactly_when_max_rel_is_within_rtol():
    reference, candidate = _pair()
    measured = wsurgery.verify(candidate, reference, num_random=2, img_size=SIZE).max_rel
    assert wsurgery.verify(candidate, reference, num_random=2, img_size=SIZE, rtol=measured * 1.01).passed
    assert not wsurgery.verify(candidate, reference, num_random=2, img_size=SIZE, rtol=measured * 0.99).passed


def test_compare_outputs_on_known_logits():
    from wsurgery.verify import compare_outputs

    ref = torch.tensor([[1.0, -8.0, 2.0], [0.5, 0.0, -1.0]])
    out = torch.tensor([[1.0, -8.0, 2.5], [0.5, 0.1, -1.0]])  # diffs: 0.5 and 0.1; max |ref| = 8
    max_abs, max_rel, agree = compare_outputs(out, ref)
    torch.testing.assert_close(max_abs, 0.5)
    torch.testing.assert_close(max_rel, 0.5 / 8)
    torch.testing.assert_close(agree, 1.0)
    # a changed arg-max lowers the agreement
    _, _, agree = compare_outputs(torch.tensor([[1.0, -8.0, 2.0], [0.5, 0.0, 3.0]]), ref)
    torch.testing.assert_close(agree, 0.5)
