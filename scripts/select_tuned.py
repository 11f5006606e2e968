"""Pick the best grid point per optimizer from `scripts/tune_fmnist_presets.sh`'s records.

Usage: python scripts/select_tuned.py RECORDS_DIR BEST_DIR
Prints every point and the selection (the smallest final full-training-set loss among the runs
that completed with a finite loss), and copies each selected record to
``BEST_DIR/<problem>/<label>/seed0.json`` so that ``curvlab report BEST_DIR`` plots the winners.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path


def main(records_dir: str, best_dir: str) -> int:
    records = {
        p: json.loads(p.read_text()) for p in sorted(Path(records_dir).glob("*/*/seed0.json"))
    }
    if not records:
        print(f"no records under {records_dir}", file=sys.stderr)
        return 1
    for name in sorted({rec["optimizer"] for rec in records.values()}):
        best: tuple[float, str, Path] | None = None
        for path, rec in records.items():
            if rec["optimizer"] != name:
                continue
            loss, status = rec["summary"]["final_train_loss"], rec["summary"]["status"]
            print(f"  {rec['label']:36s} {status:10s} {loss}")
            finite = status == "completed" and loss is not None and math.isfinite(loss)
            if finite and (best is None or loss < best[0]):
                best = (loss, rec["label"], path)
        if best is None:
            print(f"{name}: every point diverged")
            continue
        print(f"{name}: best {best[1]}, final train loss {best[0]:.2f}")
        target = Path(best_dir) / best[2].parent.parent.name / best[1] / "seed0.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(best[2], target)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
