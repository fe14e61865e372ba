#!/usr/bin/env bash
# Reproduces the dashboard's vendored browser files from the lockfile beside them
# (engine/src/dashboard/vendor/package-lock.json): `npm ci` in a scratch folder, then each file the
# dashboard embeds (or, for axe-core, the browser tests inject) with its package's license. Run it
# after changing a version in package.json (`npm install --package-lock-only` there first), and
# commit what changed; `git diff --exit-code` after it shows the committed files are the packages'.
set -euo pipefail
cd "$(dirname "$0")/.."
vendor=engine/src/dashboard/vendor
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cp "$vendor/package.json" "$vendor/package-lock.json" "$scratch/"
(cd "$scratch" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
modules="$scratch/node_modules"
copy() { install -m 0644 "$modules/$1" "$vendor/$2"; }
copy htmx.org/dist/htmx.min.js htmx.min.js
copy htmx.org/LICENSE htmx.LICENSE
copy uplot/dist/uPlot.iife.min.js uPlot.iife.min.js
copy uplot/dist/uPlot.min.css uPlot.min.css
copy uplot/LICENSE uplot.LICENSE
copy axe-core/axe.min.js axe.min.js
copy axe-core/LICENSE axe-core.LICENSE
echo "vendored into $vendor:"
ls -l "$vendor"
