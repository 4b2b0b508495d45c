#!/bin/bash
# Rebuilds docs/results.md from run folders under $RUNS (default ${RUNS:-/work/runs}): results copied without stores, the report, the tables.
set -e
cd "$(git rev-parse --show-toplevel)"
for m in gemma3-270m smollm2-135m qwen2.5-0.5b; do tools/results/collect.sh ${RUNS:-/work/runs}/$m $m >/dev/null; done
tools/results/collect.sh ${RUNS:-/work/runs}/qwen15 qwen2.5-1.5b >/dev/null
R="docs/results/gemma3-270m docs/results/smollm2-135m docs/results/qwen2.5-0.5b docs/results/qwen2.5-1.5b"
rm -rf docs/results/figures docs/results/report.html
COLUMNS=250 VSTORE_NO_PROGRESS=1 vstore report $R --out docs/results/report.html > /tmp/report_terminal.txt 2>&1
{ cat tools/results/head.md tools/results/findings.md; echo; echo "## The tables"; echo; echo '`python tools/results_tables.py docs/results/gemma3-270m docs/results/smollm2-135m docs/results/qwen2.5-0.5b docs/results/qwen2.5-1.5b`:'; echo; python tools/results_tables.py $R; python tools/results/status.py; } > docs/results.md
ls docs/results/figures | wc -l
