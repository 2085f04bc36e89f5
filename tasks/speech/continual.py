"""Continual speech: the clips split into phases learned one after another
(predictive.harness.continual), by speaker groups (domain-incremental: the same words, new
voices) or by class groups (class-incremental: new words, one head over every class).

Each phase is a data set of its own (`SpeechData` over its clips, split as the task says);
the training data is the current phase's, `epochs` epochs each, and a phase's held-out data is
its test clips (clean). Validation and the test noise sweep are not part of the protocol.
"""

import lightning as L
from torch.utils.data import DataLoader

from .data import SpeechData
from .datasets import Clip

SPLITS = ("speakers", "classes")
KEYS = ("split", "speakers", "classes", "epochs")


def phase_of_clips(spec: dict, clips: list[Clip], label_of) -> tuple[list[str], list[list[Clip]]]:
    """(phase names, the clips of each phase): groups of speakers or of class names, in order.
    Every clip must fall in exactly one group."""
    if set(spec) - set(KEYS) or spec.get("split") not in SPLITS:
        raise ValueError(f"task.continual: settings are {list(KEYS)}, split one of {SPLITS}; got {dict(spec)}")
    split = spec["split"]
    groups = [[str(k) for k in group] for group in spec.get(split) or []]
    key = (lambda c: c.speaker) if split == "speakers" else (lambda c: label_of(c.word))
    present = {key(c) for c in clips}
    listed = [k for group in groups for k in group]
    if len(groups) < 1 or not all(groups):
        raise ValueError(f"task.continual.{split}: a list of one or more non-empty groups, got {spec.get(split)!r}")
    if len(listed) != len(set(listed)) or set(listed) != present:
        raise ValueError(
            f"task.continual.{split}: every {split[:-1]} in exactly one group; not in any: "
            f"{sorted(present - set(listed))}, unknown: {sorted(set(listed) - present)}, "
            f"twice: {sorted({k for k in listed if listed.count(k) > 1})}"
        )
    names = [f"{i}:{'+'.join(group)}" for i, group in enumerate(groups)]
    return names, [[c for c in clips if key(c) in group] for group in groups]


class PhasedSpeechData(L.LightningDataModule):
    """The current phase's training clips (phase = epoch // epochs), and each phase's test
    clips as held-out data. The training loader must be made again every epoch
    (trainer.reload_dataloaders_every_n_epochs=1), so that a new phase starts on new clips."""

    def __init__(self, phases: list[SpeechData], epochs: int):
        super().__init__()
        if not (isinstance(epochs, int) and epochs >= 1):
            raise ValueError(f"task.continual.epochs must be an integer >= 1, got {epochs!r}")
        self.phases, self.epochs = phases, epochs

    def setup(self, stage=None):
        for data in self.phases:
            data.setup(stage)

    def train_dataloader(self):
        if self.trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError("task.continual needs trainer.reload_dataloaders_every_n_epochs=1 (each phase its clips)")
        phase = min(self.trainer.current_epoch // self.epochs, len(self.phases) - 1)
        return self.phases[phase].train_dataloader()

    def held_out(self, phase: int) -> DataLoader:
        data = self.phases[phase]
        return DataLoader(data.sets["test"], data.batch_size)
