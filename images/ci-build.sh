#!/usr/bin/env bash
# Build one target of images/docker-bake.json with a registry build cache; push it when PUSH=true.
# .github/workflows/images.yml runs this once per image; it works by hand too (after `docker login`).
#   usage: images/ci-build.sh <target> [<base target>]     e.g. images/ci-build.sh eps-generate eps-base-gpu
#   env:   REGISTRY ("<registry host>/<org>"), TAG (git sha), BRANCH_TAG, GIT_SHA: the bake variables
#          PUSH=true to push the image and write the cache (pull requests only read it)
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: $0 <target> [<base target>]" >&2
  exit 2
fi
target="$1"
base="${2:-}"
: "${REGISTRY:?REGISTRY must be set (<registry host>/<org>)}"
export REGISTRY TAG="${TAG:-dev}" BRANCH_TAG="${BRANCH_TAG:-dev-branch}" GIT_SHA="${GIT_SHA:-unknown}"

cache="${REGISTRY}/eps-buildcache"
args=(buildx bake --file images/docker-bake.json --progress plain)
for t in $base "$target"; do
  args+=(--set "${t}.cache-from=type=registry,ref=${cache}:${t}")
done
if [[ "${PUSH:-false}" == "true" ]]; then
  args+=(--push --set "${target}.cache-to=type=registry,ref=${cache}:${target},mode=max,image-manifest=true")
fi
args+=("$target")

echo "+ docker ${args[*]}"
exec docker "${args[@]}"
