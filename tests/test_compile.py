"""torch.compile sees one graph: inference, training, and training with gradient checkpointing."""

import pytest
import torch

import torchcvt


@pytest.mark.parametrize("case", ["inference", "training", "training with checkpointing"])
def test_dynamo_traces_the_model_as_one_graph(case):
    model = torchcvt.create_model("cvt_digits").train(case != "inference")
    model.set_grad_checkpointing(case == "training with checkpointing")
    x = torch.randn(2, model.config.num_channels, model.config.img_size, model.config.img_size)
    torch._dynamo.reset()
    try:
        with torch.set_grad_enabled(case != "inference"):
            explanation = torch._dynamo.explain(model)(x)
    finally:
        torch._dynamo.reset()
    assert [str(reason.reason) for reason in explanation.break_reasons] == []
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
