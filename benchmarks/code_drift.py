"""How far each layer's code moves from one checkpoint of a speech run to the next, on the same clips.

    python train.py experiment=speech_fsdd learning=local model.layers=2 \\
        checkpoint.save_top_k=-1 checkpoint.every_n_train_steps=0 +checkpoint.every_n_epochs=1 hydra.run.dir=RUN
    python benchmarks/code_drift.py RUN [--clips 200]

The run's config (RUN/.hydra/config.yaml) rebuilds task and model; each checkpoint
(RUN/checkpoints/epoch=*.ckpt, in epoch order) runs the first `clips` validation clips without
learning and without noise. For each layer, and for each checkpoint against the one before it
and against the first, it prints the share of the active columns and of the active cells that
stay active, frame by frame (|before and now| / |before|, summed over frames), and the cosine of what the
head reads (the top layer's columns pooled over the head's segments). A model that does not
learn scores 1 everywhere. Figures: docs/results.md, "Speech", "Depth".
"""

import argparse
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from predictive.harness.module import PredictiveModule
from predictive.learning import Frozen
from predictive.memory import column_activity
from tasks.speech.evaluate import rebuild
from tasks.speech.head import segment_means


@torch.no_grad()
def codes(module: PredictiveModule, batches: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Per layer, (frames, N) active cells and (frames, C) active columns over the batches'
    clips; and (clips, F) the head's input, the top layer's columns pooled over its segments."""
    model, rule, cells, pooled = module.model, Frozen(fused=False), [], []
    for batch in batches:
        x, reset = module.encoder(batch), module.task.reset_mask(batch)
        states, frames = model.layer_states(model.initial_state(x.shape[0])), []
        for t in range(x.shape[1]):
            steps, states, _ = model.step_layers(x[:, t], states, reset[:, t], rule)
            frames.append([step.cells for step in steps])
        layers = [torch.stack([f[i] for f in frames], 1) for i in range(len(model.layers))]  # (B, T, N) each
        cells.append(layers)
        span = module.task.head_inputs(x, batch).get("span")
        top = column_activity(layers[-1], model.layers[-1].cells_per_column)
        pooled.append(segment_means(top, span, module.head.segments) if span is not None else top.mean(1))
    cells = [torch.cat([c[i].flatten(0, 1) for c in cells]) for i in range(len(model.layers))]
    columns = [column_activity(c, layer.cells_per_column) > 0 for c, layer in zip(cells, model.layers)]
    return [c > 0 for c in cells], columns, torch.cat(pooled)


def kept(before: torch.Tensor, now: torch.Tensor) -> float:
    """Share of the units active before (frames x units, bool) that are active now too."""
    return ((before & now).sum() / before.sum().clamp(min=1)).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--clips", type=int, default=200)
    args = parser.parse_args()
    epoch = lambda path: int(re.search(r"epoch=(\d+)", path.name)[1])
    ckpts = sorted((args.run / "checkpoints").glob("epoch=*.ckpt"), key=epoch)
    if len(ckpts) < 2:
        raise SystemExit(f"{args.run / 'checkpoints'}: need two or more epoch=*.ckpt (checkpoint.save_top_k=-1 "
                         "+checkpoint.every_n_epochs=1)")
    module = rebuild(ckpts[0], args.run / "code_drift", [])[1].eval()
    data = module.task.datamodule()
    data.setup("fit")
    batches, n = [], 0
    for batch in data.val_dataloader():
        batches.append(batch)
        n += len(batch["label"])
        if n >= args.clips:
            break
    seen = []
    for path in ckpts:
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
        seen.append((path.stem, *codes(module, batches)))
    print(f"{args.run}: {n} validation clips; share of active columns / cells still active, cosine of the head's input")
    first = seen[0]
    for before, now in zip(seen, seen[1:]):
        row = [f"{now[0]} against {before[0]}:"]
        for i, (cells, columns) in enumerate(zip(now[1], now[2])):
            row.append(f"layer {i}: columns {kept(before[2][i], columns):.3f} cells {kept(before[1][i], cells):.3f}")
        row.append(f"head input {F.cosine_similarity(before[3], now[3]).mean():.3f}")
        if before is not first:
            row.append(f"(against {first[0]}: " + ", ".join(
                f"layer {i} columns {kept(first[2][i], columns):.3f}" for i, columns in enumerate(now[2])) + ")")
        print("  ".join(row))


if __name__ == "__main__":
    main()
