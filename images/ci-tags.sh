#!/usr/bin/env bash
# For .github/workflows/images.yml: the registry prefix, its host and a tag-safe branch name, as step outputs.
#   in:  IMAGE_REGISTRY ("<registry host>/<org>", the repository variable), REF_NAME (branch), PUSH (true|false)
#   out: registry=<prefix> host=<registry host> branch=<tag-safe branch name>  (to $GITHUB_OUTPUT, else stdout)
set -euo pipefail

registry="${IMAGE_REGISTRY:-}"
registry="${registry%/}"
if [[ -z "$registry" ]]; then
  if [[ "${PUSH:-false}" == "true" ]]; then
    echo "::error::set the repository variable IMAGE_REGISTRY (<registry host>/<org>) to push images" >&2
    exit 1
  fi
  registry="local"  # pull requests build without pushing: any prefix will do
fi
host="${registry%%/*}"

# a tag is [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}: feature/x -> feature-x
branch="$(printf '%s' "${REF_NAME:-local}" | tr -c 'A-Za-z0-9_.-' '-' | cut -c1-128)"
while [[ "$branch" == [.-]* ]]; do branch="${branch:1}"; done
branch="${branch:-local}"

out="registry=$registry
host=$host
branch=$branch"
if [[ -n "${GITHUB_OUTPUT:-}" ]]; then
  printf '%s\n' "$out" >> "$GITHUB_OUTPUT"
else
  printf '%s\n' "$out"
fi
