"""Batched greedy answers: a static KV cache, fixed shapes, and on CUDA the decode step replayed as a CUDA graph.

Why not `model.generate`: its dynamic cache is bound by per-step overhead, and its static cache is fast only after
a torch.compile that takes longer than a whole evaluation (benchmarks/RESULTS.md, evaluation). Here the decode step
(one token for every row) is captured once as a CUDA graph of the eager kernels: no compiler, the capture costs a
few forward passes, and each step is then one launch.

Attention is our own (`grouped_attention`, registered with transformers as `GROUPED_ATTENTION`): given a mask,
transformers' SDPA path copies every key/value head once per query head and falls back to a slower kernel. It and
the fused norms rely on transformers' internals, so they come through `tunepipe.tasks.patches.transformers`; with those
patches off the decoder runs the model's own SDPA attention and norms, to the same answers.

Shapes are fixed per call so one graph serves every batch: `rows` sequences (the last batch is filled up
with copies) and a cache as long as the longest prompt plus `max_new_tokens`. Prompts are sorted by length
so a batch pads little. Padding is on the left, positions count real tokens only and padded keys are
masked, so each answer equals the model's one-at-a-time greedy answer (tests/test_evaluate.py checks it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

from tunepipe.tasks.chat.template import ChatContext
from tunepipe.tasks.patches.transformers import attention_implementation, unfuse_norms, use_fused_norms

# The decode loop checks whether every row has stopped this often: each check waits for the GPU.
STOP_CHECK_EVERY = 8
GROUPED_ATTENTION = "tunepipe_grouped"


class Answer(NamedTuple):
    text: str
    stopped: bool  # ended with a stop token, not at the length limit


def render_prompt(tokenizer, conversation: list[dict], chat: ChatContext | None = None) -> list[int]:
    """The conversation as the chat template renders it (with `chat`; None: the template's defaults), up to
    and including the generation prompt (and the reply prefix the run moved into it)."""
    text = (
        chat.render(tokenizer, conversation, True)
        if chat is not None
        else tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS and every EOS the model's generation config names."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({t for t in (tokenizer.eos_token_id, *configured) if t is not None})


def greedy_answers(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int,
    batch_size: int,
    progress=None,
    chat: ChatContext | None = None,
) -> list[Answer]:
    """Greedy answers to `conversations` (prompts rendered with `chat`), in their order, decoded up to the
    first stop token.

    `progress` (a `tunepipe.tasks.runtime.progress.Progress`) is advanced by each batch's prompts."""
    prompts = [render_prompt(tokenizer, conversation, chat) for conversation in conversations]
    if not prompts:
        return []
    stop_ids = stop_token_ids(model, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    rows = min(batch_size, len(prompts))
    decoder = GreedyDecoder(model, rows, len(prompts[order[0]]) + max_new_tokens, stop_ids, tokenizer.pad_token_id)
    generated: dict[int, list[int]] = {}
    for start in range(0, len(order), rows):
        chunk = order[start : start + rows]
        batch = [prompts[i] for i in chunk]
        outputs = decoder.run(batch + [batch[0]] * (rows - len(batch)), max_new_tokens)
        generated.update(zip(chunk, outputs))
        if progress is not None:
            progress.advance(len(chunk))
    return [to_answer(tokenizer, generated[i], stop_ids) for i in range(len(prompts))]


def to_answer(tokenizer, tokens: list[int], stop_ids: list[int]) -> Answer:
    """Generated tokens as an answer: the text up to the first stop token, and whether there was one."""
    end = next((k for k, token in enumerate(tokens) if token in stop_ids), None)
    return Answer(tokenizer.decode(tokens[:end], skip_special_tokens=True).strip(), end is not None)


def grouped_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Masked attention that reads each key/value head once: the query heads sharing a key/value head are
    handed to SDPA as that head's queries (transformers' SDPA path copies keys and values per query head
    whenever there is a mask). Without a mask (causal, nothing padded) transformers' SDPA path runs."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    # Query head h reads key/value head h // groups, as transformers' repeat_kv lays them out; a group's
    # queries are ordered (head in group, position), so the mask (batch, 1, length, keys) repeats per head.
    output = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(batch, kv_heads, groups * length, dim),
        key,
        value,
        attn_mask=attention_mask.repeat(1, 1, groups, 1) if length > 1 else attention_mask,
        scale=scaling,
    )
    output = output.view(batch, kv_heads, groups, length, dim).permute(0, 3, 1, 2, 4)
    return output.reshape(batch, length, heads, dim), None


def use_grouped_attention(model, length: int) -> bool:
    """Switch `model` to `grouped_attention` for sequences of at most `length` tokens (its masks are SDPA's);
    returns whether it was switched: not with `tunepipe.tasks.patches.transformers` off, where the model keeps the SDPA
    attention it was loaded with.

    Sliding-window layers (Gemma 3's, 512 tokens) are taken when `length` fits in the window: then every key
    is within reach of every query, sliding attention is full attention and the static cache's sliding layers
    never roll, so one mask serves every layer.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = model.config
    attention = attention_implementation(model)
    if attention not in ("sdpa", GROUPED_ATTENTION, None):
        raise ValueError(f"greedy decoding needs attn_implementation='sdpa', got {attention!r}")
    if getattr(config, "attn_logit_softcapping", None):
        raise ValueError(f"{config.model_type}: soft-capped attention is not supported here")
    sliding = set(getattr(config, "layer_types", None) or ["full_attention"]) - {"full_attention"}
    window = getattr(config, "sliding_window", None)
    if sliding and not (sliding == {"sliding_attention"} and window and length <= window):
        raise ValueError(
            f"{config.model_type}: {', '.join(sorted(sliding))} layers are decoded here only when a prompt and its "
            f"answer ({length} tokens here) fit their window ({window}), where they attend to every token: "
            "lower eval.max_new_tokens or model.max_seq_length"
        )
    if attention is None:
        return False
    AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)
    AttentionMaskInterface.register(GROUPED_ATTENTION, sdpa_mask)  # the same masks as SDPA
    model.set_attn_implementation(GROUPED_ATTENTION)
    return True


@contextlib.contextmanager
def switches_undone(model) -> Iterator[None]:
    """Put back what `GreedyDecoder` switches (attention implementation, fused norms) when the block ends: for a
    model that goes on training after answering (the evaluations during training)."""
    attention = attention_implementation(model)  # None: patches off, the decoder switches nothing
    try:
        yield
    finally:
        if attention is not None:
            model.set_attn_implementation(attention)
        unfuse_norms(model)


class GreedyDecoder:
    """Greedy decoding of `rows` sequences at a time into a static cache of `length` positions.

    The model is switched to `grouped_attention` and fused norms; the masks built here are boolean (True =
    may attend).
    """

    def __init__(self, model, rows: int, length: int, stop_ids: list[int], pad_id: int):
        import torch
        from transformers import StaticCache

        use_grouped_attention(model, length)
        use_fused_norms(model)
        device = model.device
        self.model, self.rows, self.length, self.pad_id = model, rows, length, pad_id
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        self.stop_ids = torch.tensor(stop_ids, device=device)
        # The decode step's inputs and state live in fixed buffers, as a CUDA graph replays fixed addresses.
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.attends = torch.zeros(rows, length, dtype=torch.bool, device=device)  # cache slots a row may see
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.graph = None
        if device.type == "cuda":
            try:
                self.graph = self._capture()
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as exc:  # a kernel that cannot be captured (a quantized layer's, say): eager steps
                print(f"evaluate: decoding without a CUDA graph ({str(exc).splitlines()[0]})", flush=True)

    def _step(self) -> None:
        """Feed every row's last token, pick the next one; a row that has stopped keeps emitting padding."""
        import torch

        logits = self.model(
            input_ids=self.tokens,
            position_ids=self.positions,
            attention_mask=self.attends[:, None, None, :],
            past_key_values=self.cache,
            use_cache=True,
        ).logits[:, -1]
        token = torch.where(self.done, self.pad_id, logits.argmax(-1))
        self.done |= torch.isin(token, self.stop_ids)
        self.tokens.copy_(token[:, None])
        self.positions.add_(1)

    def _capture(self):
        """Record `_step` as a CUDA graph. Warm-up steps (which also allocate the cache) run first, on junk
        state that `run` resets before every batch."""
        import torch

        self.attends[:, 0] = True
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        return graph

    def run(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """The next `max_new_tokens` greedy tokens of each of `rows` prompts (padding after a stop)."""
        import torch

        device, rows = self.tokens.device, self.rows
        width = max(len(p) for p in prompts)
        if len(prompts) != rows or width + max_new_tokens > self.length:
            raise ValueError(f"{len(prompts)} prompts of up to {width} tokens do not fit {rows} x {self.length}")
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=device)
        pads = torch.tensor([width - len(p) for p in prompts], device=device)
        real = torch.arange(width, device=device)[None, :] >= pads[:, None]
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        # Prefill: causal over real tokens; a padding query sees itself so no softmax row is empty (NaN).
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        prefill_mask = torch.zeros(rows, 1, width, self.length, dtype=torch.bool, device=device)
        prefill_mask[:, 0, :, :width] = (real[:, None, :] & causal) | torch.eye(width, dtype=torch.bool, device=device)

        self.cache.reset()
        logits = self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=prefill_mask,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        out = torch.full((rows, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        self.tokens.copy_(logits.argmax(-1)[:, None])
        self.done.copy_(torch.isin(self.tokens[:, 0], self.stop_ids))
        self.positions.copy_(positions[:, -1:] + 1)
        self.attends.zero_()
        self.attends[:, :width] = real
        out[:, 0] = self.tokens[:, 0]
        for step in range(1, max_new_tokens):
            if step % STOP_CHECK_EVERY == 0 and bool(self.done.all()):
                break
            self.attends[:, width + step - 1] = True  # the slot the fed token is written to
            if self.graph is None:
                self._step()
            else:
                self.graph.replay()
            out[:, step] = self.tokens[:, 0]
        return out.tolist()
