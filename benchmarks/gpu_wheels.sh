#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_check.py needs on a lent GPU machine and that its image lacks
# (it has torch, peft, accelerate, numpy, tokenizers, safetensors, jaxtyping, einops, pandas, an older
# transformers; Python 3.12, x86-64). Versions come from constraints.txt; wheels land in .whl/ (git-ignored
# through .git/info/exclude), about 30 MB, which travel with the working tree. There:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py --out "$OUT/gpu_check.json"
set -euo pipefail
cd "$(dirname "$0")/.."
NEEDED="transformers huggingface-hub httpx2 httpcore2 transformer-lens better-abc fancy-einsum beartype typeguard
datasets dill multiprocess plotly truststore googleapis-common-protos"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
for name in $NEEDED; do
    pin=$(grep -iE "^${name}==" constraints.txt | head -1)
    [ -n "$pin" ] || { echo "gpu_wheels: $name is not pinned in constraints.txt" >&2; exit 1; }
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$pin" 2>&1 | sed "/is ignored: it is neither/d"
done
du -sh .whl
