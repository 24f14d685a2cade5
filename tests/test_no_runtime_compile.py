"""No C++ build at run time: a DeepSpeed start through the project's entry point compiles nothing
(DeepSpeed's CPU path would JIT-compile its shm_comm op with g++ at every process start that finds
no build; launch_env.skip_deepspeed_shm_op keeps it from doing so)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.train_helpers import REPO, env

SCRIPT = textwrap.dedent(
    """
    import torch, deepspeed
    from deepspeed.comm import comm as ds_comm
    from taid_vlm.train.launch_env import init_distributed

    init_distributed()
    model = torch.nn.Linear(4, 3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                      config={"train_micro_batch_size_per_gpu": 1})
    loss = engine(torch.ones(1, 4)).sum()
    engine.backward(loss)
    engine.step()
    print("SHM_OP", ds_comm.cdb.shm_comm_op)
    """
)


def test_deepspeed_start_compiles_nothing(tmp_path):
    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env={**env(), "TORCH_EXTENSIONS_DIR": str(extensions)},
                          capture_output=True, text=True, timeout=1800, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "SHM_OP None" in proc.stdout
    assert list(extensions.iterdir()) == [], "DeepSpeed built an extension at run time"
