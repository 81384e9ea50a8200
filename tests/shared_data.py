"""Where tests find the real sample data: ``../shared/data`` beside the repository, or the directory
named by ``RYNNSCALE_SHARED_DATA``. Tests that need it skip with a reason when it is absent."""

import os
from pathlib import Path

SHARED_DATA = Path(os.environ.get("RYNNSCALE_SHARED_DATA",
                                  Path(__file__).resolve().parents[1] / ".." / "shared" / "data")).resolve()
