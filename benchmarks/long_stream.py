"""A long high-order sequence stream (1,000,000 elements, local learning, the default model and
settings otherwise) measured as it goes: does the run's memory stay flat and its speed steady?

    python benchmarks/long_stream.py                        # 1,000,000 elements: minutes
    python benchmarks/long_stream.py --length 200000 --every 20000

Every `--every` elements it records the process's resident memory (VmRSS), its peak since
training started (VmHWM) and the time per element over the last `--every` elements, all of the
run included (steps, metrics, logging, checkpoints every 100 chunks): wall time (the median of
ten sub-windows) and the process's CPU time, which other processes on a shared machine do not
inflate. It prints them as a table, then peak memory at the end over that at `--every`
elements, and the time per element of the last window over that of the first.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def memory_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))


class Probe(L.Callback):
    """Every `every` elements of the stream: memory, CPU time per element, and wall time per
    element (the median of ten sub-windows, so that a burst of another process's work on a
    shared machine does not count)."""

    def __init__(self, every: int):
        self.every, self.rows, self.marks = every, [], []

    def on_train_start(self, trainer, pl_module):
        self.marks = [(0, time.perf_counter(), time.process_time())]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        elements = pl_module.time_steps  # one stream: B x T = T
        if elements < self.marks[-1][0] + self.every // 10:
            return
        self.marks.append((elements, time.perf_counter(), time.process_time()))
        if elements >= (len(self.rows) + 1) * self.every:
            window = self.marks[-11:]
            walls = [1e6 * (b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(window, window[1:])]
            cpu = 1e6 * (window[-1][2] - window[0][2]) / (window[-1][0] - window[0][0])
            self.rows.append((elements, *memory_mb(), float(np.median(walls)), cpu))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=100_000)
    parser.add_argument("--override", action="append", default=[], help="a train.py override, e.g. seed=1")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import train

    with tempfile.TemporaryDirectory() as out, initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        overrides = ["task=sequence", "learning=local", f"task.length={args.length}", "logger=csv",
                     "trainer.enable_progress_bar=false", f"paths.output_dir={out}", *args.override]
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # as @hydra.main does: ${hydra:...} resolves
        with open_dict(cfg):
            del cfg.hydra  # ... and the job's config has no hydra node
        run = train.prepare(cfg)
        probe = Probe(args.every)
        run.trainer.callbacks.append(probe)
        summary = train.fit(run)
    print("| elements | RSS MB | peak RSS MB | us/element, wall (median of 10 windows) | us/element, CPU |")
    print("|---:|---:|---:|---:|---:|")
    for elements, rss, peak, wall, cpu in probe.rows:
        print(f"| {elements:,} | {rss:.0f} | {peak:.0f} | {wall:.0f} | {cpu:.0f} |")
    first, last = probe.rows[0], probe.rows[-1]
    print(f"\npeak RSS at {last[0]:,} / at {first[0]:,}: {last[2] / first[2]:.3f}")
    print(f"us/element, last window / first: wall {last[3] / first[3]:.3f}, CPU {last[4] / first[4]:.3f}")
    print(f"final_accuracy {summary['final_accuracy']}, end_accuracy {summary['end_accuracy']}, "
          f"us_per_element {summary['us_per_element']:.0f}")

if __name__ == "__main__":
    main()
