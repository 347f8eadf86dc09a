"""launchers/stage2.py with rank 1's resume catch-up made `SLOW_CATCH_UP_S` seconds slower (as if its
readers decompressed a long way further): tests/test_stream_waits.py runs it under torchrun."""

import os
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dualner.data.streaming import Stage2Stream  # noqa: E402

if os.environ.get("RANK") == "1":
    catch_up = Stage2Stream.catch_up

    def slow_catch_up(self) -> None:
        time.sleep(float(os.environ["SLOW_CATCH_UP_S"]))
        catch_up(self)
    Stage2Stream.catch_up = slow_catch_up

sys.argv[0] = str(REPO / "launchers" / "stage2.py")
runpy.run_path(sys.argv[0], run_name="__main__")
