"""When the training loop replays the transformer from CUDA graphs (`tasks/train/graphs.py`), decided on the CPU:
the capture itself is CUDA's (stood in for here by the eager module; tests/test_training_gpu.py checks the
real graphs against eager steps), the decisions around it are ours."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from tunepipe.tasks.train import graphs  # noqa: E402  (imports torch: only once importorskip found it)

VARLEN_CALLS = []  # the packed rows that attended through the varlen kernel (counted as unsloth's call counts)


class TinyTransformer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 4)
        self.embed.weight.requires_grad_(False)  # frozen, as a LoRA base is
        self.adapter = torch.nn.Linear(4, 4)
        self.config = SimpleNamespace(num_hidden_layers=1)
        self.varlen = True  # whether a packed row's attention takes the varlen kernel (unsloth decides)

    def forward(self, input_ids, use_cache=False, attention_mask=None, position_ids=None, packed_seq_lengths=None):
        self.packed_seq_lengths = packed_seq_lengths
        if packed_seq_lengths is not None and self.varlen:
            VARLEN_CALLS.append(packed_seq_lengths)
        return SimpleNamespace(last_hidden_state=self.adapter(self.embed(input_ids)))


class RecordedBoundaries:
    """PackedBoundaries without unsloth: the lengths each packed row loaded."""

    def __init__(self, layout, device):
        self.key, self.loaded = object(), []

    def load(self, lengths):
        self.loaded.append(lengths.tolist())

    def varlen_calls(self) -> int:
        return len(VARLEN_CALLS)


LAYOUT = SimpleNamespace(width=8, segments=3, longest=5)


@pytest.fixture
def transformer_graphs(monkeypatch):
    """TransformerGraphs on the CPU: every batch counts as on the GPU, and a capture records its shape and hands
    back the module itself, so the replayed path still computes."""
    captures = []

    def capture(module, sample_args, num_warmup_iters):
        captures.append(tuple(sample_args[0].shape))
        module(*sample_args)  # the captured pass
        return module

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(
        graphs.TransformerGraphs,
        "_training_on_gpu",
        lambda self, ids: torch.is_grad_enabled() and self.transformer.training,
    )
    monkeypatch.setattr(graphs, "PackedBoundaries", RecordedBoundaries)
    transformer = TinyTransformer()
    return graphs.TransformerGraphs(transformer, LAYOUT), transformer, captures


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


def packed(width: int, lengths: list[int]) -> dict:
    return batch(
        1,
        width,
        position_ids=torch.zeros(1, width, dtype=torch.long),
        packed_seq_lengths=torch.tensor(lengths, dtype=torch.int32),
    )


def test_packed_rows_of_the_layout_are_captured_and_read_their_boundaries_from_the_gpu_buffers(transformer_graphs):
    run, transformer, captures = transformer_graphs
    run(packed(8, [3, 5, 0]))
    assert captures == [] and transformer.packed_seq_lengths.tolist() == [3, 5, 0]  # eager: its own lengths
    run(packed(8, [2, 2, 4]))
    assert captures == [(1, 8)] and run.shape == (1, 8) and not run.failed
    assert transformer.packed_seq_lengths is run.boundaries.key  # the captured pass
    run(packed(8, [1, 3, 4]))
    assert run.boundaries.loaded == [[3, 5, 0], [2, 2, 4], [1, 3, 4]]  # every row's lengths, before a replay


def test_packed_rows_are_not_replayed_unless_every_layer_attended_through_the_varlen_kernel(transformer_graphs, capsys):
    run, transformer, captures = transformer_graphs
    transformer.varlen = False  # e.g. one attention call per run of equal lengths: this row's lengths kept
    run(packed(8, [3, 5, 0]))
    run(packed(8, [2, 2, 4]))
    assert captures == [(1, 8)] and run.graphed is None and run.failed
    assert "0 of 1 layers attended to the packed row through the varlen kernel" in capsys.readouterr().out


def test_padded_batches_packed_rows_off_the_layout_evaluation_and_no_grad_passes_are_never_captured(transformer_graphs):
    run, transformer, captures = transformer_graphs
    for _ in range(2):
        run(batch(4, 8, attention_mask=torch.ones(4, 8, dtype=torch.long)))
    for _ in range(2):  # another width, or another number of blocks: unsloth computes their boundaries itself
        run(packed(9, [4, 5, 0]))
        assert transformer.packed_seq_lengths.tolist() == [4, 5, 0]
        run(packed(8, [3, 5]))
    assert run.boundaries.loaded == []
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
