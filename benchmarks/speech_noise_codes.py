"""Noise robustness of the column code against dense per-frame features, head on cached features.

    python benchmarks/speech_noise_codes.py                          # Speech Commands, 12 classes
    python benchmarks/speech_noise_codes.py --preset speech_fsdd
    python benchmarks/speech_noise_codes.py --codes kwta,kwta:noise=0.5,dense --seed 1
    python benchmarks/speech_noise_codes.py --preset speech_fsdd --set task.split=speaker --codes kwta,cpc:epochs=10

The local model classifies a fixed random sparse code of each frame (`learning=local`,
`feedforward_rate: 0`: feedforward map + k-WTA), pooled over the voiced span by the task's
head. This script asks whether that code, or a variant of it, keeps more accuracy under the
test-time noise sweep than dense features do, with everything else equal: the preset's
features (computed once per clip, and for the test set at every noise level), the same
pooling and a linear head trained on the clean training clips (the protocol of Ahmad &
Scheinkman 2019: no noise, no augmentation). Codes (`name:key=value+key=value`):

    kwta     the local model's code: a random map with `sparsity` zero weights, `columns`
             columns, the `k` strongest active (`kt` at test)
    kmeans   the same k-WTA on cosine similarity to `columns` spherical k-means centroids of
             training frames (a learned map)
    hebb     kwta's map (same seed), learned on the training frames inside the voiced spans
             by a local rule without labels (`competitive_hebbian`: `rule=oja|mean|residual`,
             `lr`, `passes`, `boost`; `center=0`: frames not centred; `white=eps`: whitened;
             `homeo=eta`: per-column biases that equalise the duty cycles; `lr=0`: none)
    pooler   HTM's spatial pooler on kwta's potential synapses and binarised frames (`q`,
             `inc`, `dec`, `boost`); the code is the k-WTA of the overlaps
    cpc      kwta's map trained by a layer-local contrastive loss: the code predicts itself
             `ahead` steps on, against the other steps of the clip (`epochs`, `lr`, `center`)
    layer    the bottom layer's map and input mean from a run's checkpoint (`ckpt=PATH`), e.g.
             one trained with `model.proximal_ahead` under `learning=local`
    linear   dense: the head on the pooled frames themselves
    dense    dense: a ReLU layer of `columns` units per frame, trained by backprop with the head

`noise=s` (any code) adds N(0, (s std)^2) in training only to what decides the code: the
k-WTA's scores (a stochastic k-WTA), the dense layer's pre-activations, the linear code's
frames; the same regulariser for the sparse and the dense codes.

Prints validation and test accuracy, the noise score (correct answers over the 11 levels) and its ratio to
the `linear` code's. Figures: docs/results.md, "Speech". Minutes on a CPU.
"""

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from predictive.proximal import contrastive_predictive_loss
from predictive.sparse import SparseLinear, kwinners_mask
from tasks.speech.data import NoiseSweep
from tasks.speech.features import frame_energy, voiced_span
from tasks.speech.head import segment_means

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def load_task(preset: str, data_dir: str | None, extra: list[str] = ()):
    overrides = [f"experiment={preset}", "paths.output_dir=.", "task.augment.shift_ms=0", "task.augment.gain_db=0",
                 "task.augment.noise_prob=0", "task.augment.white_noise_prob=0", *extra]
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=overrides + ([f"paths.data_dir={data_dir}"] if data_dir else []))
    return instantiate(cfg.task), cfg


def encode(task, audio: torch.Tensor):
    """(N, samples) waveforms -> (N, T, D) frames and (N, 2) voiced spans, as the task's head sees them."""
    logmel, frames, spans = task.encoder.logmel, [], []
    with torch.no_grad():
        for part in audio.split(256):
            log_mel = logmel.log_mel(part)
            margin = logmel.context_frames
            spans.append(voiced_span(frame_energy(log_mel), task.voiced_threshold, margin, task.voiced_range_db))
            frames.append(logmel.features(log_mel))
    return torch.cat(frames), torch.cat(spans)


def cached_sets(task) -> dict:
    """{"train", "val", "test0" .. "test10"} -> (frames, spans, labels)."""
    data = task.datamodule()
    data.setup()
    sets = {s: (*encode(task, data.sets[s].audio.float() / 32768), data.sets[s].labels) for s in ("train", "val")}
    test = data.sets["test"]
    sweep = NoiseSweep(test, task.noise_levels, 0)
    for level in range(len(task.noise_levels)):
        audio = torch.stack([sweep[level * len(test) + j]["audio"] for j in range(len(test))])
        sets[f"test{level}"] = (*encode(task, audio), test.labels)
    return sets


def cached(task, path: Path | None) -> dict:
    """cached_sets, read from / written to `path` when given (features take minutes)."""
    if path is not None and path.exists():
        return torch.load(path)
    sets = cached_sets(task)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(sets, path)
    return sets


def spherical_kmeans(frames: torch.Tensor, centroids: int, seed: int, iterations: int = 15, sample: int = 60_000):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(frames[torch.randperm(len(frames), generator=g)[:sample]], dim=1)
    centres = x[:centroids].clone()
    for _ in range(iterations):
        nearest = (x @ centres.t()).argmax(1)
        sums = torch.zeros_like(centres).index_add_(0, nearest, x)
        empty = torch.bincount(nearest, minlength=centroids) == 0
        sums[empty] = x[torch.randint(len(x), (int(empty.sum()),), generator=g)]  # restart unused centroids
        centres = F.normalize(sums, dim=1)
    return centres


def voiced_frames(x: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """(N, T, D) frames, (N, 2) spans -> (M, D): the frames inside the spans (those the head pools)."""
    t = torch.arange(x.shape[1])
    return x[(t >= span[:, :1]) & (t < span[:, 1:])]


def hebbian_delta(rule: str, x: torch.Tensor, y: torch.Tensor, won: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Sum over a batch of each row's update (rows that did not win: zero)."""
    if rule == "oja":  # y (x - y w)
        return (won * y).t() @ x - (won * y * y).sum(0).unsqueeze(1) * w
    if rule == "mean":  # x - w
        return won.t() @ x - won.sum(0).unsqueeze(1) * w
    if rule == "residual":  # y (x - a x_hat): the winners reconstruct the frame, each learns from what is left
        recon = (won * y) @ w
        scale = (x * recon).sum(1, keepdim=True) / (recon * recon).sum(1, keepdim=True).clamp(min=1e-8)
        return (won * y).t() @ (x - scale * recon)
    raise ValueError(f"unknown rule {rule!r} (oja | mean | residual)")


def whitening(frames: torch.Tensor, eps: float) -> torch.Tensor:
    """ZCA matrix of centred frames, eigenvalues floored by eps x their mean."""
    values, vectors = torch.linalg.eigh(frames.t() @ frames / len(frames))
    return vectors @ torch.diag((values.clamp(min=0) + eps * values.mean()).rsqrt()) @ vectors.t()


def homeostatic_bias(frames: torch.Tensor, weight: torch.Tensor, k: int, seed: int, o: dict) -> torch.Tensor:
    """Per-column biases learned so that each column wins k/columns of the frames (Foldiak's
    adaptive thresholds, local to the column): b += eta (k/columns - won), decaying over `bpasses`."""
    eta, passes, batch = float(o["homeo"]), int(o.get("bpasses", 2)), int(o.get("batch", 256))
    bias, g = torch.zeros(len(weight)), torch.Generator().manual_seed(seed + 1)
    steps, step = passes * -(-len(frames) // batch), 0
    for _ in range(passes):
        for idx in torch.randperm(len(frames), generator=g).split(batch):
            y = frames[idx] @ weight.t() + bias
            won = torch.zeros_like(y).scatter_(1, y.topk(k, dim=1).indices, 1.0)
            bias += eta * (1 - step / steps) * (k / len(weight) - won.mean(0)) * len(weight) / k
            step += 1
    return bias


def binarise(x: torch.Tensor, q: float) -> torch.Tensor:
    """1 on each frame's top q of its bins, 0 elsewhere: the spatial pooler's binary input."""
    return kwinners_mask(x, max(1, round(q * x.shape[-1]))).float()


def spatial_pooler(frames: torch.Tensor, weight: torch.Tensor, k: int, q: float, seed: int, o: dict) -> torch.Tensor:
    """HTM's spatial pooler on the map's potential synapses (its non-zeros): permanences start
    at 0.5 + 0.1 w / max|w| (connected, >= 0.5: the positive weights); each frame's k winners on
    the overlap with the frame binarised to its top `q` (boosted by duty cycle) move their permanences `inc`
    up on active inputs, `dec` down on inactive ones. Returns the connected synapses (0/1)."""
    inc, dec, passes, batch = float(o.get("inc", 0.03)), float(o.get("dec", 0.01)), int(o.get("passes", 1)), 256
    beta, period = float(o.get("boost", 0.0)), float(o.get("period", 1000))
    potential = weight != 0
    perm = (0.5 + 0.1 * weight / weight.abs().max()) * potential
    duty, g = torch.full((len(weight),), k / len(weight)), torch.Generator().manual_seed(seed)
    for _ in range(passes):
        for idx in torch.randperm(len(frames), generator=g).split(batch):
            x = binarise(frames[idx], q)
            overlap = x @ (perm >= 0.5).float().t()
            choice = overlap * torch.exp(beta * (k / len(weight) - duty)) if beta else overlap
            won = kwinners_mask(choice + 1e-3 * torch.rand(choice.shape, generator=g), k).float()
            duty += (won.mean(0) - duty) / period
            counts = won.sum(0).clamp(min=1).unsqueeze(1)  # mean update over the frames a column won
            step = (inc + dec) * (won.t() @ x) / counts - dec * (won.sum(0) > 0).float().unsqueeze(1)
            perm = ((perm + step) * potential).clamp(0, 1)
    return (perm >= 0.5).float()


def contrastive_predictive(clips: torch.Tensor, weight: torch.Tensor, k: int, seed: int, o: dict) -> torch.Tensor:
    """A map trained by a loss that stays in the layer (CPC / CLAPP-like, no labels): the code
    z_t (the k winners' scores) predicts z_{t+m} through a bilinear map, against the other
    steps of the same clip (so the speaker, the same at every step, does not tell them apart);
    gradients reach only the map (winners) and the bilinear matrix; rows unit norm on the mask.
    The loss of `model.proximal_ahead` (predictive.proximal), trained offline here."""
    lr, epochs, m, batch = float(o.get("lr", 1e-3)), int(o.get("epochs", 3)), int(o.get("ahead", 10)), 32
    torch.manual_seed(seed)
    mask = weight != 0
    w = torch.nn.Parameter(F.normalize(weight, dim=1))
    bilinear = torch.nn.Parameter(torch.eye(len(weight)) * 0.1)
    opt = torch.optim.Adam([w, bilinear], lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(clips), generator=g).split(batch):
            scores = clips[idx] @ w.t()  # (B, T, C)
            z = scores * kwinners_mask(scores.detach(), k)
            loss = contrastive_predictive_loss(z, bilinear, m)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                w.copy_(F.normalize(w * mask, dim=1))
    print(f"  contrastive loss {loss.item():.3f} (chance {torch.log(torch.tensor(float(z.shape[1]))):.3f})")
    return w.detach()


def competitive_hebbian(frames: torch.Tensor, weight: torch.Tensor, k: int, seed: int, o: dict) -> torch.Tensor:
    """A map learned by a local, label-free rule from `weight` (its zeros stay zero): each frame's
    k winners on the current map move their rows, `rule=oja`: w += lr y (x - y w), y = w.x;
    `rule=mean`: w += lr (x - w) (online spherical k-means over k winners); x centred (the
    caller's) and unit norm, rows back to unit norm. lr is per row and batch (the mean over the
    frames it won), decaying linearly over `passes`; `boost=b`: winners chosen on
    y exp(b (k/columns - duty cycle)), the spatial pooler's homeostasis."""
    lr, passes, batch = float(o.get("lr", 0.05)), int(o.get("passes", 2)), int(o.get("batch", 256))
    rule, beta, period = o.get("rule", "oja"), float(o.get("boost", 0.0)), float(o.get("period", 100))
    mask = weight != 0
    w = F.normalize(weight, dim=1)
    g = torch.Generator().manual_seed(seed)
    duty = torch.full((len(w),), k / len(w))
    steps = passes * -(-len(frames) // batch)
    step = 0
    for _ in range(passes):
        for idx in torch.randperm(len(frames), generator=g).split(batch):
            x = F.normalize(frames[idx], dim=1)
            y = x @ w.t()
            choice = y * torch.exp(beta * (k / len(w) - duty)) if beta else y
            won = torch.zeros_like(y).scatter_(1, choice.topk(k, dim=1).indices, 1.0)
            duty += (won.mean(0) - duty) / period
            delta = hebbian_delta(rule, x, y, won, w)
            w += lr * (1 - step / steps) * delta / won.sum(0).clamp(min=1).unsqueeze(1)
            w = F.normalize(w * mask, dim=1)
            step += 1
    return w


def fit_head(features: dict, labels: dict, classes: int, seed: int, epochs: int, lr: float, weight_decay: float):
    """Linear head on pooled features; returns accuracy per set."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(features["train"].shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    x, y = features["train"], labels["train"]
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(32):
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return {s: (head(f).argmax(-1) == labels[s]).float().mean().item() for s, f in features.items()}


def jitter(scores: torch.Tensor, noise: float, g: torch.Generator) -> torch.Tensor:
    """scores + N(0, (noise x their std per frame)^2)."""
    return scores + noise * scores.std(-1, keepdim=True) * torch.randn(scores.shape, generator=g)


def fit_dense(sets: dict, classes: int, units: int, segments: int, seed: int, epochs: int, lr: float, wd: float,
              noise: float = 0.0):
    """A per-frame ReLU layer and the linear head, trained together by backprop."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(sets["train"][0].shape[-1], units)
    head = torch.nn.Linear(units * segments, classes)
    opt = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr, weight_decay=wd)
    g = torch.Generator().manual_seed(seed)
    x, span, y = sets["train"]
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(32):
            hidden = F.relu(jitter(layer(x[idx]), noise, g) if noise else layer(x[idx]))
            loss = F.cross_entropy(head(segment_means(hidden, span[idx], segments)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return {s: (head(segment_means(F.relu(layer(x)), sp, segments)).argmax(-1) == y).float().mean().item()
                for s, (x, sp, y) in sets.items()}


def run_code(spec: str, sets: dict, args, segments: int, classes: int, seed: int) -> dict:
    name, _, options = spec.partition(":")
    o = dict(kv.split("=") for kv in options.split("+")) if options else {}
    columns, k = int(o.get("columns", args.columns)), int(o.get("k", args.k))
    test_k, noise = int(o.get("kt", k)), float(o.get("noise", 0.0))
    labels = {s: y for s, (_, _, y) in sets.items()}
    g = torch.Generator().manual_seed(seed)
    if name == "dense":
        return fit_dense(sets, classes, columns, segments, seed, args.dense_epochs, args.lr, args.weight_decay, noise)
    if name == "linear":
        code = lambda split, x: jitter(x, noise, g) if split == "train" and noise else x  # noqa: E731
    elif name in ("kwta", "kmeans", "hebb", "pooler", "cpc", "layer"):
        mean, bias, tiebreak = 0.0, 0.0, torch.rand(columns, generator=torch.Generator().manual_seed(seed))
        if name in ("kwta", "hebb", "pooler", "cpc"):
            torch.manual_seed(seed)
            sparsity = float(o.get("sparsity", 0.5))
            weight = SparseLinear(sets["train"][0].shape[-1], columns, sparsity=sparsity, bias=False).weight.detach()
        elif name == "kmeans":
            weight = spherical_kmeans(sets["train"][0].flatten(0, 1), columns, seed)
        if name in ("hebb", "pooler", "cpc"):  # learned from the training frames the head pools
            frames = voiced_frames(*sets["train"][:2])
            q = float(o.get("q", 0.2))
            mean = frames.mean(0) if name != "pooler" and int(o.get("center", 1)) else 0.0
        if name == "hebb":
            frames = frames - mean
            if "white" in o:  # the map learns on, and scores, whitened frames: fold the whitening into it
                zca = whitening(frames, float(o["white"]))
                frames = frames @ zca
            start = time.perf_counter()
            weight = competitive_hebbian(frames, weight, k, seed, o)
            if "homeo" in o:
                bias = homeostatic_bias(frames, weight, k, seed, o)
            weight = weight @ zca if "white" in o else weight
            print(f"  {spec}: learned on {len(frames)} frames in {time.perf_counter() - start:.0f} s", flush=True)

        if name == "cpc":
            weight = contrastive_predictive(sets["train"][0] - mean, weight, k, seed, o)
        if name == "layer":
            state = torch.load(o["ckpt"], weights_only=True)["state_dict"]
            weight = state["model.layers.0.feedforward.parametrizations.weight.original"]
            weight = weight * state["model.layers.0.feedforward.parametrizations.weight.0.mask"]
            mean = state["model.layers.0.input_mean"]
        if name == "pooler":
            weight = spatial_pooler(frames, weight, k, q, seed, o)

        def code(split, x):
            if name == "pooler":  # overlaps are integers: a fixed tiny random term breaks their ties
                scores = binarise(x, q) @ weight.t() + 1e-3 * tiebreak
            else:
                scores = (x - mean) @ weight.t() + bias
            if split == "train" and noise:
                scores = jitter(scores, noise, g)
            return kwinners_mask(scores, k if split == "train" else test_k).float()
    else:
        raise ValueError(f"unknown code {name!r} (kwta | kmeans | hebb | pooler | cpc | layer | linear | dense)")
    features = {s: segment_means(code(s, x), span, segments) for s, (x, span, _) in sets.items()}
    return fit_head(features, labels, classes, seed, args.epochs, args.lr, args.weight_decay)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="speech_commands", choices=["speech_commands", "speech_fsdd"])
    parser.add_argument("--data-dir", default=None, help="default: the config's paths.data_dir")
    parser.add_argument("--codes", default="linear,dense,kwta,kwta:noise=0.5")
    parser.add_argument("--columns", type=int, default=512)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30, help="head epochs on the cached codes")
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override of the preset, e.g. task.split=speaker (repeatable)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="a file for the features: read if it exists, else written (one per preset and --set)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    task, cfg = load_task(args.preset, args.data_dir, args.set)
    sets = cached(task, args.cache)
    clips = len(sets["test0"][2])
    print(f"{args.preset}: {len(sets['train'][2])} training clips, {clips} test clips x {len(task.noise_levels)} "
          f"levels, features in {time.perf_counter() - start:.0f} s")
    print(f"{'code':32s} {'val':>6s} {'test':>6s} {'noise':>6s} {'x linear':>8s}  "
          "accuracy at alpha 0.05 / 0.1 / 0.15 / 0.2")
    reference = None
    for spec in args.codes.split(","):
        acc = run_code(spec, sets, args, cfg.task.segments, len(task.classes), args.seed)
        by_level = [acc[f"test{i}"] for i in range(len(task.noise_levels))]
        score = round(sum(by_level) * clips)
        reference = score if spec == "linear" else reference
        ratio = f"{score / reference:.2f}" if reference else "-"
        print(f"{spec:32s} {acc['val']:6.3f} {by_level[0]:6.3f} {score:6d} {ratio:>8s}  "
              + " / ".join(f"{a:.2f}" for a in by_level[1:5]),
              flush=True)


if __name__ == "__main__":
    main()
