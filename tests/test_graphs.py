"""When the training loop replays the transformer from CUDA graphs (`tasks/train/graphs.py`), decided on the CPU:
the capture itself is CUDA's (stood in for here by the eager module; tests/test_training_gpu.py checks the
real graphs against eager steps), the decisions around it are ours."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from tasks.train import graphs


class TinyTransformer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 4)
        self.embed.weight.requires_grad_(False)  # frozen, as a LoRA base is
        self.adapter = torch.nn.Linear(4, 4)

    def forward(self, input_ids, use_cache=False, attention_mask=None):
        return SimpleNamespace(last_hidden_state=self.adapter(self.embed(input_ids)))


@pytest.fixture
def transformer_graphs(monkeypatch):
    """TransformerGraphs on the CPU: every batch counts as on the GPU, and a capture records its shape and hands
    back the module itself, so the replayed path still computes."""
    captures = []

    def capture(module, sample_args, num_warmup_iters):
        captures.append(tuple(sample_args[0].shape))
        return module

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(graphs.TransformerGraphs, "_graphable",
                        lambda self, inputs: set(inputs) == {"input_ids", "use_cache"} and torch.is_grad_enabled()
                        and self.transformer.training)
    transformer = TinyTransformer()
    return graphs.TransformerGraphs(transformer), transformer, captures


def batch(rows: int, width: int, **extra) -> dict:
    return {"input_ids": torch.zeros(rows, width, dtype=torch.long), "use_cache": False, **extra}


def test_a_shape_is_captured_the_second_time_in_a_row_and_only_that_shape_replays(transformer_graphs):
    run, _, captures = transformer_graphs
    run(batch(4, 8))
    assert captures == []  # once: maybe a one-off, not worth a capture
    run(batch(4, 8))
    assert captures == [(4, 8)] and run.shape == (4, 8)
    run(batch(2, 8))  # another shape: eager, and no second capture
    run(batch(2, 8))
    assert captures == [(4, 8)]


def test_padded_or_packed_batches_evaluation_and_no_grad_passes_are_never_captured(transformer_graphs):
    run, transformer, captures = transformer_graphs
    for _ in range(2):
        run(batch(4, 8, attention_mask=torch.ones(4, 8, dtype=torch.long)))
    with torch.no_grad():
        run(batch(4, 8))
        run(batch(4, 8))
    transformer.eval()
    run(batch(4, 8))
    run(batch(4, 8))
    assert captures == []


def test_trainable_weights_keep_gradient_tensors_for_the_replays_to_add_to(transformer_graphs):
    run, transformer, _ = transformer_graphs
    run(batch(4, 8))
    run(batch(4, 8))
    assert transformer.adapter.weight.grad is not None and transformer.embed.weight.grad is None
    transformer.adapter.weight.grad = None  # e.g. a zero_grad(set_to_none=True) somewhere
    run(batch(4, 8))
    assert transformer.adapter.weight.grad is not None


def test_a_weight_replaced_after_the_capture_turns_the_graphs_off(transformer_graphs, capsys):
    run, transformer, captures = transformer_graphs
    run(batch(4, 8))
    run(batch(4, 8))
    transformer.adapter.weight = torch.nn.Parameter(transformer.adapter.weight.detach().clone())
    run(batch(4, 8))
    assert run.graphed is None and run.failed
    assert "a weight of the transformer was replaced" in capsys.readouterr().out
    run(batch(4, 8))
    run(batch(4, 8))
    assert captures == [(4, 8)]  # not captured again


def test_a_failed_capture_is_reported_and_the_step_runs_eagerly(transformer_graphs, monkeypatch, capsys):
    run, _, _ = transformer_graphs

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", refuse)
    run(batch(4, 8))
    hidden = run(batch(4, 8))
    assert hidden.shape == (4, 8, 4) and run.failed and run.graphed is None
    assert "CUDA graphs off, the capture failed (RuntimeError" in capsys.readouterr().out
