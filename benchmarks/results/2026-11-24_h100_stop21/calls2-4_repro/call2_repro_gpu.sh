#!/usr/bin/env bash
# which compiled graph fails at step 2 of `dsv4 train --cuda-graph` (small preset), and whether dynamic=False avoids it
set -u
run() {   # run NAME SRC EXTRA_PY
  local name=$1 src=$2 extra=$3
  rm -rf /tmp/torchinductor_root /tmp/tr_$name
  PYTHONPATH=$src TORCH_LOGS="recompiles" timeout 150 python3 -c "
import sys, torch
$extra
from dsv4.cli import main
sys.exit(main(['train','--preset','small','--tokenizer','bytes','--steps','4','--batch','8','--seq','1024','--no-progress','--eval-every','0','--save-every','0','--out','/tmp/tr_$name','--cuda-graph']))
" > $OUT/$name.log 2>&1
  echo "$name exit $?"; wc -l < /tmp/tr_$name/log.jsonl
  f=$(grep -o "/tmp/torchinductor_root/[^\"]*\.py" $OUT/$name.log | tail -1)
  [ -n "$f" ] && cp "$f" $OUT/${name}_failing_graph.py
}
run now src ""
run dynfalse src "
import dsv4.model.mhc as m
_c = torch.compile
def comp(fn, dynamic=None, **k): return _c(fn, dynamic=False, **k)
m.torch.compile = comp  # only mhc's fused() looks torch.compile up through this module
"
run old .old_src/src ""
