"""Evaluation speed on a CUDA GPU: the evaluate stage's generation against plain one-at-a-time `generate`.

The model has Qwen3-0.6B's shape with random weights (no download); its tokenizer comes from a folder
(Qwen's 151,936-token vocabulary and a ChatML template, e.g. `.gpu/tok`: the tiny model's tokenizer from
before it moved to GPT-2's vocabulary; the vocabulary sets the LM head's size) or from llama.cpp's
`ggml-vocab-qwen2.gguf` with ChatML added, as in benchmarks/gpu_train.py. 128 chat prompts of 100-200
tokens, 64 new tokens each, greedy; random weights never stop early, so every answer is 64 tokens long.

1. The stage: `tunepipe.tasks.evaluate.worker.generate_outputs` run as the evaluate stage runs it, in a worker process
   (process start, imports, model load, CUDA graph capture, answers, eval loss), timed from outside.
2. Its generation (`tunepipe.tasks.chat.generation.greedy_answers`) in this process: a first call (capture included),
   then a second (steady state); and one batch's prefill and decode-step times.
3. Baselines in the same run: `model.generate` one prompt at a time (on the first `--baseline-prompts`
   prompts: one at a time, all of them would take too long), and batched with its default dynamic cache
   (`--no-baselines`: not run).

`--patches-off transformers` sets `TUNEPIPE_PATCHES` for this process and the stage's worker before any patch is
asked for: the decoder then runs transformers' public path (its SDPA attention and RMSNorm forwards) instead of
`tunepipe.tasks.patches.transformers`. Like for like: run it and the default in the same call.

    python benchmarks/eval_throughput.py --tokenizer .gpu/tok [--out results.json] [--profile] [--patches-off LIBS]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_train import QWEN3_0_6B, load_tokenizer

WORDS = ("price", "kettle", "steel", "black", "brand", "lamp", "garden", "table", "warranty", "shipping")


def build_model(tokenizer_source: Path, out_dir: Path) -> Path:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tokenizer = load_tokenizer(tokenizer_source)
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **QWEN3_0_6B,
    )
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def conversations(tokenizer, n: int, seed: int = 0) -> list[list[dict]]:
    """n chat prompts whose rendered length is uniform in 100-200 tokens."""
    from tunepipe.tasks.chat.generation import render_prompt

    rng = random.Random(seed)
    prompts = []
    while len(prompts) < n:
        target = rng.randint(100, 200)
        words: list[str] = []
        conversation = [{"role": "user", "content": ""}]
        while len(render_prompt(tokenizer, conversation)) < target:
            words.append(rng.choice(WORDS) + str(rng.randint(0, 999)))
            conversation = [{"role": "user", "content": " ".join(words)}]
        prompts.append(conversation)
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--baseline-prompts", type=int, default=8)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--profile", action="store_true", help="print the top GPU kernels of a decode step")
    parser.add_argument("--no-baselines", action="store_true", help="skip `model.generate` (part 3)")
    parser.add_argument(
        "--patches-off", metavar="LIBS", help="TUNEPIPE_PATCHES for this run, e.g. transformers (off: all)"
    )
    args = parser.parse_args()
    from tunepipe.tasks.patches import OFF_SWITCH, enabled
    from tunepipe.tasks.patches import transformers as transformers_patches

    if args.patches_off:  # before anything asks `enabled`, which keeps its first answer for the process
        os.environ[OFF_SWITCH] = args.patches_off

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunepipe.tasks.chat.examples import Message
    from tunepipe.tasks.chat.generation import GreedyDecoder, greedy_answers, render_prompt, stop_token_ids
    from tunepipe.tasks.chat.template import ChatContext
    from tunepipe.tasks.evaluate.worker import GenerationRequest, GenerationResult, ModelToScore
    from tunepipe.tasks.runtime.worker import run_worker

    work = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    model_dir = build_model(args.tokenizer, work / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = conversations(tokenizer, args.prompts)
    lengths = [len(render_prompt(tokenizer, c)) for c in prompts]
    # Eval loss rows: each prompt followed by a 64-token "answer", as formatted held-out rows look.
    rows_path = work / "eval.jsonl"
    with rows_path.open("w") as out:
        for conversation in prompts:
            ids = render_prompt(tokenizer, conversation)
            answer = [random.Random(len(ids)).randrange(1000, 100_000) for _ in range(args.new_tokens)]
            out.write(json.dumps({"input_ids": ids + answer, "labels": [-100] * len(ids) + answer}) + "\n")
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "prompts": args.prompts,
        "prompt_tokens": [min(lengths), max(lengths)],
        "new_tokens": args.new_tokens,
        "batch_size": args.batch_size,
        "patches_off": os.environ.get(OFF_SWITCH),
        "transformers_patches": enabled("transformers", transformers_patches.PROVEN),
    }

    # 1. The stage's worker, as the evaluate stage starts it.
    request = GenerationRequest(
        models=[ModelToScore(name="candidate", weights=str(model_dir), tokenizer=str(model_dir))],
        conversations=[[Message(**m) for m in c] for c in prompts],
        loss_rows=rows_path,
        max_new_tokens=args.new_tokens,
        batch_size=args.batch_size,
        chat=ChatContext(),
    )
    started = time.perf_counter()
    stage = run_worker("tunepipe.tasks.evaluate.worker:generate_outputs", request, GenerationResult, work / "worker")
    stage_s = time.perf_counter() - started
    outputs = stage.outputs["candidate"]
    generated = args.prompts * args.new_tokens
    results["stage"] = {
        "wall_s": round(stage_s, 2),
        "generate_s_with_capture": round(outputs.generate_s, 3),
        "gen_tokens_per_s_with_capture": round(generated / outputs.generate_s),
        "stopped_early": sum(outputs.stopped),
        "device": outputs.device,
    }
    print(json.dumps(results["stage"]), flush=True)

    # 2. The same generation code in this process: first call, then steady state.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to("cuda").eval()
    for name in ("first_call", "second_call"):
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            answers = greedy_answers(model, tokenizer, prompts, args.new_tokens, args.batch_size)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        results[name] = {
            "s": round(seconds, 3),
            "gen_tokens_per_s": round(generated / seconds),
            "stopped_early": sum(a.stopped for a in answers),
        }
        print(name, json.dumps(results[name]), flush=True)
    # Where a batch's time goes: prefill alone (1 new token), then prefill + decode.
    stops = stop_token_ids(model, tokenizer)
    batch = [render_prompt(tokenizer, c) for c in prompts[: args.batch_size]]
    decoder = GreedyDecoder(model, len(batch), max(map(len, batch)) + args.new_tokens, stops, tokenizer.pad_token_id)
    seconds = {}
    for new_tokens in (1, args.new_tokens, 1, args.new_tokens):
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            decoder.run(batch, new_tokens)
        torch.cuda.synchronize()
        seconds[new_tokens] = time.perf_counter() - started  # the second of each pair: warm
    results["one_batch"] = {
        "prefill_ms": round(seconds[1] * 1000, 1),
        "decode_step_ms": round((seconds[args.new_tokens] - seconds[1]) * 1000 / (args.new_tokens - 1), 2),
    }
    print("one batch", json.dumps(results["one_batch"]), flush=True)
    if args.profile:  # the GPU kernels of three decode steps, run eagerly (the graph replays the same kernels)
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode():
            decoder.run(batch, 1)  # a fresh prefill: room in the cache for the steps below
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                decoder._step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
    same = sum(a.text == b for a, b in zip(answers, outputs.answers))
    results["same_answers_as_stage"] = f"{same}/{len(answers)}"
    if args.no_baselines:
        finish(results, args.out)
        return

    # 3. Baselines: plain generate (transformers' own SDPA attention), one prompt at a time, then batched.
    model.set_attn_implementation("sdpa")
    new_tokens = 0
    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        for conversation in prompts[: args.baseline_prompts]:
            ids = torch.tensor([render_prompt(tokenizer, conversation)], device="cuda")
            out = model.generate(
                ids,
                max_new_tokens=args.new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens += out.shape[1] - ids.shape[1]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    results["baseline_one_at_a_time"] = {
        "prompts": args.baseline_prompts,
        "gen_tokens": new_tokens,
        "s": round(seconds, 2),
        "gen_tokens_per_s": round(new_tokens / seconds, 1),
    }
    print("baseline", json.dumps(results["baseline_one_at_a_time"]), flush=True)

    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch,
            max_new_tokens=args.new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    results["generate_batched_dynamic_cache"] = {
        "s": round(seconds, 2),
        "gen_tokens_per_s": round(args.prompts * (out.shape[1] - batch["input_ids"].shape[1]) / seconds),
    }
    print("batched generate", json.dumps(results["generate_batched_dynamic_cache"]), flush=True)
    finish(results, args.out)


def finish(results: dict, out: Path | None) -> None:
    print(json.dumps(results, indent=2))
    if out:
        out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
