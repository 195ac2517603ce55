#!/usr/bin/env bash
# Optional: put the MovieLens-100k interactions into data_cache/ml-100k/u.data for
#   python train.py --config configs/rec_base.py --config.data.path=data_cache/ml-100k/u.data
#   python benchmarks/recsys.py --data data_cache/ml-100k/u.data
#
# The file comes from the recbole 1.2.1 wheel on PyPI, which ships it as
# recbole/dataset_example/ml-100k/ml-100k.inter (tab-separated, one header line of typed column
# names: user_id, item_id, rating, timestamp). This script downloads the wheel with pip (no
# dependencies, nothing installed), extracts that one member and drops the header, leaving
# the u.data layout that prism_jax.data.rec reads. The MovieLens licence forbids
# redistribution: data_cache/ is git-ignored, never commit what lands there.
#
# Usage: scripts/fetch_movielens.sh [destination directory, default data_cache/ml-100k]
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-data_cache/ml-100k}"
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
if [ -s "$dest/u.data" ]; then
  echo "fetch_movielens: $dest/u.data already exists"
  exit 0
fi
mkdir -p "$dest"
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT
"$python" -m pip download --quiet --no-deps --only-binary=:all: recbole==1.2.1 -d "$wheels"
"$python" - "$wheels" "$dest/u.data" <<'PY'
import glob, sys, zipfile

wheels, out = sys.argv[1], sys.argv[2]
member = "recbole/dataset_example/ml-100k/ml-100k.inter"
(wheel,) = glob.glob(f"{wheels}/recbole-1.2.1-*.whl")
with zipfile.ZipFile(wheel) as z:
  lines = z.read(member).decode("utf-8").splitlines()
header, rows = lines[0].split("\t"), lines[1:]
if [h.split(":")[0] for h in header] != ["user_id", "item_id", "rating", "timestamp"]:
  sys.exit(f"fetch_movielens: unexpected columns {header} in {member}")
with open(out, "w") as f:
  f.write("\n".join(rows) + "\n")
print(f"fetch_movielens: {len(rows)} interactions -> {out}")
PY
