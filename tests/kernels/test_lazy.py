"""The Mosaic GPU kernels stay unimported until something asks for them."""

import subprocess
import sys

_PROBE = """
import sys
import atoll.kernels
att = sys.modules["atoll.kernels.attention"]
gmm = sys.modules["atoll.kernels.grouped_matmul"]
loaded = lambda: sorted(m for m in sys.modules if m.endswith(".pallas_mgpu"))
assert loaded() == [], loaded()
assert att.attention_pallas.__name__ == "attention_pallas" and loaded() == [], loaded()
try:
    gmm.NoSuchThing
except AttributeError as e:
    assert "NoSuchThing" in str(e), e
else:
    raise SystemExit("no AttributeError")
assert gmm.BlockSizes is sys.modules["atoll.kernels.grouped_matmul.pallas_mgpu"].BlockSizes
assert loaded() == ["atoll.kernels.grouped_matmul.pallas_mgpu"], loaded()
assert att.BlockSizes.__module__ == "atoll.kernels.attention.pallas_mgpu"
print("ok")
"""


def test_mosaic_kernels_load_on_first_use():
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
