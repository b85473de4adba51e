"""The judge on the CPU with the test judge: calls per example, seconds per judged example, agreement with
exact match.

The examples are configs/rag-prose's test split (questions with two retrieved passages). Each gets two answers:
the reference itself (exact match 1), and the same sentence with the fact taken from the other retrieved
passage, about another product (exact match 0: the typical RAG slip, fluent and wrong). Which one is the
candidate alternates by example. The judge (`--judge`, default the packaged SmolLM2-135M-Instruct GGUF) is
served by llama-cpp-python's server exactly as `eval.judge: <file>.gguf` serves it, and asked pairwise in both
orders, free text ([[A]]/[[B]]/[[C]]) and structured (a JSON verdict), by `tunepipe.tasks.evaluate.judge.judge_report`.

Reported per format: judge calls per example (both orders, plus restated formats), seconds per judged example
(asking only: the server's start is given apart), order flips, unreadable verdicts, and agreement: among the
examples where exact match names a winner (one answer is the reference, the other is not: both products
may share the fact), the share where the judge's result (win / loss
after both orders) names the same one; ties and flips do not agree.

    python benchmarks/judge.py [--judge PATH.gguf] [--examples 12] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tunepipe.tasks.chat.examples import Example, Message
from tunepipe.tasks.evaluate.judge import judge_report
from tunepipe.tasks.evaluate.results import EvalReport, ModelScores
from tunepipe.tasks.runtime.config import GateConfig, JudgeConfig, load_config

CONFIG = Path("configs/rag-prose.yaml")


# The facts the product notes state, one sentence each (configs/rag-prose's data).
FACTS = (
    r"runs for \d+ hours on one charge\.",
    r"weighs \d+ grams\.",
    r"charges over USB-C in \d+ hours\.",
    r"comes with a \d+-year warranty\.",
    r"is rated IPX\d against water\.",
    r"comes in [a-z ]+\.",
)


def wrong_answer(example: Example) -> str:
    """The reference with its fact replaced by the same fact of the other product in the context."""
    reference, context = example.answer, example.prompt[-1].content
    fact = next(f for f in FACTS if re.search(f, reference))
    name = reference.removeprefix("The ").split(" " + re.search(fact, reference)[0])[0]
    other_passage = next(p for p in context.split("\n") if p.startswith("[") and not p.startswith(f"[{name}]"))
    other = other_passage[1:].split("]")[0]
    return re.search(f"The {re.escape(other)} {fact}", other_passage)[0].replace(other, name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--judge", default=str(Path("~/.cache/tunepipe/models/SmolLM2-135M-Instruct.Q4_1.gguf")))
    parser.add_argument("--examples", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(CONFIG)
    rows = [json.loads(line) for line in Path(cfg.data.eval).read_text().splitlines()][: args.examples]
    examples = [
        Example(
            id=f"ex{i}",
            source="eval.jsonl",
            line=i + 1,
            messages=[
                Message(role="system", content=cfg.data.system_prompt),
                *map(Message.model_validate, row["messages"]),
            ],
        )
        for i, row in enumerate(rows)
    ]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "eval.jsonl").write_text("".join(e.model_dump_json() + "\n" for e in examples))
        (root / "probes.jsonl").write_text("")
        answers = {"candidate": [], "base": []}
        with (root / "samples.jsonl").open("w") as out:
            for i, example in enumerate(examples):
                right, wrong = example.answer, wrong_answer(example)
                mine, theirs = (right, wrong) if i % 2 == 0 else (wrong, right)
                answers["candidate"].append(mine)
                answers["base"].append(theirs)
                out.write(
                    json.dumps(
                        {
                            "id": example.id,
                            "source": example.source,
                            "prompt": example.prompt[-1].content,
                            "expected": right,
                            **{
                                who: {"answer": a, "stopped": True, "scores": {"exact_match": float(a == right)}}
                                for who, a in (("candidate", mine), ("base", theirs))
                            },
                        }
                    )
                    + "\n"
                )
        report = EvalReport(
            n_samples=len(examples),
            candidate=ModelScores(name="candidate", metrics={}),
            base=ModelScores(name="base", metrics={}),
            champion=None,
            samples_path=root / "samples.jsonl",
            probes_path=root / "probes.jsonl",
        )
        for structured in (False, True):
            judge = JudgeConfig(
                model=args.judge,
                structured=structured,
                max_tokens=16 if structured else args.max_tokens,
                context_length=2048,
                max_unparsed=1.0,
                max_order_flips=1.0,
            )
            started = time.perf_counter()
            judged = judge_report(
                report, judge, root / "eval.jsonl", None, GateConfig(), root / f"judge-{structured}", root / "cache"
            )
            wall = time.perf_counter() - started
            s = judged.judge
            records = [json.loads(line) for line in s.judgments_path.read_text().splitlines()]
            # Where exact match names a winner: one answer is the reference, the other is not.
            decided = [r for r in records if (r["candidate"] == r["expected"]) != (r["base"] == r["expected"])]
            agree = sum(r["result"] == ("win" if r["candidate"] == r["expected"] else "loss") for r in decided)
            calls = sum(len(j["replies"]) for r in records for j in r["judgments"])
            results["structured" if structured else "free text"] = {
                "examples": s.n,
                "calls_per_example": calls / s.n,
                "asking_s_per_example": s.seconds / s.n,
                "server_start_and_stop_s": wall - s.seconds,
                "wins": s.wins,
                "ties": s.ties,
                "losses": s.losses,
                "order_flips": s.order_flips,
                "restated": s.restated,
                "unparsed": s.unparsed,
                "exact_match_decides": len(decided),
                "agreement_with_exact_match": agree / len(decided),
                "candidate_judge_win_rate": judged.candidate.metrics[s.metric],
                "first_replies": [r["judgments"][0]["replies"][0][:80] for r in records if r["judgments"]][:3],
            }
            print(json.dumps(results, indent=2), flush=True)


if __name__ == "__main__":
    main()
