"""bench/gpu_speed.py runs on CPU with --small --check, without ray/deepspeed/hydra, and its fast paths agree
with the float64 reference."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Run the script with ray, deepspeed and hydra made unimportable, as if not installed (the GPU machine):
# a None entry in sys.modules makes `import x` fail and importlib.util.find_spec(x) return None.
RUNNER = """
import runpy, sys
for name in ("ray", "deepspeed", "hydra", "omegaconf"):
    sys.modules[name] = None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

LIMITS = {  # path substring → largest accepted relative error
    "float64": 1e-10, "float32": 1e-5, "bf16 stored": 5e-2, "bf16 cpu": 5e-2, "bf16 autocast": 0.1,
}


def test_small_run_with_checks(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(ROOT / "bench" / "gpu_speed.py"), "--small", "--device",
                           "cpu", "--check", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["forbidden_imports"] == []
    assert "| n | resident_s | term1_s | curvature_s | topk_s | load_s | pairs_per_s |" in proc.stdout
    assert result["stage1"][0]["stage1_ex_s"] > 0 and result["stage2"] and len(result["query"]) >= 2
    for path, error in result["check"].items():
        limit = next(v for k, v in LIMITS.items() if k in path)
        assert error < limit, (path, error)
