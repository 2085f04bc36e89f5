"""A long high-order sequence stream (1,000,000 elements, local learning, the default model and
settings otherwise) measured as it goes: does the run's memory stay flat and its speed steady?

    python benchmarks/long_stream.py                        # 1,000,000 elements: minutes
    python benchmarks/long_stream.py --length 200000 --every 20000

Every `--every` elements it records the process's resident memory (VmRSS), its peak since
training started (VmHWM) and the wall time per element over the last `--every` elements, all of
the run included (steps, metrics, logging, checkpoints every 100 chunks). It prints them as a
table, then peak memory at the end over that at `--every` elements, and the time per element
of the last window over that of the first. Run it niced, on a quiet machine.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def memory_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))


class Probe(L.Callback):
    """Memory and time per element every `every` elements of the stream."""

    def __init__(self, every: int):
        self.every, self.rows = every, []

    def on_train_start(self, trainer, pl_module):
        self.mark = (0, time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        elements = pl_module.time_steps  # one stream: B x T = T
        if elements >= self.mark[0] + self.every:
            now = time.perf_counter()
            us = 1e6 * (now - self.mark[1]) / (elements - self.mark[0])
            self.rows.append((elements, *memory_mb(), us))
            self.mark = (elements, now)


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
    print("| elements | RSS MB | peak RSS MB | us/element (last window) |")
    print("|---:|---:|---:|---:|")
    for elements, rss, peak, us in probe.rows:
        print(f"| {elements:,} | {rss:.0f} | {peak:.0f} | {us:.0f} |")
    first, last = probe.rows[0], probe.rows[-1]
    print(f"\npeak RSS at {last[0]:,} / at {first[0]:,}: {last[2] / first[2]:.3f}")
    print(f"us/element, last window / first: {last[3] / first[3]:.3f}")
    print(f"final_accuracy {summary['final_accuracy']}, end_accuracy {summary['end_accuracy']}, "
          f"us_per_element {summary['us_per_element']:.0f}")


if __name__ == "__main__":
    main()
