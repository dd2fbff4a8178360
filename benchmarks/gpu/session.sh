#!/usr/bin/env bash
# Everything issue #5 needs from a lent GPU, in as few device calls as possible (device tool: ≤ 600 s a call,
# 30 min a session). Run from the repository root, with the wheels of carry_wheels.sh carried along:
#
#   benchmarks/gpu/carry_wheels.sh                              # here, once: .gpu_wheels/ (≈ 23 MB)
#   run(command="COMMIT=<sha> bash benchmarks/gpu/session.sh 1", carry=[".gpu_wheels"])  # tests + bf16 benchmark
#   run(command="bash benchmarks/gpu/session.sh 2", carry=[".gpu_wheels"])   # graph timer, fp16, block variants
#   run(command="bash benchmarks/gpu/session.sh 3", carry=[".gpu_wheels"])   # SD1.4 training-step benchmark
#
# Each numbered call is sized to stay well inside the device tool's 600 s per call (estimates, not yet timed).
# Parts: env | tests | bench | bench-extra | step, or 1 (= env tests bench), 2 (= env bench-extra), 3 (= env step),
# all. Every part writes under
# $OUT (the device tool's output folder; benchmarks/results/gpu_session otherwise): env.txt, pytest_gpu.{txt,xml},
# results/grounded_attention.csv + summaries + plots, results/step_time.jsonl, one log per command. A failing
# command does not stop the others; the last lines printed are the summaries (the device tool returns the tail).
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
PART=${1:-1}
OUT=${OUT:-$REPO/benchmarks/results/gpu_session}
PY=${PYTHON:-python3}
mkdir -p "$OUT/results"
STATUS=()

# the carried wheels go into a private directory first on the path: the image's own packages stay untouched
if compgen -G ".gpu_wheels/*.whl" >/dev/null; then
    SITE=${TMPDIR:-/tmp}/tcscale_site
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .gpu_wheels/*.whl >"$OUT/pip.log" 2>&1 \
        || { echo "installing .gpu_wheels failed, see pip.log"; tail -5 "$OUT/pip.log"; }
    export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    echo "no .gpu_wheels carried: the step benchmark needs diffusers (benchmarks/gpu/carry_wheels.sh)"
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET

step() {  # step NAME CMD...: run, log to $OUT/NAME.log, remember the exit status and the wall time
    local name=$1
    shift
    local t0=$SECONDS
    echo "== $name: $*"
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    STATUS+=("$name rc=$rc $((SECONDS - t0))s")
    tail -3 "$OUT/$name.log"
}

part_env() {
    {
        date -u +%Y-%m-%dT%H:%M:%SZ
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
            --format=csv 2>&1
        "$PY" - <<'EOF'
import importlib.metadata as m, platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__)
for name in ("diffusers", "transformers", "tokenizers", "huggingface_hub", "omegaconf", "numpy"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "missing")
p = torch.cuda.get_device_properties(0)
print("device", p.name, "SMs", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1))
EOF
        # the device tool copies the working tree without .git: pass COMMIT=$(git rev-parse HEAD) in the command
        git -C "$REPO" log -1 --format='commit %H %s' 2>/dev/null || echo "commit ${COMMIT:-unknown (set COMMIT=...)}"
    } >"$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
}

part_tests() {
    step pytest_gpu "$PY" -m pytest -m gpu -v -p no:cacheprovider -o addopts="" \
        tests/test_kernel_grounded_attention.py tests/test_fused_integration.py --junitxml="$OUT/pytest_gpu.xml"
    cp "$OUT/pytest_gpu.log" "$OUT/pytest_gpu.txt"
}

BENCH=benchmarks/bench_grounded_attention.py

part_bench() {
    step bench_kernel_bf16_eager "$PY" $BENCH --dtype bf16 --out-dir "$OUT/results"
}

part_bench_extra() {
    local bench=$BENCH
    step bench_kernel_bf16_graph "$PY" $bench --dtype bf16 --timer graph --modes forward,full --out-dir "$OUT/results"
    step bench_kernel_fp16_eager "$PY" $bench --dtype fp16 --modes full --out-dir "$OUT/results"
    # block-size variants where the compile check shows the default's trade-offs (d = 80 backward spills 364 B with
    # one 128-wide head-dim chunk; block_d=64 has no spills but recomputes S and dP per chunk)
    step bench_kernel_variants "$PY" $bench --dtype bf16 --models sd14 --modes full --out-dir "$OUT/results/variants" \
        --providers "fused,fused[block_d=64],fused[block_m_bwd=16],fused[block_m_fwd=64],fused[num_splits=1]"
}

part_step() {
    step bench_step_sd14 "$PY" benchmarks/bench_step.py --arch sd14 --resolution 512 --batch 4 --steps 20 \
        --out "$OUT/results/step_time.jsonl"
}

case $PART in
    env) part_env ;;
    tests) part_env; part_tests ;;
    bench) part_env; part_bench ;;
    bench-extra | 2) part_env; part_bench_extra ;;
    1) part_env; part_tests; part_bench ;;
    step | 3) part_env; part_step ;;
    all) part_env; part_tests; part_bench; part_bench_extra; part_step ;;
    *) echo "unknown part '$PART' (env | tests | bench | bench-extra | step | 1 | 2 | 3 | all)"; exit 2 ;;
esac

echo
echo "== summaries"
for f in "$OUT"/results/grounded_attention_summary_*.md "$OUT"/results/variants/grounded_attention_summary_*.md; do
    [ -f "$f" ] && sed -n '1p;/^| /p;/^All targets/p' "$f"
done
[ -f "$OUT/pytest_gpu.txt" ] && grep -E "^(FAILED|ERROR)|passed|failed|skipped" "$OUT/pytest_gpu.txt" | tail -15
[ -f "$OUT/bench_step_sd14.log" ] && grep -E "ms \(p20" "$OUT/bench_step_sd14.log"
printf '%s\n' "${STATUS[@]}"
for s in "${STATUS[@]}"; do [[ $s == *"rc=0 "* ]] || exit 1; done
exit 0
