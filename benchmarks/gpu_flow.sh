#!/usr/bin/env bash
# The whole flow on a GPU machine: `tunepipe run configs/demo.yaml` on a random-weight Qwen3-0.6B-shaped model,
# a first run and a cached re-run, printing each run's stage table and wall time (benchmarks/RESULTS.md).
#   bash benchmarks/gpu_flow.sh BACKEND TOKENIZER_DIR [OUT_DIR]     # BACKEND: auto | hf | unsloth
# TOKENIZER_DIR: a tokenizer folder (e.g. the tiny model's); nothing is downloaded. The gate is set so it cannot
# pass: the runs stop before export, for machines without llama-cpp-python. Evaluation asks each model 128
# prompts (126 held-out pages and the demo's 2 probes) in one batch, 64 new tokens each. On a machine whose
# packages have no bytecode (PYTHONDONTWRITEBYTECODE=1, as the lent GPU image), compile them first as pip would
# (`python3 -m compileall`, RESULTS.md): every process would otherwise compile torch's sources again.
set -u
backend=$1 tokenizer=$2 out=${3:-runs-gpu-flow}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; from gpu_train import build_model
build_model(Path('$tokenizer'), Path('/tmp/q06'))"
python3 -c "from pathlib import Path; from tunepipe.tasks.demo.data import write_demo_dataset; write_demo_dataset(Path('runs/demo-assets/data'), n_eval=126)"
sets=(--set model.base=/tmp/q06 --set model.max_seq_length=512 --set train.mode=lora --set "train.backend=$backend"
      --set train.max_steps=60 --set train.learning_rate=2e-4 --set train.lr_scheduler=linear
      --set train.warmup_steps=5 --set train.save_steps=20 --set eval.max_samples=126 --set eval.batch_size=128 --set eval.max_new_tokens=64
      --set gate.rules.eval_loss.max=0.001 --set retrain.max_attempts=1 --set "workdir=runs-$backend")
for attempt in first cached; do
  echo "=== tunepipe run ($backend, $attempt run)"
  start=$(date +%s.%N)
  python3 -c "import sys; from tunepipe.deployments.cli import main; sys.exit(main())" run configs/demo.yaml "${sets[@]}" \
    > "$out/run-$backend-$attempt.log" 2>&1
  echo "exit $? in $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
  grep -E "│|┃|not promoted|failed:" "$out/run-$backend-$attempt.log" | tail -45
done
