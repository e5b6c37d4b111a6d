#!/usr/bin/env bash
# One short GPU check (run from the repository root on a CUDA machine; about 5 minutes):
#   pinned staging on CUDA against the pinned device-to-host copy floor and DCP async_save on the
#   same state, the CUDA unit tests, and a description of the machine. Results go to $OUT (the
#   device tool's folder) or perf/results, as JSON/markdown/PNG named *_cuda.*.
#   Usage: bash perf/gpu_check.sh            PYTHON=/path/to/python bash perf/gpu_check.sh
set -u
OUT_DIR=${OUT:-perf/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TMPDIR=${TMPDIR:-/tmp}

# 1. What this machine has; stop with a readable reason when something is missing (no network here).
"$PY" - "$OUT_DIR/gpu_env.json" <<'PYEOF'
import json, sys, importlib, platform, subprocess
env = {"python": platform.python_version()}
for name in ("torch", "safetensors", "zstandard", "xxhash", "matplotlib", "pytest"):
    try:
        env[name] = getattr(importlib.import_module(name), "__version__", "present")
    except Exception as exc:
        env[name] = f"MISSING: {type(exc).__name__}: {exc}"
try:
    import torch
    env["cuda_available"] = torch.cuda.is_available()
    env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    env["torch_cuda"] = torch.version.cuda
except Exception as exc:
    env["cuda_available"] = False
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current", "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as exc:
    env["nvidia_smi"] = f"unavailable: {exc}"
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env, indent=2))
missing = [k for k, v in env.items() if isinstance(v, str) and v.startswith("MISSING") and k not in ("matplotlib", "pytest")]
sys.exit(3 if missing or not env.get("cuda_available") else 0)
PYEOF
status=$?
if [ $status -ne 0 ]; then echo "gpu_check: environment not usable (see $OUT_DIR/gpu_env.json)"; exit $status; fi

# 2. CUDA unit tests of the staging pool (pinned buffers, side stream, incremental, overlap).
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_staging_cuda.py 2>&1 | tail -15 | tee "$OUT_DIR/gpu_tests.txt"
fi

# 3. Stall against the pinned device-to-host floor and DCP async_save (default, reused, pinned, cached stagers).
timeout 420 "$PY" -m perf.stall --device cuda --sizes 512,2048 --repeat 3 --lora 0.9 --lora-sizes 2048 \
  --methods async_ckpt,async_ckpt_cold,raw_write,dcp_async_default,dcp_async_reused \
  --out "$OUT_DIR" --name stall_cuda 2>&1 | tail -40
echo "gpu_check: done; results in $OUT_DIR"
