#!/usr/bin/env bash
# The GPU run of benchmarks/train_throughput.py: stand-ins at the real models' widths (4 layers each),
# bf16 compute, nf4 through the CUDA bitsandbytes kernels; JSON + log into $OUT.
#
# Two modes:
#
#   bash benchmarks/gpu_run.sh prepare
#       Here, on the CPU machine, once (needs network for pip and the fusion_llm venv).
#       Fills the git-ignored .whl/ with what the device image lacks or has in another version:
#         transformers==5.24.0 (image: 5.17.0; pyproject wants >=5.20), bitsandbytes==0.50.2 (absent;
#         trimmed to its CUDA 13 + CPU libraries: the full wheel is 43 MB, over the carry budget with the rest),
#         datasets==5.2.0 + dill==0.4.1 + multiprocess==0.70.19 (absent; only part 2, the feature cache,
#         needs them), regex==2026.5.9 (transformers checks regex>=2025.10.22 at import; the image's version
#         is not recorded, so it travels to be safe)
#       and .whl/fusion_llm_tokenizers.tar.xz (the four real tokenizers of $FUSION_LLM_CACHE, 56 MB -> ~6 MB).
#       Everything else (torch, accelerate 1.15.0, huggingface-hub 1.33.0, tokenizers 0.23.2, safetensors 0.8.0,
#       pyarrow, pandas, fsspec, xxhash, pyyaml, numpy, tqdm, typer, sentencepiece) is in the image.
#
#   bash benchmarks/gpu_run.sh [extra train_throughput.py options]
#       On the device machine (the `run` tool, carry [".whl"]), e.g.
#         run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=540)
#       Installs the carried wheels into /tmp/site (nothing else), unpacks the tokenizers into /tmp/flc (or uses
#       $FUSION_LLM_CACHE/tokenizers or a carried .flc/tokenizers when present), and runs
#         python3 benchmarks/train_throughput.py --device cuda --widths real --out $OUT/train_throughput.json
#       under a 420 s timeout (the JSON is rewritten after each part, so a cut-short run keeps what it measured).
#       Without tokenizers it still runs, on random token ids of each vocabulary size (the JSON says so).
#       Files back in $OUT: train_throughput.json, train_throughput.log, environment.txt.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

WHEELS=(transformers==5.24.0 bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 regex==2026.5.9)

prepare() {
    set -e
    grep -qx '/.whl/' .gitignore 2>/dev/null || grep -qx '/.whl/' .git/info/exclude 2>/dev/null \
        || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    local py="${PYTHON:-python3}"
    [ -x .venv/bin/python ] && py=.venv/bin/python
    "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "${WHEELS[@]}"
    # Trim bitsandbytes to the libraries a CUDA 13 torch (the image's 2.11.0+cu130) and the CPU backend load.
    "$py" - <<'EOF'
import base64, hashlib, re, zipfile
from pathlib import Path

for whl in Path(".whl").glob("bitsandbytes-*.whl"):
    keep = re.compile(r"bitsandbytes/libbitsandbytes_(cuda13\d|cpu)\.so$")
    with zipfile.ZipFile(whl) as zin:
        names = zin.namelist()
        drop = [n for n in names if n.endswith(".so") and not keep.search(n)]
        if not drop:
            print(f"{whl.name}: already trimmed")
            continue
        record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
        tmp = whl.with_suffix(".tmp")
        rows = []
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                if info.filename in drop or info.filename == record_name:
                    continue
                data = zin.read(info.filename)
                zout.writestr(info, data)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                rows.append(f"{info.filename},sha256={digest},{len(data)}")
            rows.append(f"{record_name},,")
            zout.writestr(record_name, "\n".join(rows) + "\n")
    tmp.replace(whl)
    print(f"{whl.name}: dropped {len(drop)} libraries ({', '.join(Path(d).name for d in drop)})")
EOF
    local cache="${FUSION_LLM_CACHE:-$HOME/.cache/fusion_llm}"
    if [ -f "$cache/tokenizers/llama3/tokenizer.json" ]; then
        tar -C "$cache" -cf - tokenizers | xz -T0 -6 > .whl/fusion_llm_tokenizers.tar.xz
    else
        echo "note: no tokenizers in $cache/tokenizers (run scripts/fetch_tokenizers.py); the GPU run will use random ids"
    fi
    ls -la .whl
    du -sh .whl
    echo "carry: .whl ($(du -sm .whl | cut -f1) MiB of the 64 MiB a call may carry)"
}

gpu() {
    echo "== $(date -u +%FT%TZ) gpu_run.sh on $(hostname)"
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || { echo "error: installing the carried wheels failed"; exit 3; }
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "note: no .whl/*.whl carried; using the image's packages only (bitsandbytes is not among them)"
    fi
    # Tokenizers: a carried cache, a carried .flc/, or the archive from `prepare`; stand-ins are built in /tmp/flc.
    local src=""
    for cand in "${FUSION_LLM_CACHE:-}/tokenizers" "$ROOT/.flc/tokenizers" "$ROOT/shared/fusion_llm_cache/tokenizers"; do
        if [ -f "$cand/llama3/tokenizer.json" ] || [ -f "$cand/mistral/tokenizer.json" ]; then src="$cand"; break; fi
    done
    mkdir -p /tmp/flc
    if [ -n "$src" ]; then
        [ "$src" != /tmp/flc/tokenizers ] && cp -r "$src" /tmp/flc/
    elif [ -f .whl/fusion_llm_tokenizers.tar.xz ]; then
        tar -C /tmp/flc -xJf .whl/fusion_llm_tokenizers.tar.xz
    else
        echo "note: no tokenizers carried: every backbone gets random token ids of its vocabulary size"
    fi
    export FUSION_LLM_CACHE=/tmp/flc HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME=/tmp/hf PYTHONUNBUFFERED=1 \
        TOKENIZERS_PARALLELISM=false
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
        python3 -c "import sys, torch, transformers, bitsandbytes, accelerate, huggingface_hub, tokenizers; \
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), \
'transformers', transformers.__version__, 'bnb', bitsandbytes.__version__, 'accelerate', accelerate.__version__, \
'hub', huggingface_hub.__version__, 'tokenizers', tokenizers.__version__)" 2>&1
        python3 -c "import datasets; print('datasets', datasets.__version__)" 2>&1 | tail -1
        ls /tmp/flc/tokenizers 2>&1
        df -h /tmp | tail -1
    } | tee "$OUT/environment.txt"
    timeout 420 python3 benchmarks/train_throughput.py --device cuda --widths real \
        --out "$OUT/train_throughput.json" "$@"
    local rc=$?
    echo "== train_throughput.py exit code $rc (124: cut at 420 s; the JSON holds the parts that finished)"
    rm -rf /tmp/flc/standins_real  # ~12 GB of random weights; the machine is given back anyway
    return $rc
}

if [ "${1:-}" = prepare ]; then
    shift
    prepare "$@"
else
    OUT="${OUT:-$ROOT/results/benchmarks}"
    mkdir -p "$OUT"
    gpu "$@" 2>&1 | tee "$OUT/train_throughput.log"
    exit "${PIPESTATUS[0]}"
fi
