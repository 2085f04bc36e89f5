"""Test a trained speech model again: accuracy, confusion matrix and the noise sweep.

    python -m tasks.speech.evaluate ckpt=outputs/speech/<run>/checkpoints/last.ckpt [key=value ...]

The run's own config (`<run>/.hydra/config.yaml`) rebuilds task, model and learning rule;
`key=value` overrides it (e.g. `task.noise_levels=[0,0.1,0.2]`, `paths.data_dir=/data`,
`trainer.accelerator=gpu`). Results go to `<run>/evaluate/` (confusion_test.png/json) and
`<run>/evaluate/summary.json`, and are printed. The run's `torch_threads` holds here too.
A bad setting, data file or checkpoint stops it with one line naming it (HYDRA_FULL_ERROR=1:
the traceback).
"""

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from predictive.harness.files import write_json
from predictive.harness.module import PredictiveModule
from predictive.harness.resume import check_checkpoint
from predictive.harness.settings import check_settings


def rebuild(ckpt: Path, out_dir: Path, overrides: list[str]) -> tuple[DictConfig, PredictiveModule]:
    """The run's config (with `overrides`, its outputs under `out_dir`) and a module built from
    it as the run built its own: task, model and learning rule (the weights are not loaded)."""
    config = ckpt.resolve().parent.parent / ".hydra" / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"ckpt={ckpt}: need the run's config beside it, {config}")
    cfg = OmegaConf.load(config)
    # The saved config refers to Hydra's run dir, which only exists inside a Hydra app.
    cfg.paths.output_dir = str(out_dir)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    check_settings(cfg)
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    L.seed_everything(cfg.seed)
    task = instantiate(cfg.task)
    model = instantiate(cfg.model, input_size=task.input_size)
    module = PredictiveModule(
        task, model, instantiate(cfg.learning.rule), instantiate(cfg.optimizer), cfg.learning.gradient_clip_val
    )
    return cfg, module


def evaluate(ckpt: str, overrides: list[str]) -> dict:
    ckpt = Path(ckpt)
    out_dir = ckpt.resolve().parent.parent / "evaluate"
    cfg, module = rebuild(ckpt, out_dir, overrides)
    task = module.task
    check_checkpoint(ckpt, module, setting="ckpt")  # the settings may differ (noise levels), the weights must fit
    trainer = instantiate(cfg.trainer, logger=False, default_root_dir=str(out_dir))
    trainer.test(module, datamodule=task.datamodule(), ckpt_path=str(ckpt))
    summary = task.summary()
    write_json(out_dir / "summary.json", summary, indent=2)
    return summary


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:] if a.startswith("ckpt="))
    if "ckpt" not in args:
        sys.exit(__doc__)
    try:
        result = evaluate(args["ckpt"], [a for a in sys.argv[1:] if not a.startswith("ckpt=")])
    except (ValueError, OSError) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(str(e))
    print(json.dumps({k: result[k] for k in ("test_accuracy", "noise_score", "noise_accuracy_by_level")}, indent=2))
