#!/usr/bin/env bash
# Build one base and every image on it in one `docker buildx bake` (the bake file's group cpu or gpu), with a
# registry build cache for the base; push them all when PUSH=true.
# .github/workflows/images.yml runs this once per base; it works by hand too (after `docker login`).
#   usage: images/ci-build.sh <cpu|gpu>
#   env:   REGISTRY ("<registry host>/<org>"), TAG (git sha), BRANCH_TAG, GIT_SHA: the bake variables
#          PUSH=true to push the images and write the cache (pull requests only read it)
set -euo pipefail

if [[ $# -ne 1 || ! "$1" =~ ^(cpu|gpu)$ ]]; then
  echo "usage: $0 <cpu|gpu>" >&2
  exit 2
fi
group="$1"
base="eps-base-${group}"
: "${REGISTRY:?REGISTRY must be set (<registry host>/<org>)}"
export REGISTRY TAG="${TAG:-dev}" BRANCH_TAG="${BRANCH_TAG:-dev-branch}" GIT_SHA="${GIT_SHA:-unknown}"

# the base holds every dependency (GBs); the stage images on it are thin and build in seconds
cache="${REGISTRY}/eps-buildcache:${base}"
args=(buildx bake --file images/docker-bake.json --progress plain --set "${base}.cache-from=type=registry,ref=${cache}")
if [[ "${PUSH:-false}" == "true" ]]; then
  args+=(--push --set "${base}.cache-to=type=registry,ref=${cache},mode=max,image-manifest=true")
fi
args+=("$group")

echo "+ docker ${args[*]}"
exec docker "${args[@]}"
