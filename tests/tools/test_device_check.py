"""benchmarks/device_check.sh runs end to end on CPU with tiny shapes (so it cannot rot)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_device_check_tiny_on_cpu():
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [os.path.join(ROOT, "benchmarks", "device_check.sh"), "--tiny", "--steps=1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["platform"] == "cpu" and result["model"] == "tiny"
    assert result["update_loss_finite"] and result["update_s"] > 0
    # the model FLOPs per step are fixed by the shapes: tokens x (6N + attention)
    tokens = 4 * 64
    per_token = 6 * result["params"] + 12 * 2 * 4 * 16 * 64
    assert result["update_flops_per_s"] * result["update_s"] == __import__("pytest").approx(
        tokens * per_token
    )
    assert result["mfu"] > 0 and result["peak_source"].startswith("measured")
    assert result["decode_rows"] == 8 and result["decode_tokens_per_s"] > 0
