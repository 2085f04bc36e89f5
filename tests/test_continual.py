"""Continual learning: the metrics on hand-made matrices, the held-out evaluation that changes
nothing, and tiny continual runs through the harness (sequence sets; FSDD phases)."""

import json

import lightning as L
import numpy as np
import pytest
import torch
from conftest import TINY, needs_data
from hydra.utils import instantiate
from test_harness import config

import train
from predictive.harness import continual
from predictive.harness.continual import (
    ContinualEvaluation,
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    held_out_accuracy,
)
from predictive.harness.module import PredictiveModule, get_rng_state
from tasks import high_order

# Two phases of 400 elements: the published set, then a set generated over its 10 symbols.
SEQUENCES = [
    "experiment=continual_sequence", "task.code_size=128", "task.code_active=8", "task.chunk=20",
    "task.continual.phase_length=400", "task.continual.held_out_length=100", "task.continual.held_out_streams=2",
    "task.continual.sets=[{set: published}, {set: generated, set_seed: 1}]",
    "model.columns=128", "model.cells=16", "model.active_columns=6", "model.activation_threshold=4",
    "model.matching_threshold=4", "learning.rule.new_synapses=6",
    "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "logger=csv",
]


def test_metrics_by_hand():
    r = [[0.9, 0.1, 0.0],
         [0.5, 0.8, 0.2],
         [0.3, 0.6, 0.7]]
    assert average_accuracy(r) == pytest.approx((0.3 + 0.6 + 0.7) / 3)
    assert forgetting(r) == pytest.approx(((0.9 - 0.3) + (0.8 - 0.6)) / 2)  # best before the end - final
    assert backward_transfer(r) == pytest.approx(((0.3 - 0.9) + (0.6 - 0.8)) / 2)
    assert forward_transfer(r, [0.1, 0.1, 0.1]) == pytest.approx(((0.1 - 0.1) + (0.2 - 0.1)) / 2)
    # The best accuracy on phase 0 came after phase 1, not right after phase 0: forgetting
    # counts from the best, backward transfer from the accuracy just after learning it.
    r = [[0.6, 0.0, 0.0],
         [0.9, 0.9, 0.0],
         [0.7, 0.9, 1.0]]
    assert forgetting(r) == pytest.approx(((0.9 - 0.7) + (0.9 - 0.9)) / 2)
    assert backward_transfer(r) == pytest.approx(((0.7 - 0.6) + 0.0) / 2)
    # Learning later phases helped: negative forgetting, positive backward transfer.
    assert forgetting([[0.5, 0.0], [0.9, 0.8]]) == pytest.approx(-0.4)
    assert backward_transfer([[0.5, 0.0], [0.9, 0.8]]) == pytest.approx(0.4)
    one = [[0.7]]
    assert (average_accuracy(one), forgetting(one), backward_transfer(one), forward_transfer(one, [0.1])) == (
        0.7, 0.0, 0.0, 0.0)


def test_a_run_stopped_early_is_summarised_over_the_phases_it_learned():
    s = continual.continual_summary(["a", "b", "c"], [0.1, 0.2, 0.3], [[0.9, 0.4, 0.2], [0.6, 0.8, 0.3]])
    assert s["accuracy_matrix"] == [[0.9, 0.4, 0.2], [0.6, 0.8, 0.3]]
    assert s["average_accuracy"] == pytest.approx(0.7)  # phases a and b only
    assert s["forgetting"] == pytest.approx(0.3) and s["backward_transfer"] == pytest.approx(-0.3)
    assert s["forward_transfer"] == pytest.approx(0.4 - 0.2)


def test_concatenated_streams_switch_where_the_second_part_starts():
    sets = [high_order.load_sets(1)[0], high_order.generate_sets(10, 8, 6, 1, seed=1)[0]]
    parts = [high_order.generate(s, s, i, length=300, switch_after=300, relabel_seed=5) for i, s in enumerate(sets)]
    both = high_order.concatenate(parts)
    assert both.switch == 300 and len(both.symbols) == 600
    assert np.array_equal(both.symbols[300:], parts[1].symbols) and np.array_equal(both.scored[:300], parts[0].scored)
    with pytest.raises(ValueError, match="same symbols"):
        high_order.concatenate([parts[0], high_order.generate(sets[1], sets[1], 0, 300, 300, relabel_seed=6)])


def test_continual_sequence_task_phases_and_held_out_streams(tmp_path):
    cfg = config(tmp_path, *SEQUENCES, base=[])
    task = instantiate(cfg.task)
    assert task.phases == ["0:published", "1:generated-1"] and task.phase_ends == (20, 40)
    assert task.length == 800 and task.streams[0].switch == 400
    stream = task.streams[0]
    first, second = (set(map(tuple, s)) for s in task._phases.sets)
    unrelabel = np.argsort(stream.relabel)
    starts = np.flatnonzero(stream.start)
    for a, b in zip(starts[:-1], starts[1:]):  # a sequence, then its noise element at b - 1
        if a < 400 <= b:
            continue  # cut short where the phase ends
        assert tuple(unrelabel[stream.symbols[a:b - 1]]) in (first if a < 400 else second)
    batch, = task.held_out(1)
    assert batch["symbol"].shape == (2, 100) and batch["next_scored"].any()
    # Held-out streams are of the phase's set, and are not the training stream.
    assert not np.array_equal(batch["symbol"][0].numpy(), stream.symbols[400:500])
    # Scoring: the truth first is right, last is wrong; the count starts afresh once read.
    logits = torch.nn.functional.one_hot(batch["next"].clamp(0, task.num_symbols - 1), task.num_symbols).float()
    task.update_metrics("val", logits, batch, None)
    assert task.compute_metrics("val") == {"accuracy": 1.0}
    task.update_metrics("val", -logits, batch, None)
    assert task.compute_metrics("val") == {"accuracy": 0.0}


@pytest.mark.parametrize("setting, match", [
    ("task.continual.phase_length=410", "multiple of task.chunk"),
    ("task.continual.sets=[{set: published}, {set: generated, set_symbols: 12, set_seed: 1}]", "same symbols"),
    ("task.relabel=per_stream", "relabel=shared"),
    ("+task.continual.phase=3", "settings are"),
])
def test_bad_continual_sequence_settings_are_named(tmp_path, setting, match):
    with pytest.raises(ValueError, match=match):
        train.train(config(tmp_path, *SEQUENCES, setting, base=[]))


def trained_module(tmp_path):
    """A module whose stack learned the two tiny phases (the run's checkpoint, loaded)."""
    cfg = config(tmp_path, *SEQUENCES, base=[])
    train.train(cfg)
    L.seed_everything(cfg.seed)
    task = instantiate(cfg.task)
    module = PredictiveModule(task, instantiate(cfg.model, input_size=task.input_size),
                              instantiate(cfg.learning.rule), instantiate(cfg.optimizer))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    return module, task


def test_the_evaluation_changes_no_parameter_buffer_mode_or_random_stream(tmp_path):
    module, task = trained_module(tmp_path)
    module.train()
    module.head.eval()  # a mix of modes: each comes back as it was
    before = {k: v.clone() for k, v in module.state_dict().items()}
    rng = get_rng_state()["torch"].clone()
    accuracy = held_out_accuracy(module, task.held_out(0))
    assert accuracy > 0.5  # it did learn the published set
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert torch.equal(get_rng_state()["torch"], rng)
    assert module.model.training and not module.head.training
    assert held_out_accuracy(module, task.held_out(0)) == accuracy  # so: the same answer again


def test_a_continual_sequence_run_writes_its_accuracy_matrix(tmp_path):
    summary = train.train(config(tmp_path, *SEQUENCES, base=[]))
    r = np.array(summary["accuracy_matrix"])
    assert r.shape == (2, 2) and summary["phases"] == ["0:published", "1:generated-1"]
    assert len(summary["initial_accuracy"]) == 2
    assert r[0, 0] >= 0.9 and r[1, 1] >= 0.9  # each set learned in its phase
    assert r[0, 1] < 0.5  # ... and not before it
    assert summary["forgetting"] == pytest.approx(r[0, 0] - r[1, 0])
    assert summary["average_accuracy"] == pytest.approx(r[1].mean())
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["accuracy_matrix"] == summary["accuracy_matrix"]
    for name in ("continual_matrix.png", "continual_phases.png", "continual.json", "sequences_phase1.json"):
        assert (tmp_path / name).exists(), name
    logged = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "continual/0:published" in logged.splitlines()[0]


def test_a_continual_run_stopped_in_its_second_phase_resumes_with_the_same_matrix(tmp_path):
    whole = train.train(config(tmp_path / "whole", *SEQUENCES, base=[]))
    stopped = tmp_path / "stopped"
    train.train(config(stopped, *SEQUENCES, "trainer.max_steps=25", base=[]))
    assert len(json.loads((stopped / "summary.json").read_text())["accuracy_matrix"]) == 1
    resumed = train.train(config(tmp_path / "resumed", *SEQUENCES, f"ckpt_path={stopped}/checkpoints/last.ckpt",
                                 base=[]))
    for key in ("initial_accuracy", "accuracy_matrix", "forgetting", "final_accuracy", "end_accuracy"):
        assert resumed[key] == whole[key], key


def test_a_model_that_never_learns_forgets_nothing(tmp_path):
    # learning=frozen: the LSTM keeps its random initialisation; its random predictions score
    # the same on every phase after every phase.
    lstm = [o for o in SEQUENCES if not o.startswith(("model.", "learning."))]
    summary = train.train(config(tmp_path, *lstm, "model=lstm", "model.hidden_size=48", "learning=frozen", base=[]))
    r = summary["accuracy_matrix"]
    assert r[0] == r[1] == summary["initial_accuracy"] and min(r[0]) > 0
    assert summary["forgetting"] == 0.0 and summary["backward_transfer"] == 0.0


def test_a_model_replaced_by_a_fresh_one_after_each_phase_forgets_what_its_matrix_says(tmp_path, monkeypatch):
    class Forgetful(ContinualEvaluation):
        """After each phase's evaluation, the model is replaced by its untrained self."""

        def on_train_start(self, trainer, pl_module):
            self.fresh = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
            super().on_train_start(trainer, pl_module)

        def at(self, trainer, pl_module, progress):
            rows = len(self.rows)
            super().at(trainer, pl_module, progress)
            if len(self.rows) > rows:
                pl_module.model.load_state_dict(self.fresh)
                pl_module.stream_state = None

    monkeypatch.setattr(train, "ContinualEvaluation", Forgetful)
    summary = train.train(config(tmp_path, *SEQUENCES, base=[]))
    r = np.array(summary["accuracy_matrix"])
    assert r[0, 0] >= 0.9 and r[1, 1] >= 0.9 and r[1, 0] < 0.5  # learned, then gone with the model
    assert summary["forgetting"] == pytest.approx(r[0, 0] - r[1, 0])
    assert summary["backward_transfer"] == pytest.approx(r[1, 0] - r[0, 0])


@needs_data("fsdd", "recordings")
def test_continual_speech_phases_by_speakers_and_classes(tmp_path):
    from tasks.speech.continual import phase_of_clips

    base = ["experiment=continual_speech", "trainer.enable_progress_bar=false", "logger=csv"]
    task = instantiate(config(tmp_path, *base, base=[]).task)
    assert task.phases == ["0:george+jackson", "1:lucas+nicolas", "2:theo+yweweler"] and task.phase_ends == (3, 6, 9)
    data = task.datamodule()
    for phase, speakers in enumerate((("george", "jackson"), ("lucas", "nicolas"), ("theo", "yweweler"))):
        clips = data.phases[phase].clips
        assert {c.speaker for c in clips} == set(speakers) and len(clips) == 1000
        assert {c.split for c in clips} == {"train", "val", "test"}
    classes = instantiate(config(tmp_path, *base, "task.continual.split=classes", base=[]).task)
    assert classes.phases[0] == "0:0+1" and classes.phase_ends == (3, 6, 9, 12, 15)
    assert {c.word for c in classes.datamodule().phases[4].clips} == {"8", "9"}
    clips = data.phases[0].clips
    wrong = (([["george"]], "not in any: \\['jackson'\\]"), ([["george", "jackson"], ["jackson"]], "twice"),
             ([["george", "jackson", "bob"]], "unknown: \\['bob'\\]"))
    for groups, match in wrong:
        with pytest.raises(ValueError, match=match):
            phase_of_clips({"split": "speakers", "speakers": groups}, clips, str)


@needs_data("fsdd", "recordings")
def test_a_continual_speech_run_learns_each_phase_on_its_own_clips(tmp_path, monkeypatch):
    # 3 phases x 1 epoch of 2 batches, the discriminant readout, a small stack: the matrix is
    # 3 x 3, and each epoch reads its own phase's clips.
    import tasks.speech.continual as speech_continual

    overrides = ["experiment=continual_speech", "task.continual.epochs=1", "trainer.max_epochs=3",
                 "+trainer.limit_train_batches=2", "task.batch_size=8", "task.readout=discriminant",
                 "model.columns=64", "model.active_columns=8", "model.cells=2",
                 "trainer.enable_progress_bar=false", "logger=csv"]
    loader, read = speech_continual.PhasedSpeechData.train_dataloader, []

    def spy(self):
        read.append(next(p for p, data in enumerate(self.phases) if loader(self).dataset is data.sets["train"]))
        return loader(self)

    monkeypatch.setattr(speech_continual.PhasedSpeechData, "train_dataloader", spy)
    summary = train.train(config(tmp_path, *overrides, base=[]))
    assert read == [0, 1, 2]
    assert np.array(summary["accuracy_matrix"]).shape == (3, 3)
    assert all(0.0 <= a <= 1.0 for row in summary["accuracy_matrix"] for a in row)
    assert "forgetting" in summary and (tmp_path / "continual_matrix.png").exists()
    assert "val_accuracy" not in summary  # the val stage scored the held-out clips: in the matrix only
    with pytest.raises(ValueError, match="trainer.max_epochs"):
        train.train(config(tmp_path / "short", *overrides[:2], "trainer.max_epochs=2", *overrides[3:], base=[]))


def test_tiny_base_is_not_continual(tmp_path):
    assert instantiate(config(tmp_path, base=TINY).task).phases == ()


def test_the_comparison_shows_the_continual_figures_first_and_the_mean_matrices(tmp_path):
    from predictive.harness import report

    for i, (learning, r) in enumerate([("local", [[1.0, 0.1], [1.0, 1.0]]), ("local", [[0.9, 0.1], [0.9, 1.0]]),
                                        ("backprop", [[0.8, 0.0], [0.2, 0.9]])]):
        run = tmp_path / str(i)
        run.mkdir()
        summary = {"task": "sequence", "learning": learning, "model": "stack", "seed": i, "accuracy_matrix": r,
                   "final_accuracy": 0.5, **continual.continual_summary(["a", "b"], [0.0, 0.0], r)}
        (run / "summary.json").write_text(json.dumps(summary))
    text = report.write_report(tmp_path).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| task"))
    assert header.split(" | ")[4:8] == ["average_accuracy", "forgetting", "backward_transfer", "forward_transfer"]
    backprop = next(line for line in text.splitlines() if "| backprop |" in line)
    assert "| 0.5500 ± 0.0000 | 0.6000 ± 0.0000 | -0.6000 ± 0.0000 |" in backprop
    assert (tmp_path / "continual_matrix.png").exists() and "continual_matrix.png" in text
