set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
timeout 100 python3 benchmarks/attention.py --cases layer-asa-global-compiled --T 8192,65536 --out $OUT/h200-compiled-global.json > $OUT/layers.log 2>&1; echo "layers rc=$?"; grep -i "error" $OUT/layers.log | head -3; tail -4 $OUT/layers.log
timeout 270 python3 benchmarks/train_throughput.py --configs configs/340m/asa.yaml configs/340m/full.yaml configs/340m/nsa.yaml --steps 6 --warmup 3 --out $OUT/h200-train.json > $OUT/train.log 2>&1; echo "train rc=$?"; grep -v "^W1130" $OUT/train.log | tail -9
