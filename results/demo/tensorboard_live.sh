#!/usr/bin/env bash
# A running `make demo` seen from TensorBoard before it ends: the event reader polls the run's
# tb/ folder while it trains (every point it sees, with the run's state at that moment), a
# `tensorboard --logdir` serves the same folder, and headless Chromium takes a screenshot of its
# page while the run is still going.
#
#   results/demo/tensorboard_live.sh OUT_DIR [SCREENSHOT.png]
#
# Run from the root of a checkout after `make setup` (Chromium: Debian's `chromium`). Writes
# OUT_DIR/log.txt (what the reader saw, when) and the screenshot (default OUT_DIR/tensorboard.png).
set -euo pipefail
out=${1:?OUT_DIR}
shot=${2:-$out/tensorboard.png}
run=runs/demo-tb
py=.venv/bin/python
mkdir -p "$out"
log=$out/log.txt
: > "$log"
git rev-parse HEAD > "$out/code.txt"
rm -rf "$run" "$run-timing.json"
tb=""

seen() {  # the test/acc steps the event reader finds now, and the run's state
  $py - "$run" <<'PY'
import glob, json, os, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
run = sys.argv[1]
state = "running"
if os.path.exists(os.path.join(run, "status.json")):
    state = json.load(open(os.path.join(run, "status.json"))).get("state", "?")
steps = []
if glob.glob(os.path.join(run, "tb", "events.*")):
    acc = EventAccumulator(os.path.join(run, "tb"))
    acc.Reload()
    if "test/acc" in acc.Tags()["scalars"]:
        steps = [(e.step, round(100 * e.value, 2)) for e in acc.Scalars("test/acc")]
print(f"{state} test/acc (step, %): {steps}")
PY
}

watch() {  # beside the run: what the reader sees every 5 s once event files exist, a screenshot
  local shot_taken=0 now
  while [ ! -f "$run/status.json" ] || grep -q '"state": "running"' "$run/status.json"; do
    # no reader while the profile measures (a reader's CPU would be in its timings)
    if ! ls "$run"/tb/events.* >/dev/null 2>&1; then sleep 5; continue; fi
    # TensorBoard started once training runs, in its own session with no inherited descriptors:
    # started beside `profile`, it held Open MPI's singleton start-up (the profile's orted) until
    # it was killed (seen here, 2026-12-04)
    if [ -z "$tb" ]; then
      setsid $py -m tensorboard.main --logdir "$run/tb" --port 6006 --host 127.0.0.1 \
        < /dev/null > "$out/tensorboard-server.log" 2>&1 &
      tb=$!
      echo "$tb" > "$out/tensorboard.pid"
    fi
    now=$(seen)
    echo "$(date -u +%T) $now" >> "$log"
    # two evaluations in and the run still going: the page TensorBoard serves now
    if [ $shot_taken = 0 ] && [[ $now == running* ]] && [ "$(grep -o '(' <<< "${now#*: }" | wc -l)" -ge 2 ]; then
      chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$(mktemp -d)" --window-size=1400,1000 --virtual-time-budget=20000 \
        --screenshot="$shot" "http://127.0.0.1:6006/?darkMode=false#timeseries&tagFilter=test" \
        >> "$out/chromium.log" 2>&1 && shot_taken=1
      echo "$(date -u +%T) screenshot $shot taken while: $(seen)" >> "$log"
    fi
    sleep 5
  done
}
watch &
watcher=$!
trap 'kill $watcher 2>/dev/null; [ -f "$out/tensorboard.pid" ] && kill "$(cat "$out/tensorboard.pid")" 2>/dev/null || true' EXIT
echo "make demo DEMO_OUT=$run (started $(date -u +%FT%TZ))" >> "$log"
make demo DEMO_OUT=$run > "$out/make-demo.log" 2>&1  # in the foreground, as a user runs it
kill $watcher 2>/dev/null || true
echo "$(date -u +%T) after the run: $(seen)" >> "$log"
cat "$log"
