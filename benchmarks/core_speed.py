"""Speed and memory of one temporal-memory layer, local vs backprop, beside torch's LSTM.

    python benchmarks/core_speed.py                 # 2048 columns x 16 cells, batch 1, 64 and 256
    python benchmarks/core_speed.py --columns 512 --cells 8 --steps 50
    python benchmarks/core_speed.py --device cuda   # speed on a GPU (the memory part is CPU-only)

Backprop through 2000 steps keeps the whole graph: at 512 columns x 8 cells it passed 20 GB,
so the memory comparison uses a small layer by default (--memory-columns, --memory-cells).

Prints time steps per second (one step = one element of every stream in the batch) and
stream-steps per second, and the peak resident memory of a chunk of T=100 vs T=2000 steps in
each mode, each measured in a fresh process. Modes: local (compiled chunks, predictive.fused,
the default on a CPU), local-torch (the same rule as torch ops, step by step: what runs on a
GPU, with lists of fixed shape there) and backprop. On a CPU local-torch is timed up to batch
64 (--torch-batch). The last line counts the host reads per time step of the torch steps with
fixed shapes, learning and inference (torch profiler: nonzero, unique, item, is_nonzero):
`syncs_per_step local=<n> inference=<n>`.
The torch overlap step visits every synapse slot whatever the permanences; the learning step
depends on how many segments learn, so the local layers are timed after `--warmup` steps of
the same kind of input, and the backprop layer starts from random synapses, as the rule
gives it.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from predictive.baselines import LSTMModel
from predictive.learning import build
from predictive.stack import PredictiveStack


def make_stack(args, mode, device="cpu"):
    torch.manual_seed(0)
    rule = make_rule(mode)
    stack = PredictiveStack(
        args.input_size, 1, columns=args.columns, cells=args.cells, active_columns=args.active_columns,
        segments=args.segments, synapses=args.synapses, activation_threshold=13, matching_threshold=10,
        initial_segments="random" if mode == "backprop" else "empty", learning=rule,
    ).to(device)
    if rule.name == "local":  # a layer that has learned for a while
        x = sdr_inputs(1, args.warmup, args.input_size, vocabulary=50).to(device)
        run_chunk(stack, rule, x, stack.initial_state(1, device))
    return stack, rule


MODES = ("local", "local-torch", "backprop")  # local: compiled chunks (predictive.fused); local-torch: torch steps


def make_rule(mode, fixed_shapes=None):
    if mode.startswith("local"):
        return build("local", new_synapses=20, fused=mode == "local", fixed_shapes=fixed_shapes)
    return build(mode)


HOST_READS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::item")


def syncs_per_step(stack, rule, args, steps=5):
    """Host reads per time step of a chunk of the torch steps under `rule`."""
    device = next(stack.parameters()).device
    x = sdr_inputs(2, steps, args.input_size).to(device)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        stack(x, stack.initial_state(2, device), learning=rule)
    reads = [e for e in prof.events() if e.name in HOST_READS or e.name.startswith("aten::unique")]
    return len(reads) / steps


def sdr_inputs(batch, steps, width, on=20, vocabulary=50):
    """Random sequences over a vocabulary of fixed sparse codes (on of width bits each)."""
    g = torch.Generator().manual_seed(1)
    codes = torch.zeros(vocabulary, width).scatter_(1, torch.rand(vocabulary, width, generator=g).topk(on).indices, 1.0)
    return codes[torch.randint(vocabulary, (batch, steps), generator=g)]


def run_chunk(model, rule, x, state):
    if rule.name == "backprop":
        out, state = model(x, state, learning=rule)
        out.cells.sum().backward()  # the graph over the chunk, as BPTT builds and frees it
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            out, state = model(x, state, learning=rule)
    return model.detach_state(state)


def speed(model, rule, batch, steps, args):
    device = next(model.parameters()).device
    state = model.initial_state(batch, device)
    x = sdr_inputs(batch, steps, args.input_size).to(device)
    state = run_chunk(model, rule, x[:, :2], state)  # warm up
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    synchronize()
    start = time.perf_counter()
    run_chunk(model, rule, x, state)
    synchronize()
    seconds = time.perf_counter() - start
    return steps / seconds


def peak_memory(args, mode, steps):
    """Peak RSS (MB) of one chunk of `steps` at batch 1, in a fresh process."""
    cmd = [sys.executable, __file__, "--memory-child", mode, str(steps), *sys.argv[1:]]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux from VmHWM: ru_maxrss would also count the
    parent's peak from before the exec, which hid every chunk behind the speed runs' peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(args, mode, steps):
    """One chunk step by step, keeping only what the mode must keep: nothing in local mode,
    the graph of the whole chunk in backprop mode (the head's per-step outputs, B x T x N,
    come on top of this in both modes)."""
    model, rule = make_stack(args, mode)
    x = sdr_inputs(1, steps, args.input_size)
    states = model.layer_states(model.initial_state(1))
    before = peak_rss_mb()
    total = x.new_zeros(())
    for t in range(steps):
        steps_out, states, _ = model.step_layers(x[:, t], states, None, rule)
        if mode == "backprop":
            total = total + steps_out[-1].cells.sum()
    if mode == "backprop":
        total.backward()
    after = peak_rss_mb()
    print(json.dumps({"before_mb": before, "peak_mb": after, "chunk_mb": after - before}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--columns", type=int, default=2048)
    p.add_argument("--cells", type=int, default=16)
    p.add_argument("--active-columns", type=int, default=40)
    p.add_argument("--segments", type=int, default=4)
    p.add_argument("--synapses", type=int, default=32)
    p.add_argument("--input-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="time steps timed per configuration")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--torch-batch", type=int, default=64, help="on a CPU, the largest batch local-torch is timed at")
    p.add_argument("--lstm-hidden", type=int, default=1024, help="the LSTM's width (the baseline)")
    p.add_argument("--warmup", type=int, default=200, help="steps the local layer learns before it is timed")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (train.py's default is 1)")
    p.add_argument("--memory-columns", type=int, default=128, help="layer size for the T=100 vs T=2000 memory run")
    p.add_argument("--memory-cells", type=int, default=4)
    p.add_argument("--device", default="cpu", help="cpu | cuda: where the speed part runs")
    p.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args, _ = p.parse_known_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        mode, steps = args.memory_child
        args.columns, args.cells = args.memory_columns, args.memory_cells
        return memory_child(args, mode, int(steps))

    stacks = {mode: make_stack(args, mode, args.device) for mode in MODES}
    synapses = stacks["local"][0].layers[0].segments.permanence.numel()
    lstm = LSTMModel(args.input_size, hidden_size=args.lstm_hidden).to(args.device)
    print(f"layer: {args.columns} columns x {args.cells} cells, {args.segments} segments x {args.synapses} "
          f"synapses ({synapses / 1e6:.1f} M synapse slots), input {args.input_size}; torch threads "
          f"{torch.get_num_threads()}; device {args.device}; baseline: LSTM, {args.lstm_hidden} hidden units")
    print(f"{'batch':>5} {'mode':>11} {'steps/s':>9} {'stream-steps/s':>15} {'LSTM steps/s':>13} {'ratio':>7}")
    for batch in args.batches:
        lstm_rate = speed(lstm, make_rule("backprop"), batch, args.steps, args)
        for mode, (stack, rule) in stacks.items():
            if mode == "local-torch" and args.device == "cpu" and batch > args.torch_batch:
                continue
            rate = speed(stack, rule, batch, args.steps, args)
            ratio = rate / lstm_rate
            print(f"{batch:>5} {mode:>11} {rate:>9.1f} {rate * batch:>15.1f} {lstm_rate:>13.1f} {ratio:>7.3f}")

    if args.device == "cpu":
        print(f"\npeak memory of one chunk, batch 1, {args.memory_columns} columns x {args.memory_cells} cells "
              "(resident MB above the model; fresh process each)")
        print(f"{'mode':>9} {'T=100':>9} {'T=2000':>9} {'ratio':>7}")
        for mode in ("local", "backprop"):
            short, long = peak_memory(args, mode, 100), peak_memory(args, mode, 2000)
            ratio = long["chunk_mb"] / max(short["chunk_mb"], 1.0)
            print(f"{mode:>9} {short['chunk_mb']:>9.1f} {long['chunk_mb']:>9.1f} {ratio:>7.1f}")
    stack = stacks["local-torch"][0]
    local = syncs_per_step(stack, make_rule("local-torch", fixed_shapes=True), args)
    inference = syncs_per_step(stack, build("frozen", fused=False), args)  # the torch steps, as on a GPU
    print(f"syncs_per_step local={local:g} inference={inference:g}")


if __name__ == "__main__":
    main()
