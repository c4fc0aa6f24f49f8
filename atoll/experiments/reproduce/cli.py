"""Flags every reproduction script takes, defined once, and the start-up of
the ones that train.

absl refuses a flag defined twice in one process, and tests and notebooks
import several reproductions side by side; so `--preset`, `--out` and
`--show_progress` live here and each script reads them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags, logging

PRESETS = ("ci", "full")

PRESET = flags.DEFINE_enum("preset", "ci", list(PRESETS),
                           "ci: small enough for a 2-core CPU in minutes; full: the real study.")
OUT = flags.DEFINE_string("out", None, "Output directory: results.json, results.md, plots.")
SHOW_PROGRESS = flags.DEFINE_bool("show_progress", True, "Show progress bars.")


def out_dir_or_exit() -> str:
    """--out, or one clear message and exit status 2."""
    if not OUT.value:
        print("error: --out=DIR is required (where results.json, results.md and the plots go)", file=sys.stderr)
        sys.exit(2)
    return OUT.value


def start_training_run(num_devices: int) -> Path:
    """For scripts that train: XLA defaults, quiet orbax, `num_devices` host
    devices on a CPU; returns --out (or exits with one clear message)."""
    from atoll.parallel import runtime

    runtime.apply_xla_defaults()
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    out = Path(out_dir_or_exit())
    runtime.request_host_devices(num_devices)
    return out
