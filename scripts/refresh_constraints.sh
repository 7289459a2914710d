#!/usr/bin/env bash
# Move the tested package set forward, deliberately: in a fresh clone of HEAD (with ../shared beside it, as CI has),
# install the newest versions pyproject.toml allows (QCOMPILER_UNPINNED=1 scripts/setup.sh), run the whole CI there
# (`CI=true bash .ci/run`), and only if it passes rewrite constraints.txt from that venv's `pip freeze --all`.
# Then review `git diff constraints.txt`, and commit it with the CI log's summary.
#   bash scripts/refresh_constraints.sh [WORKDIR]     (default: a new folder under /tmp; kept for inspection)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${1:-$(mktemp -d /tmp/qcompiler-refresh.XXXXXX)}
mkdir -p "$WORK"
[ -e "$WORK/shared" ] || ln -s "$(cd "$REPO/.." && pwd)/shared" "$WORK/shared"
rm -rf "$WORK/main"
git clone -q "$REPO" "$WORK/main"
echo "refresh: CI with unpinned dependencies in $WORK/main (log: $WORK/ci.log)"
if ! (cd "$WORK/main" && QCOMPILER_UNPINNED=1 CI=true bash .ci/run) >"$WORK/ci.log" 2>&1; then
  tail -40 "$WORK/ci.log"
  echo "refresh: CI failed with the newest versions; constraints.txt left as it is" >&2
  exit 1
fi
"$WORK/main/.venv/bin/python" -m pip freeze --all >"$WORK/freeze.txt"
.venv/bin/python -m scripts.write_constraints "$WORK/freeze.txt" -o constraints.txt
# the build backend as pip resolves [build-system].requires now (what the unpinned build above used)
"$WORK/main/.venv/bin/python" -m pip download -q -d "$WORK/build-wheels" \
  "$(.venv/bin/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires'])")"
.venv/bin/python -m scripts.write_constraints --build "$WORK/build-wheels" -o build-constraints.txt
git --no-pager diff --stat constraints.txt build-constraints.txt
