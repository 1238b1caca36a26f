#!/usr/bin/env bash
# Screenshots of TensorBoard for the README, from a real server in headless Chromium.
#   apt-get install -y chromium    (Debian's package)
#   python examples/digits.py && bash docs/screenshots.sh lightning_logs
set -euo pipefail
logdir=${1:-lightning_logs}
out=$(cd "$(dirname "$0")" && pwd)
port=${PORT:-6199}
tensorboard --logdir "$logdir" --host 127.0.0.1 --port "$port" --load_fast=false >/dev/null 2>&1 &
server=$!
trap 'kill $server' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/data/runs" >/dev/null && break; sleep 1; done
sleep 5
shot() {  # name, fragment
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$(mktemp -d)" --window-size=1500,1150 --hide-scrollbars \
    --virtual-time-budget=25000 --screenshot="$out/$1.png" "http://127.0.0.1:$port/#$2" 2>/dev/null
}
shot tensorboard_hessian "scalars&tagFilter=hessian%2F(eigenvalue|min|trace%24|eos)&_smoothingWeight=0&_ignoreYOutliers=false"
shot tensorboard_noise_sharpness "scalars&tagFilter=(noise%2F(temperature%24|gradient_noise_scale)|sharpness%2F(sam|adaptive|keskar|average%24)|trajectory%2F(barrier|distance_from_init))&_smoothingWeight=0&_ignoreYOutliers=false"
shot tensorboard_figures "images&tagFilter=(spectral_density|pca_landscape|loss_init_to_current|slice_2d)"
echo "screenshots in $out"
