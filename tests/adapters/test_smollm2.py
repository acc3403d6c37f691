"""PoLAR on the real SmolLM2-135M (slow: loads the backbone): block selection and zero-init equality."""
import copy

import pytest
import torch

from bayes_polar.adapters import PolarLinear, inject_polar


@pytest.mark.slow
def test_polar_on_the_top_block_of_smollm2(smollm2):
    model = copy.deepcopy(smollm2[0])  # the session fixture is shared: adapt a copy
    ids = smollm2[1]("Question: What is two plus two?\nAnswer:", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(input_ids=ids).logits
    inject_polar(model, rank=8, layers=[-1])
    assert model.polar_targets == ["model.layers.29.self_attn.q_proj", "model.layers.29.self_attn.v_proj"]
    q, v = (model.get_submodule(name) for name in model.polar_targets)
    assert isinstance(q, PolarLinear) and q.polar_X.shape == (576, 8) and v.polar_X.shape == (192, 8)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
