"""The high-order sequence stream through the project and through peers, side by side.

Every system sees the same stream (tasks.high_order.generate, per seed) and is scored by the
same functions (is_correct, summarize): predict element t+1 at t, then learn it. The project
runs through train.py (local, backprop, LSTM); the peers are optional PyPI packages, skipped
with a message when not installed (`pip install reservoirpy pyaogmaneo`):

- esn: reservoirpy echo state network, 500 units, online RLS readout (forgetting 0.9995),
  fed the task's own symbol codes.
- aogmaneo: pyaogmaneo Sparse Predictive Hierarchy; its input is one column of symbol
  indices, so the 5,000 noise symbols share one index.
- ideal: a reference, not a peer. It is told where each sequence starts and remembers what
  followed each exact prefix (recent continuations first), so it is wrong only the first time
  it sees a sequence (and a new ending after the switch): the stream's own floor for
  elements_to_95 and recovery_elements.

brainblocks' SequenceLearner is not included: it has no wheel for current Pythons and its
next-step prediction API could not be checked here (DESIGN.md reports it at chance, 0.45).

    python benchmarks/sequence_peers.py --seeds 0 1 2
    python benchmarks/sequence_peers.py --systems local,esn --length 6000 --switch-after 3000 \
        --override local:model.columns=1024 --override local:model.cells=8
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks import high_order  # noqa: E402
from tasks.encoders import SymbolEncoder  # noqa: E402

PROJECT = {"local": ["learning=local"], "hybrid": ["learning=hybrid"], "backprop": ["learning=backprop"],
           "lstm": ["model=lstm", "learning=backprop"]}
COLUMNS = ("final_accuracy", "elements_to_95", "recovery_elements", "us_per_element")


def score(stream: high_order.Stream, predictions: np.ndarray, endings: int) -> dict:
    """predictions[t]: scores of each sequence symbol as element t+1, made at t."""
    positions = np.flatnonzero(stream.scored)
    correct = high_order.is_correct(predictions[positions - 1], stream.symbols[positions], endings)
    return high_order.summarize(positions, correct, len(stream.symbols), stream.switch)


def run_project(name: str, seed: int, args) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    import train

    with tempfile.TemporaryDirectory() as out, initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        overrides = [
            *PROJECT[name],
            f"seed={seed}",
            f"task.endings={args.endings}",
            f"task.length={args.length}",
            f"task.switch_after={args.switch_after}",
            "logger=none",
            "trainer.enable_progress_bar=false",
            f"checkpoint.every_n_train_steps={10**9}",
            f"paths.output_dir={out}",
        ]
        # "--override local:model.columns=1024" applies to one system, "--override x=y" to all.
        overrides += [
            o.split(":", 1)[-1] for o in args.override if ":" not in o.split("=")[0] or o.startswith(f"{name}:")
        ]
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        summary = train.train(cfg)
    return {k: summary.get(k) for k in (*COLUMNS, "end_accuracy")}


def run_esn(stream, seed, endings):
    from reservoirpy.nodes import RLS, Reservoir

    codes = SymbolEncoder(stream.vocab_size, seed=seed).codes().numpy()
    # input_scaling 0.2: with 41 active input bits a larger drive saturates the tanh units,
    # a much smaller one barely moves them.
    reservoir = Reservoir(500, sr=0.95, lr=1.0, input_scaling=0.2, input_dim=codes.shape[1], seed=seed)
    readout = RLS(forgetting=0.9995, input_dim=500, output_dim=stream.num_symbols)
    targets = np.eye(stream.num_symbols)
    predictions = np.zeros((len(stream.symbols), stream.num_symbols))
    previous = None
    for t, symbol in enumerate(stream.symbols):
        if previous is not None and symbol < stream.num_symbols:  # learn the element just seen
            readout.partial_fit(previous[None], targets[symbol][None])
        previous = reservoir.step(codes[symbol])
        predictions[t] = readout.step(previous)
    return predictions


def run_aogmaneo(stream, seed, endings):
    import pyaogmaneo as neo

    neo.set_global_state(seed)
    size = stream.num_symbols + 1  # one shared index for all noise symbols
    h = neo.Hierarchy([neo.IODesc((1, 1, size), neo.prediction)], [neo.LayerDesc((4, 4, 16)) for _ in range(3)])
    predictions = np.zeros((len(stream.symbols), stream.num_symbols))
    for t, symbol in enumerate(stream.symbols):
        h.step([np.array([min(symbol, size - 1)], dtype=np.int32)], True)
        predictions[t] = np.asarray(h.get_prediction_acts(0), dtype=np.float64)[: stream.num_symbols]
    return predictions


def run_ideal(stream, seed, endings):
    memory = {}  # prefix since the sequence's start -> scores of the symbols that followed it
    predictions = np.zeros((len(stream.symbols), stream.num_symbols))
    prefix = ()
    for t, symbol in enumerate(stream.symbols):
        if t > 0 and symbol < stream.num_symbols and prefix:  # learn the element just seen
            scores = memory.setdefault(prefix, np.zeros(stream.num_symbols))
            scores *= 0.25  # the latest continuation outweighs all older ones together
            scores[symbol] += 1.0
        prefix = (*prefix, symbol) if not stream.start[t] else (symbol,)
        predictions[t] = memory.get(prefix, 0.0)
    return predictions


PEERS = {"esn": run_esn, "aogmaneo": run_aogmaneo, "ideal": run_ideal}
MODULES = {"esn": "reservoirpy", "aogmaneo": "pyaogmaneo"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--endings", type=int, default=1, choices=high_order.ENDINGS)
    p.add_argument("--length", type=int, default=20000)
    p.add_argument("--switch-after", type=int, default=10000)
    p.add_argument("--systems", default="local,backprop,lstm,esn,aogmaneo,ideal")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra Hydra override for the project runs: key=value, or system:key=value for one system",
    )
    args = p.parse_args()
    normal, perturbed = high_order.load_sets(args.endings)

    results = {}
    for name in args.systems.split(","):
        if name not in PROJECT and name not in PEERS:
            sys.exit(f"--systems: unknown system {name!r}; choose from {[*PROJECT, *PEERS]}")
        if name in MODULES:
            try:
                __import__(MODULES[name])
            except ImportError:
                print(f"skip {name}: `pip install {MODULES[name]}` to include it")
                continue
        rows = []
        for seed in args.seeds:
            if name in PROJECT:
                row = run_project(name, seed, args)
            else:
                stream = high_order.generate(normal, perturbed, seed, args.length, args.switch_after)
                start = time.perf_counter()
                predictions = PEERS[name](stream, seed, args.endings)
                seconds = time.perf_counter() - start
                row = {**score(stream, predictions, args.endings), "us_per_element": 1e6 * seconds / args.length}
            print(name, seed, row, flush=True)
            rows.append(row)
        results[name] = {k: mean([r[k] for r in rows]) for k in COLUMNS}
    table(results)


def mean(values):
    return None if any(v is None for v in values) else float(np.mean(values))


def table(results: dict):
    """Mean over seeds per system; ratios against the first system (n/a: undefined or never reached)."""
    if not results:
        return
    base = next(iter(results.values()))
    print(f"\n{'system':12s}" + "".join(f"{c:>22s}" for c in COLUMNS) + "   (ratio to " + next(iter(results)) + ")")
    for name, r in results.items():
        cells = []
        for c in COLUMNS:
            if r[c] is None:
                cells.append(f"{'n/a':>22s}")
                continue
            ratio = f" ({r[c] / base[c]:.2f}x)" if base[c] else ""
            cells.append(f"{r[c]:>13.3f}{ratio:>9s}" if c == "final_accuracy" else f"{r[c]:>13.0f}{ratio:>9s}")
        print(f"{name:12s}" + "".join(cells))


if __name__ == "__main__":
    main()
