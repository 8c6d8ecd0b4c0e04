"""The suite's long runs (minutes each), started together so that they share the 2 cores.

* ``quickstart``: ``cv-ray`` with no arguments, the README's run command (tests/test_quickstart.py);
* ``async``: asynchronous RL from the quickstart's SFT model on its tasks, started as soon as that SFT
  is done (tests/test_quickstart.py);
* ``demo``: the learning demo's script at smoke size (tests/test_learning_demo_run.py).

One run alone leaves a core idle much of the time (the SFT learner, actor start-ups, the synchronous
loop's alternation of rollout and update); together they finish about two minutes sooner than one
after the other. Every run joins the session's Ray cluster (``RAY_ADDRESS``) and writes its output to
files (no pipe to fill). Only the runs whose tests were collected start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CV_RAY = str(Path(sys.executable).with_name("cv-ray"))
DEMO = REPO / "examples" / "learning_demo" / "run.py"
TIMEOUT_S = 1500
ASYNC_STEPS = 10
"""Steps 0 and 1 of an asynchronous run both sample the SFT policy (step 1's groups start while step 0
updates); 10 steps leave 8 after that baseline, as many as the synchronous run has."""

DEMO_SMOKE = ["trainer.name=smoke", "data.num_rl_tasks=8", "data.num_val_tasks=4", "data.num_sft_trajectories=16",
              "trainer.sft.max_steps=4", "trainer.rl.steps=2", "trainer.eval_every=1", "rollout.n_samples=2",
              "learner.mini_batch_size=16"]

#: Which runs each test module reads.
RUNS_OF_MODULE = {"test_quickstart.py": ("quickstart", "async"), "test_learning_demo_run.py": ("demo",)}


def wanted_runs(items) -> set[str]:
    """The runs the collected test items need."""
    return {run for item in items for run in RUNS_OF_MODULE.get(Path(str(item.fspath)).name, ())}


def sft_done(run_dir: Path) -> bool:
    """The driver rewrites summary.json after each stage; "sft" in it means sft_model/ is complete."""
    try:
        return "sft" in json.loads((run_dir / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or caught mid-write
        return False


class LongRuns:
    def __init__(self, root: Path, ray_address: str, wanted: set[str]) -> None:
        self.root = root
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ray_address}
        self.deadline = time.monotonic() + TIMEOUT_S
        self.processes: dict[str, subprocess.Popen] = {}
        self.quickstart_dir = root / "quickstart"
        self.async_dir = root / "quickstart_async"
        self.demo_dir = root / "demo" / "smoke"  # its own run root: each builds its tiny model under it
        self._lock = threading.Lock()
        if "demo" in wanted:
            self.demo_dir.parent.mkdir()
            self._start("demo", [sys.executable, str(DEMO), f"trainer.run_root={self.demo_dir.parent}", *DEMO_SMOKE])
        if "quickstart" in wanted or "async" in wanted:
            self._start("quickstart", [CV_RAY, f"trainer.run_root={root}"])
        if "async" in wanted:
            threading.Thread(target=self._start_async_after_sft, daemon=True).start()

    def _start(self, name: str, args: list[str]) -> None:
        with (self.root / f"{name}.out").open("w") as out, (self.root / f"{name}.err").open("w") as err:
            process = subprocess.Popen(args, stdout=out, stderr=err, text=True, env=self.env, cwd=self.root)
        with self._lock:
            self.processes[name] = process

    def _start_async_after_sft(self) -> None:
        quick = self.processes["quickstart"]
        while not sft_done(self.quickstart_dir) and quick.poll() is None and time.monotonic() < self.deadline:
            time.sleep(1.0)
        if sft_done(self.quickstart_dir):
            self._start("async", [
                CV_RAY, f"trainer.run_root={self.root}", "trainer.name=quickstart_async", "trainer.stage=rl",
                f"model.path={self.quickstart_dir / 'sft_model'}", f"data.dir={self.quickstart_dir / 'data'}",
                "trainer.rl.max_staleness=1", f"trainer.rl.steps={ASYNC_STEPS}"])

    def result(self, name: str) -> subprocess.CompletedProcess:
        """Wait for run ``name`` and return its exit status and output (it never started: exit 127)."""
        if name == "async":  # started by the watcher once the quickstart's SFT is done, or never
            self.result("quickstart")  # it ends after its SFT, which the async run starts from
            while "async" not in self.processes and sft_done(self.quickstart_dir) and time.monotonic() < self.deadline:
                time.sleep(0.5)  # the watcher polls once a second
        process = self.processes.get(name)
        if process is None:
            return subprocess.CompletedProcess([name], 127, "", f"the {name} run never started "
                                               "(for the async run: the quickstart's SFT stage never finished)")
        try:
            process.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return subprocess.CompletedProcess(process.args, process.returncode,
                                           (self.root / f"{name}.out").read_text(),
                                           (self.root / f"{name}.err").read_text())

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
