#!/bin/bash
# copy a run folder's results (no store, no npz) into docs/results/<name>
src=$1; name=$2; dst=/work/main/docs/results/$name
rm -rf $dst; mkdir -p $dst
cd $src
for f in study.json summary.json scorer.json ablation.json ablation-exclusive.json compare.json cards.json; do [ -f $f ] && cp $f $dst/; done
[ -d neurons ] && mkdir -p $dst/neurons && cp neurons/*.json $dst/neurons/
[ -d dose ] && mkdir -p $dst/dose && cp dose/*.json $dst/dose/
du -sh $dst
