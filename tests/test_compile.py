"""torch.compile on CPU with the "torch" op backend: one graph (no graph breaks) that matches eager."""

from __future__ import annotations

import pytest
import torch

from openlm_mamba import MambaLM


def tiny_model() -> MambaLM:
    torch.manual_seed(0)
    return MambaLM("mamba_tiny", backend="torch")


def loss_and_grads(model, fn, ids):
    logits = fn(ids)[0]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return logits.detach(), grads


def check_compiled_matches_eager(backend: str) -> None:
    model = tiny_model()
    ids = torch.randint(0, model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    # fullgraph=True raises on any graph break, so passing means graph_break_count == 0
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    got_logits, got_grads = loss_and_grads(model, compiled, ids)
    want_logits, want_grads = loss_and_grads(model, model, ids)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    for (name, _), g, w in zip(model.named_parameters(), got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_compile_has_no_graph_breaks_and_matches_eager():
    check_compiled_matches_eager("aot_eager")  # dynamo + AOT autograd (fake kernels, custom autograd)


def test_explain_reports_no_graph_breaks():
    model = tiny_model()
    ids = torch.randint(0, model.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.slow
def test_inductor_matches_eager():
    check_compiled_matches_eager("inductor")  # generates and compiles C++ kernels: ~1-2 min on 2 cores
