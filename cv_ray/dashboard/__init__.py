"""The run dashboard: static pages in the run directory, written as the run goes, no server needed.

Open it in a browser from the run directory (the driver prints the path when a run starts and ends):

    chromium runs/tiny_cpu/dashboard/index.html       # or: xdg-open / open / any browser, file:// is enough

It shows, and refreshes every few seconds while the run is going:

* the overview: curves over steps for SFT, RL and validation (reward total and each reward term,
  accuracy, tool-call and valid-call rates, tool errors by class, response length, KL, entropy,
  time per phase), the tool-use collapse alarms, every logged step, and the evaluation report;
* a step: its trajectories, sortable and filterable by reward, correctness, stop reason, error class;
* a trajectory: each turn's text and highlighted code, the image each call read beside the image it
  returned, crop boxes and tool outputs drawn on image 0, the ops the sandbox recognised and whether
  it verified them, the reward term by term, token counts.

Written by :class:`cv_ray.tracking.Tracker` through :class:`Dashboard` (cv_ray/dashboard/writer.py);
the pages are cv_ray/dashboard/static/ (plain HTML, CSS and JavaScript, no network); data files are
loaded with ``<script>`` tags because browsers refuse ``fetch()`` from ``file://`` pages.
"""

from cv_ray.dashboard.samples import RolloutSample
from cv_ray.dashboard.writer import Dashboard

__all__ = ["Dashboard", "RolloutSample"]
