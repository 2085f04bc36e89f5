"""The high-order protocol on a family of generated sets of graded difficulty, side by side.

Each set (tasks.high_order.generate_sets) has `symbols` symbols and `sequences` sequences in
groups of two that share a middle of `middle` symbols: the deciding first element lies
middle + 1 steps before the scored ending, and each symbol stands in about
sequences / 2 x middle / symbols contexts. Every system sees the same streams and is scored
by the same functions as in benchmarks/sequence_peers.py:

- local, hybrid, backprop, lstm: the project through train.py (`task.set=generated`), its defaults.
- esn: reservoirpy's echo state network with one-hot input, leak 0.5, 500 units and an
  online RLS readout (forgetting 0.9995): the setup under which it does well on these sets.

    python benchmarks/sequence_family.py --systems local,esn --seeds 0 1 2
    python benchmarks/sequence_family.py --sets 10:8:5 16:16:9 --plot family.png
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from sequence_peers import PROJECT, mean, run_project, score  # noqa: E402

from tasks import high_order  # noqa: E402

# symbols:sequences:middle, from the published set's shape to the hardest the defaults must hold.
SETS = ("10:8:5", "12:8:6", "12:12:7", "16:12:8", "16:16:9")
COLUMNS = ("final_accuracy", "elements_to_95", "recovery_elements", "end_accuracy", "us_per_element")


def run_esn(stream: high_order.Stream) -> np.ndarray:
    from reservoirpy.nodes import RLS, Reservoir

    size = stream.num_symbols + 1  # one shared input for the noise symbols: they never repeat
    reservoir = Reservoir(500, sr=0.95, lr=0.5, input_scaling=1.0, input_dim=size, seed=0)
    readout = RLS(forgetting=0.9995, input_dim=500, output_dim=stream.num_symbols)
    targets, inputs = np.eye(stream.num_symbols), np.eye(size)
    predictions = np.zeros((len(stream.symbols), stream.num_symbols))
    previous = None
    for t, symbol in enumerate(stream.symbols):
        if previous is not None and symbol < stream.num_symbols:  # learn the element just seen
            readout.partial_fit(previous[None], targets[symbol][None])
        previous = reservoir.step(inputs[min(symbol, size - 1)])
        predictions[t] = readout.step(previous)
    return predictions


def run(name: str, spec: str, seed: int, args) -> dict:
    symbols, sequences, middle = map(int, spec.split(":"))
    if name in PROJECT:
        generated = {"set": "generated", "set_symbols": symbols, "set_sequences": sequences, "set_middle": middle,
                     "set_seed": args.set_seed}
        args.override = [*args.base_override, *(f"task.{k}={v}" for k, v in generated.items())]
        return run_project(name, seed, args)
    normal, perturbed = high_order.generate_sets(symbols, sequences, middle, args.endings, args.set_seed)
    stream = high_order.generate(normal, perturbed, seed, args.length, args.switch_after)
    start = time.perf_counter()
    predictions = run_esn(stream)
    seconds = time.perf_counter() - start
    return {**score(stream, predictions, args.endings), "us_per_element": 1e6 * seconds / args.length}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=list(SETS), help="symbols:sequences:middle per set")
    p.add_argument("--set-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--endings", type=int, default=1, choices=high_order.ENDINGS)
    p.add_argument("--length", type=int, default=20000)
    p.add_argument("--switch-after", type=int, default=10000)
    p.add_argument("--systems", default="local,esn")
    p.add_argument("--override", action="append", default=[], dest="base_override",
                   help="extra Hydra override for the project runs: key=value, or system:key=value")
    p.add_argument("--plot", help="write final accuracy and recovery against the sets to this PNG")
    args = p.parse_args()
    systems = args.systems.split(",")
    unknown = [s for s in systems if s not in PROJECT and s != "esn"]
    if unknown:
        sys.exit(f"--systems: unknown {unknown}; choose from {[*PROJECT, 'esn']}")

    results = {}
    for spec in args.sets:
        for name in systems:
            rows = []
            for seed in args.seeds:
                rows.append(run(name, spec, seed, args))
                print(spec, name, seed, rows[-1], flush=True)
            results[spec, name] = {k: mean([r.get(k) for r in rows]) for k in COLUMNS}
    print(f"\n{'set':10s}{'system':8s}" + "".join(f"{c:>20s}" for c in COLUMNS))
    for (spec, name), r in results.items():
        cells = "".join(f"{'n/a':>20s}" if r[c] is None else f"{r[c]:>20.3f}" if "accuracy" in c else f"{r[c]:>20.0f}"
                        for c in COLUMNS)
        print(f"{spec:10s}{name:8s}{cells}")
    if args.plot:
        plot(results, args.sets, systems, args.plot)


def plot(results: dict, sets: list[str], systems: list[str], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, column in zip(axes, ("final_accuracy", "recovery_elements")):
        for name in systems:
            ax.plot(sets, [results[s, name][column] or np.nan for s in sets], marker="o", label=name)
        ax.set_xlabel("set (symbols:sequences:middle)")
        ax.set_ylabel(column)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
