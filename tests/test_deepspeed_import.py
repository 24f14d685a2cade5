"""A process that starts DeepSpeed through the project (launch_env.import_deepspeed: every run's
init_distributed, every export) does not import mlflow for DeepSpeed's autotuner (~1.2 s of CPU per process
start, every rank), and the mlflow tracker still imports the real package afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.train_helpers import REPO, SUBPROCESS_TIMEOUT_S, env

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from taid_vlm.train.launch_env import import_deepspeed

    ds = import_deepspeed()
    seen = {"deepspeed": "deepspeed" in sys.modules, "mlflow_after_deepspeed": "mlflow" in sys.modules,
            "autotuner_has_mlflow": ds.autotuning.autotuner.has_mlflow}
    import mlflow  # what train.report_to=mlflow does later in the run

    import_deepspeed()  # again, with mlflow loaded: a no-op that leaves it in place
    seen["tracker_mlflow"] = hasattr(sys.modules["mlflow"], "MlflowClient")
    print(json.dumps(seen))
    """
)


def test_deepspeed_starts_without_mlflow_and_the_tracker_still_gets_it():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env(), cwd=str(REPO), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"deepspeed": True, "mlflow_after_deepspeed": False, "autotuner_has_mlflow": False,
                    "tracker_mlflow": True}
