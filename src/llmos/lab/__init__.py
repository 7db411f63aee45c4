"""Labs: the lecture's figures redrawn from live measurements (`llmos lab NAME`).

Each lab runs the real engine (and the real allocator) on a workload it
builds, and writes NAME.json (every number the figure shows) and NAME.png
into the directory asked for, by default `<llmos home>/lab`, never the
current directory unasked. Guarantees: no figure holds a number that is not
in its JSON, and each JSON number comes from the run just made.
"""

from __future__ import annotations

from llmos.lab._common import LabResult, default_out_dir, run_lab

LABS = ("paging", "sharing", "switch", "sched", "context", "inject")

__all__ = ["LABS", "LabResult", "default_out_dir", "run_lab"]
