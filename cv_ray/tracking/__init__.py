"""What a run records: metrics (console, `metrics.jsonl`, the dashboard, wandb) and the tool-use collapse alarm.

`tracker.py` holds :class:`Tracker` (one run's loggers; see its module for the calls the driver
makes), `collapse.py` the alarm's pure detection. The dashboard it writes is cv_ray/dashboard/.
"""

from cv_ray.tracking.tracker import Tracker

__all__ = ["Tracker"]
