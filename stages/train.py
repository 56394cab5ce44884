"""Stage `train`: QLoRA on the train split -> models/adapter/, reports/train.json, loss curves.

With train.num_processes > 1, several machines or train.distributed: fsdp the stage re-launches
itself under `accelerate launch` (DDP or FSDP-QLoRA, stages/lib/distributed.py), so the command in
dvc.yaml stays `python -m stages.train` on any machine.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from stages.lib.io import write_json
from stages.lib.limits import LAUNCHED_MARK, check_processes, inside_launcher
from stages.lib.params import load_params

TRAIN = Path("data/split/train.jsonl")
VALIDATION = Path("data/split/validation.jsonl")
REPLAY = Path("data/replay/answers.jsonl")
ADAPTER = Path("models/adapter")
REPORT = Path("reports/train.json")
CURVES = Path("reports/train")
CHECKPOINTS = Path("checkpoints/train")


def _relaunch_with_accelerate(train) -> int:
    from stages.lib.distributed import launch_command

    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    command = launch_command(train, accelerate)
    print("running:", " ".join(command), file=sys.stderr)
    # Every process accelerate starts inherits this mark and never re-launches (accelerate's CPU
    # launcher sets no LOCAL_RANK, and without the mark the copies re-launched themselves forever).
    os.environ[LAUNCHED_MARK] = "1"
    os.execv(accelerate, command)
    return 1  # not reached


def main() -> int:
    params = load_params(stage="train")
    from stages.lib.distributed import needs_launch

    if needs_launch(params.train) and not inside_launcher():
        import torch

        # Refused before any launch: on CPU, accelerate's copies re-launched themselves forever.
        check_processes(params.train.num_processes, torch.cuda.device_count())
        return _relaunch_with_accelerate(params.train)

    from stages.lib.training import run_training

    report = run_training(params, train_path=TRAIN, validation_path=VALIDATION, replay_path=REPLAY,
                          adapter_dir=ADAPTER, live_dir=CURVES, checkpoint_root=CHECKPOINTS)
    if int(os.environ.get("RANK", "0")) == 0:
        from stages.lib.stage import peak_rss_mib

        report["peak_rss_mib"] = peak_rss_mib()
        write_json(REPORT, report)
        print(f"train: {report['steps']} steps, loss {report['first_loss']} -> {report['final_loss']}, "
              f"{report['tokens_per_s']} tokens/s, adapter in {ADAPTER}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from stages.lib.modeling import run_model_stage

    sys.exit(run_model_stage("train", main))
