"""``python -m sparsekit demo``: a small character-level transformer trained three ways on real text.

The corpus is the Python standard library's own source (a fixed list of modules, read from the running
interpreter: it ships with every installation, nothing is downloaded). Every model has the same shape: token
embedding, ``layers`` blocks of causal self-attention and a sparsekit :class:`~sparsekit.moe.MoE` feed-forward
layer, and a tied output projection. The runs differ in one thing each:

- ``dense``: all weights dense, MoE with aux-loss-free balancing;
- ``sparse``: the same, with its linear weights under :class:`~sparsekit.sparsity.DynamicSparsity`
  (progressive schedule: dense warm-up, linear ramp down to the target density, stable phase);
- ``unbalanced``: dense weights, MoE without balancing (the reference for the expert-load columns).

Under ``torchrun --nproc_per_node N`` each rank trains on its slice of every batch and gradients are averaged
by :class:`~sparsekit.comm.GradientSync` over gloo: the numbers equal a one-process run's (up to float
rounding of the reduction order).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Standard-library modules that make up the corpus (present in every CPython >= 3.10).
CORPUS_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "contextlib", "csv", "dataclasses", "datetime",
    "difflib", "enum", "fractions", "functools", "gettext", "heapq", "inspect", "ipaddress", "json/decoder",
    "json/encoder", "logging/__init__", "os", "pathlib", "pprint", "queue", "random", "shlex", "shutil",
    "statistics", "string", "textwrap", "threading", "tokenize", "typing", "uuid", "warnings", "zipfile",
)
VOCAB = 128  # bytes 0..126 as themselves, everything else as 127


@dataclass
class DemoConfig:
    """Every knob of the demo (``python -m sparsekit demo --help`` lists them)."""

    steps: int = 600
    density: float = 0.2
    method: str = "rigl"
    experts: int = 8
    k: int = 2
    layers: int = 2
    d_model: int = 96
    d_ff: int = 192
    heads: int = 4
    context: int = 64
    batch: int = 32
    lr: float = 3e-3
    balance_rate: float = 0.01  # aux-free bias step; larger than DeepSeek-V3's 1e-3 for a run this short
    router_lr_scale: float = 0.1  # the routers learn slower than the experts (fast routers collapse onto few experts)
    corpus_chars: int = 600_000
    eval_every: int = 50
    seed: int = 0
    threads: int = 2
    out: str = "sparsekit-demo"
    runs: tuple[str, ...] = ("dense", "sparse", "unbalanced")

    @classmethod
    def quick(cls) -> "DemoConfig":
        """A run that finishes in well under a minute on 2 cores (the test suite uses it)."""
        return cls(steps=120, d_model=64, d_ff=128, context=48, batch=16, corpus_chars=150_000, eval_every=30)


# ---------------------------------------------------------------------------------------------------------
# Data


def load_corpus(chars: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``chars`` bytes of the corpus modules, as token ids; plus the files read."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    parts, used, total = [], [], 0
    for name in CORPUS_MODULES:
        path = root / f"{name}.py"
        if not path.is_file():
            continue
        data = path.read_bytes()
        parts.append(data)
        used.append(str(path.relative_to(root)))
        total += len(data)
        if total >= chars:
            break
    raw = b"\n".join(parts)[:chars]
    if len(raw) < 10_000:
        raise RuntimeError(f"the standard library under {root} has too little source to train on")
    ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64).clamp_(max=VOCAB - 1)
    return ids, used


def batches(train: torch.Tensor, cfg: DemoConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (the same on every rank and in every run: seeded by the step)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, train.numel() - cfg.context - 1, (cfg.batch,), generator=gen)
    offsets = torch.arange(cfg.context + 1)
    window = train[starts[:, None] + offsets]
    return window[:, :-1], window[:, 1:]


# ---------------------------------------------------------------------------------------------------------
# Model


class Block(nn.Module):
    def __init__(self, cfg: DemoConfig, balance: bool) -> None:
        super().__init__()
        import torch.distributed as dist

        from .moe import MoE

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.moe = MoE(cfg.d_model, cfg.d_ff, cfg.experts, cfg.k, score="sigmoid",
                       balancer="aux_free" if balance else "none", rate=cfg.balance_rate,
                       process_group=True if distributed else None)  # counts summed over ranks
        self.heads = cfg.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x).reshape(b * t, d)
        return x + self.moe(h).reshape(b, t, d)


class CharLM(nn.Module):
    def __init__(self, cfg: DemoConfig, balance: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied with the output: small logits at the start
        self.pos = nn.Parameter(torch.zeros(cfg.context, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg, balance) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T


def is_router(name: str) -> bool:
    """Whether ``name`` is an MoE layer's router (gate) weight."""
    return name.endswith("moe.gate")


def sparse_parameters(model: CharLM) -> list[tuple[str, nn.Parameter]]:
    """The weights DynamicSparsity manages: attention and expert matrices (not embeddings, norms, routers)."""
    return [
        (name, p)
        for name, p in model.named_parameters()
        if p.dim() >= 2 and not name.startswith(("embed", "pos")) and not is_router(name)
    ]


# ---------------------------------------------------------------------------------------------------------
# Training


@dataclass
class RunResult:
    name: str
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    density: list[float] = field(default_factory=list)
    expert_load: list[list[float]] = field(default_factory=list)  # per eval: layer 0's per-expert load share
    imbalance: list[float] = field(default_factory=list)  # per step: max/mean expert load, worst MoE layer
    final_density: float = 1.0
    flop_fraction: float = 1.0
    seconds_per_step: float = 0.0


def _moe_layers(model: CharLM) -> list[Any]:
    return [block.moe for block in model.blocks]


def _expert_loads(model: CharLM) -> list[torch.Tensor]:
    """Per-layer token counts per expert of the last forward pass (float tensors of length E)."""
    return [layer.last_counts().to(torch.float64) for layer in _moe_layers(model)]


@torch.no_grad()
def evaluate(model: CharLM, val: torch.Tensor, cfg: DemoConfig) -> float:
    model.eval()
    usable = (val.numel() - 1) // cfg.context * cfg.context
    x = val[:usable].view(-1, cfg.context)
    y = val[1 : usable + 1].view(-1, cfg.context)
    total = 0.0
    for i in range(0, x.shape[0], 64):
        logits = model(x[i : i + 64])
        total += float(F.cross_entropy(logits.reshape(-1, VOCAB), y[i : i + 64].reshape(-1), reduction="sum"))
    model.train()
    return total / y.numel()


def train_one(name: str, cfg: DemoConfig, train: torch.Tensor, val: torch.Tensor, progress: bool) -> RunResult:
    """Train one run; under torch.distributed each rank takes its slice of every global batch."""
    import torch.distributed as dist

    from .comm import GradientSync
    from .sparsity import DynamicSparsity, Progressive

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if cfg.batch % world:
        raise ValueError(f"--batch {cfg.batch} must be divisible by the number of processes ({world})")

    torch.manual_seed(cfg.seed)
    model = CharLM(cfg, balance=name != "unbalanced")
    routers = [p for n, p in model.named_parameters() if is_router(n)]
    others = [p for n, p in model.named_parameters() if not is_router(n)]
    groups: list[dict[str, Any]] = [{"params": others}, {"params": routers, "lr": cfg.lr * cfg.router_lr_scale}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    sync = GradientSync(model) if distributed else None
    sparsity = None
    if name == "sparse":
        schedule = Progressive(cfg.steps, warmup=0.1, ramp=0.3)
        sparsity = DynamicSparsity(
            sparse_parameters(model), optimizer, density=cfg.density, method=cfg.method, schedule=schedule,
            update_every=max(1, cfg.steps // 30), seed=cfg.seed,
        )

    result = RunResult(name)
    bar = _progress(cfg.steps, name, enabled=progress and rank == 0)
    start = time.perf_counter()
    for step in range(cfg.steps):
        x, y = batches(train, cfg, step)
        x, y = x[rank::world], y[rank::world]
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sync is not None:
            sync.finish()
        if sparsity is not None:
            sparsity.step()
        optimizer.step()
        for layer in _moe_layers(model):
            layer.balancer_step()
        loss_value = float(loss.detach())
        if distributed:
            loss_t = torch.tensor([loss_value])
            dist.all_reduce(loss_t)
            loss_value = float(loss_t) / world
        result.steps.append(step)
        result.train_loss.append(loss_value)
        result.density.append(float(sparsity.density()) if sparsity is not None else 1.0)
        loads = _expert_loads(model)
        result.imbalance.append(max(float(c.max() / c.mean().clamp(min=1e-12)) for c in loads))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            result.eval_steps.append(step + 1)
            result.val_loss.append(evaluate(model, val, cfg))
            result.expert_load.append((loads[0] / loads[0].sum().clamp(min=1)).tolist())
        if bar is not None:
            bar.set_postfix(loss=f"{loss_value:.3f}", density=f"{result.density[-1]:.2f}", imb=f"{result.imbalance[-1]:.2f}" if result.imbalance else "-")
            bar.update(1)
    result.seconds_per_step = (time.perf_counter() - start) / cfg.steps
    if bar is not None:
        bar.close()
    if sparsity is not None:
        stats = sparsity.stats()
        result.final_density = float(sparsity.density())
        result.flop_fraction = float(stats["flop_fraction"])
    return result


def _progress(total: int, name: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{name:>10}", unit="step", file=sys.stdout, dynamic_ncols=True, leave=True)


# ---------------------------------------------------------------------------------------------------------
# Report


def table(results: list[RunResult]) -> str:
    """The closing table, one row per run."""
    head = f"{'run':<11}{'val loss':>9}{'bits/char':>10}{'density':>9}{'FLOPs':>7}{'max/mean load':>14}{'ms/step':>9}"
    # load: mean over the last third of the steps of the worst layer's max/mean tokens per expert
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r.name:<11}{r.val_loss[-1]:>9.3f}{r.val_loss[-1] / math.log(2):>10.3f}{r.final_density:>9.2f}"
            f"{r.flop_fraction:>7.2f}{late_imbalance(r):>14.2f}{r.seconds_per_step * 1e3:>9.1f}"
        )
    return "\n".join(rows)


def late_imbalance(r: RunResult) -> float:
    """Mean max/mean expert load over the last third of the run (one step's value is noisy)."""
    tail = r.imbalance[len(r.imbalance) * 2 // 3 :] or r.imbalance
    return sum(tail) / len(tail)


def plot(results: list[RunResult], out: Path) -> list[Path]:
    """Loss curves, density over steps and per-expert load over steps, as PNG files in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        smooth = torch.tensor(r.train_loss).unfold(0, min(20, len(r.train_loss)), 1).mean(1)
        ax.plot(range(len(smooth)), smooth, label=f"{r.name} train", alpha=0.6)
        ax.plot(r.eval_steps, r.val_loss, "o-", label=f"{r.name} val")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/char)", title="Loss")
    ax.legend()
    written.append(_save(fig, out / "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 3))
    for r in results:
        ax.plot(r.steps, r.density, label=r.name)
    ax.set(xlabel="step", ylabel="weight density", title="Density (progressive schedule)", ylim=(0, 1.05))
    ax.legend()
    written.append(_save(fig, out / "density.png"))

    balanced = [r for r in results if r.name in ("dense", "unbalanced")] or results
    fig, axes = plt.subplots(1, len(balanced), figsize=(6 * len(balanced), 3.5), squeeze=False)
    for ax, r in zip(axes[0], balanced):
        loads = torch.tensor(r.expert_load)
        for e in range(loads.shape[1]):
            ax.plot(r.eval_steps, loads[:, e], label=f"expert {e}")
        label = "aux-loss-free balancing" if r.name != "unbalanced" else "no balancing"
        ax.set(xlabel="step", ylabel="share of tokens (layer 0)", title=f"Expert load: {r.name} run, {label}")
    axes[0][0].legend(fontsize="x-small", ncol=2)
    written.append(_save(fig, out / "expert_load.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# Entry point


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (``python -m sparsekit demo --help``)."""
    d = DemoConfig()
    parser.add_argument("--quick", action="store_true", help="a small run that finishes in under a minute (used by the tests)")
    parser.add_argument("--steps", type=int, help=f"training steps per run (default {d.steps}; --quick: {DemoConfig.quick().steps})")
    parser.add_argument("--density", type=float, default=d.density, help="target weight density of the sparse run, in (0, 1]")
    parser.add_argument("--method", default=d.method, choices=["rigl", "set", "gradient_topk", "magnitude"], help="DynamicSparsity method")
    parser.add_argument("--experts", type=int, default=d.experts, help="experts per MoE layer")
    parser.add_argument("--k", type=int, default=d.k, help="experts per token")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the weights and of the batch order")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch and sparsekit threads per process")
    parser.add_argument("--out", default=d.out, help="folder for the PNG plots and results.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the demo as configured by ``args``; prints the table and where the plots went."""
    import torch.distributed as dist

    from . import set_num_threads

    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    cfg.steps = args.steps if args.steps is not None else cfg.steps
    cfg.density, cfg.method, cfg.experts, cfg.k = args.density, args.method, args.experts, args.k
    cfg.seed, cfg.threads, cfg.out = args.seed, args.threads, args.out
    if not 0.0 < cfg.density <= 1.0:
        print(f"demo: --density must be in (0, 1], got {cfg.density}")
        return 2
    if not 1 <= cfg.k <= cfg.experts:
        print(f"demo: need 1 <= --k <= --experts, got k={cfg.k}, experts={cfg.experts}")
        return 2
    if cfg.steps < 1:
        print(f"demo: --steps must be positive, got {cfg.steps}")
        return 2

    torch.set_num_threads(cfg.threads)
    set_num_threads(cfg.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0

    ids, files = load_corpus(cfg.corpus_chars)
    split = int(ids.numel() * 0.9)
    train, val = ids[:split], ids[split:]
    if rank == 0:
        world = dist.get_world_size() if distributed else 1
        print(f"corpus: {ids.numel():,} characters of Python standard-library source ({len(files)} files: {files[0]}, {files[1]}, ...)")
        print(f"model: {cfg.layers} blocks, d_model {cfg.d_model}, MoE {cfg.experts} experts top-{cfg.k}, d_ff {cfg.d_ff}; "
              f"{cfg.steps} steps of {cfg.batch}x{cfg.context} characters on {world} process(es)")
        print(f"sparse run: {cfg.method}, density {cfg.density}, progressive schedule (10% dense, 30% ramp, 60% stable)")

    results = [train_one(name, cfg, train, val, progress=not args.no_progress) for name in cfg.runs]
    if rank == 0:
        print()
        print(table(results))
        out = Path(cfg.out).resolve()
        written = plot(results, out)
        (out / "results.json").write_text(json.dumps({"config": asdict(cfg), "runs": [asdict(r) for r in results]}, indent=1))
        print(f"\nplots: {', '.join(str(p) for p in written)}")
        print(f"results: {out / 'results.json'}")
    if distributed:
        dist.destroy_process_group()
    return 0
