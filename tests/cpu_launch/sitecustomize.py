"""Test-only start-up hooks for the processes that tests/test_distributed.py launches (on PYTHONPATH there).

SFTMIX_TEST_FSDP2_ON_CPU=1: accelerate 1.15 runs FSDP as plain DDP when there is no GPU,
although torch's FSDP2 (`fully_shard`) works on CPU processes with gloo. This makes
accelerate take its real FSDP2 path (distributed type MULTI_GPU, device CPU, gloo); the
model is then sharded by `fully_shard`, which launch.json's engine check confirms.

SFTMIX_TEST_FAIL_SCORING=<rank>:<call>: that rank raises in its <call>-th scoring pass, as
a crash (out of memory, a dead node) would.

SFTMIX_TEST_RANKS_DIR=<dir>: every launched process writes rank-<RANK>-of-<WORLD_SIZE> there, so a
test can assert how many processes really ran (accelerate silently starts ONE where it cannot
start several); at exit it writes exit-<RANK>-in-group if its process group was still alive then
(left to Python's shutdown, gloo can abort a rank after a successful run).
"""

import atexit
import os
from pathlib import Path

if os.environ.get("SFTMIX_TEST_RANKS_DIR") and os.environ.get("RANK") is not None:
    ranks_dir, rank = Path(os.environ["SFTMIX_TEST_RANKS_DIR"]), os.environ["RANK"]
    (ranks_dir / f"rank-{rank}-of-{os.environ.get('WORLD_SIZE')}").touch()

    def _record_process_group_at_exit() -> None:
        import sys

        distributed = sys.modules.get("torch.distributed")  # never imported: never in a group
        if distributed is not None and distributed.is_available() and distributed.is_initialized():
            (ranks_dir / f"exit-{rank}-in-group").touch()

    # Registered first, so it runs last of the atexit handlers, after any of torch's or accelerate's own.
    atexit.register(_record_process_group_at_exit)

if os.environ.get("SFTMIX_TEST_FSDP2_ON_CPU") == "1":
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        return "gloo", DistributedType.MULTI_GPU

    PartialState._prepare_backend = _prepare_backend
    os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")

if os.environ.get("SFTMIX_TEST_FAIL_SCORING") and os.environ.get("RANK") is not None:
    failing_rank, failing_call = (int(part) for part in os.environ["SFTMIX_TEST_FAIL_SCORING"].split(":"))
    if int(os.environ["RANK"]) == failing_rank:
        import sftmix.scoring as scoring

        real_score_model, calls = scoring.score_model, []

        def score_model(*args, **kwargs):
            calls.append(1)
            if len(calls) == failing_call:
                raise RuntimeError(f"injected crash on rank {failing_rank} in scoring pass {failing_call}")
            return real_score_model(*args, **kwargs)

        scoring.score_model = score_model
