"""``fused-resnet train``: train the fused ResNet and the eager one from the same seed (same initial weights,
same batches in the same order) on a real image dataset, plot both loss and accuracy curves in one figure, and
give a parity verdict: the two runs must agree within the noise of the measurement.

Default data: scikit-learn's handwritten digits (shipped inside the package, no download), upsampled to
32x32: 8 epochs of 22 steps for each model, several minutes on a 2-core CPU (--epochs 2 --limit 240 for a
quick look). --data DIR takes an ImageFolder-style folder (DIR/<class>/<images>), loaded whole into memory
(refused, naming a --limit and a --size that fit, when it would not fit). Checkpoints are plain state_dicts
with torchvision's keys:
torchvision.models.resnet18(num_classes=K).load_state_dict(torch.load("checkpoint_fused.pt")) works.

Verdict, from two comparisons:
  final test accuracy: allowed difference = 3 x the standard error of a difference of two accuracies on this
      test set, sqrt(2 p (1 - p) / n), plus one image;
  last-epoch training loss: allowed difference = 3 x the standard error of that difference (from the spread
      of the per-step losses) + 2% of the mean.
A comparison whose difference exceeds its allowance disagrees. One that stays within it agrees only if the
allowance is narrow enough to mean something: at most 10 accuracy points (the message says how many test
images would get there), and at least 5 training steps in the last epoch for the loss's spread. Otherwise
it is inconclusive.
  AGREE         both comparisons agree                                        exit code 0
  DISAGREE      either comparison disagrees                                   exit code 1
  INCONCLUSIVE  neither disagrees, but one is inconclusive (too little data)  exit code 3
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

from .. import backends
from ..benchmarking import e2e
from ..benchmarking.report import triton_interpreted
from ..models import BUILDERS
from . import plots
from .common import (CLIError, Progress, ResultWriter, add_arch_argument, add_batch_argument, add_common_arguments,
                     add_dtype_arguments, add_size_argument, check_dtype, format_table, positive_float, positive_int,
                     resolve_device, result_document)
from .data import load, split

HELP = "train fused and eager ResNets from one seed on a real dataset; curves and a parity verdict"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help=HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="ImageFolder-style folder (default: scikit-learn's digits)")
    add_arch_argument(p, BUILDERS, "resnet18")
    p.add_argument("--epochs", type=positive_int, default=8)
    add_batch_argument(p, 64, "default 64")
    add_size_argument(p, 32, "image height = width after resizing; default 32")
    p.add_argument("--lr", type=positive_float, default=0.02, help="SGD learning rate (cosine schedule)")
    add_dtype_arguments(p, "fp32", "autocast dtype; default fp32")
    p.add_argument("--backend", choices=list(backends.BACKENDS), default=None,
                   help="fused backend (default: the fastest available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=positive_float, default=0.2)
    p.add_argument("--limit", type=positive_int, default=None,
                   help="a random subset of N images (drawn from --seed), picked before loading: quick runs, or a "
                        "--data folder too large for memory")
    add_common_arguments(p, "fused_resnet_results")
    p.set_defaults(run=run)


def _train(name, model, data, args, device, dtype, bar) -> dict:
    x_train, y_train, x_test, y_test = data
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = len(y_train) // args.batch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
    order_gen = torch.Generator().manual_seed(args.seed)  # the same batches in the same order for both models
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    history = dict(train_loss=[], test_loss=[], test_acc=[], epoch_s=[])
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(y_train), generator=order_gen)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch:(i + 1) * args.batch]
            xb = x_train[idx].to(device).contiguous(memory_format=torch.channels_last)
            yb = y_train[idx].to(device)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(**autocast):
                loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            value = loss.item()
            if not math.isfinite(value):
                raise CLIError(f"{name} model: the training loss became {value} at epoch {epoch + 1}, step {i + 1}; "
                               "try a lower --lr")
            history["train_loss"].append(value)
            bar.update(info=f"{name} epoch {epoch + 1}/{args.epochs} loss {value:.3f}")
        history["epoch_s"].append(time.perf_counter() - t0)
        test_loss, test_acc = _evaluate(model, x_test, y_test, args.batch, device, autocast)
        history["test_loss"].append(test_loss)
        history["test_acc"].append(test_acc)
    return history


@torch.no_grad()
def _evaluate(model, x, y, batch, device, autocast) -> tuple[float, float]:
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        xb = x[i:i + batch].to(device).contiguous(memory_format=torch.channels_last)
        yb = y[i:i + batch].to(device)
        with torch.autocast(**autocast):
            logits = model(xb).float()
        total_loss += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    return total_loss / len(y), correct / len(y)


# An accuracy allowance wider than this says nothing: 10 points is the difference between a model that works
# and one that is subtly broken (a wrong BatchNorm statistic costs a few points).
MAX_ACC_BOUND = 0.10
# Fewer per-step losses than this give no usable estimate of their spread (with one, it is zero).
MIN_LOSS_STEPS = 5
EXIT_CODES = {"AGREE": 0, "DISAGREE": 1, "INCONCLUSIVE": 3}


def accuracy_bound(p: float, n: int) -> float:
    """The allowed difference of two accuracies near ``p`` on ``n`` test images (module docstring)."""
    p = min(max(p, 1 / n), 1 - 1 / n)
    return 3 * math.sqrt(2 * p * (1 - p) / n) + 1 / n


def images_needed(p: float, limit: float = MAX_ACC_BOUND) -> int:
    """The fewest test images for which ``accuracy_bound(p, n) <= limit`` (the bound shrinks with n)."""
    hi = 2
    while accuracy_bound(p, hi) > limit:
        hi *= 2
    lo = hi // 2
    while lo + 1 < hi:  # accuracy_bound(p, lo) > limit >= accuracy_bound(p, hi)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if accuracy_bound(p, mid) <= limit else (mid, hi)
    return hi


def verdict(eager: dict, fused: dict, n_test: int, steps_per_epoch: int) -> dict:
    """AGREE, DISAGREE or INCONCLUSIVE, with each comparison's figures (the rule is in the module docstring)."""
    acc_e, acc_f = eager["test_acc"][-1], fused["test_acc"][-1]
    p = (acc_e + acc_f) / 2
    acc_bound = accuracy_bound(p, n_test)
    acc_diff = abs(acc_f - acc_e)
    needed, needed_worst = images_needed(p), images_needed(0.5)
    acc_status = ("DISAGREE" if acc_diff > acc_bound else "AGREE" if acc_bound <= MAX_ACC_BOUND
                  else "INCONCLUSIVE")

    last_e, last_f = eager["train_loss"][-steps_per_epoch:], fused["train_loss"][-steps_per_epoch:]
    mean_e, mean_f = statistics.fmean(last_e), statistics.fmean(last_f)
    spread = math.sqrt(sum(statistics.pvariance(v) / len(v) for v in (last_e, last_f)))
    loss_bound = 3 * spread + 0.02 * (mean_e + mean_f) / 2
    loss_diff = abs(mean_f - mean_e)
    loss_status = ("INCONCLUSIVE" if steps_per_epoch < MIN_LOSS_STEPS else
                   "DISAGREE" if loss_diff > loss_bound else "AGREE")

    statuses = (acc_status, loss_status)
    status = "DISAGREE" if "DISAGREE" in statuses else "INCONCLUSIVE" if "INCONCLUSIVE" in statuses else "AGREE"
    reasons = []
    if acc_status == "INCONCLUSIVE":
        reasons.append(f"the test set has {n_test} images: the allowed accuracy difference is "
                       f"{100 * acc_bound:.1f} points, wider than the {100 * MAX_ACC_BOUND:.0f} points that would "
                       f"mean something; about {needed} test images would bring it there at this accuracy "
                       f"({100 * p:.0f}%), {needed_worst} at 50% (the worst case)")
    if loss_status == "INCONCLUSIVE":
        reasons.append(f"the last epoch has {steps_per_epoch} training step(s), fewer than the {MIN_LOSS_STEPS} "
                       "the loss comparison needs (more training images or a smaller --batch)")
    return dict(status=status, ok=status == "AGREE", exit_code=EXIT_CODES[status], reasons=reasons,
                final_test_acc=dict(eager=acc_e, fused=acc_f, difference=acc_diff, bound=acc_bound,
                                    max_meaningful_bound=MAX_ACC_BOUND, test_images=n_test,
                                    test_images_needed=needed, test_images_needed_worst_case=needed_worst,
                                    status=acc_status, ok=acc_status == "AGREE"),
                last_epoch_train_loss=dict(eager=mean_e, fused=mean_f, difference=loss_diff, bound=loss_bound,
                                           steps=steps_per_epoch, min_steps=MIN_LOSS_STEPS, status=loss_status,
                                           ok=loss_status == "AGREE"))


def run(args) -> int:
    device = resolve_device(args.device)
    dtype = check_dtype(args.dtype, device)
    if args.size < 16:
        raise CLIError(f"--size {args.size} is too small: use >= 16")
    if not 0 < args.test_fraction < 1:
        raise CLIError(f"--test-fraction must be between 0 and 1, got {args.test_fraction}")
    if args.batch < 2:
        raise CLIError("--batch must be >= 2: training-mode BatchNorm needs more than one value per channel")
    try:
        backend = backends.resolve(args.backend, device)
    except backends.BackendUnavailableError as exc:
        raise CLIError(str(exc)) from None
    dataset = load(args.data, args.size, args.limit, args.seed)
    x_train, y_train, x_test, y_test = split(dataset, args.test_fraction, args.seed)
    steps_per_epoch = len(y_train) // args.batch
    if steps_per_epoch < 1:
        raise CLIError(f"--batch {args.batch} is larger than the {len(y_train)} training images")
    mean = x_train.mean((0, 2, 3), keepdim=True)
    std = x_train.std((0, 2, 3), keepdim=True).clamp_min(1e-3)
    data = ((x_train - mean) / std, y_train, (x_test - mean) / std, y_test)

    num_classes = len(dataset.classes)
    torch.manual_seed(args.seed)
    eager, source = e2e.build_eager(args.arch, num_classes)
    fused = BUILDERS[args.arch](num_classes=num_classes, backend=backend)
    fused.load_state_dict(eager.state_dict())  # the same initial weights

    with ResultWriter(args.out) as writer:
        histories = {}
        with Progress(2 * args.epochs * steps_per_epoch, "train", enabled=not args.quiet) as bar:
            for name, model in (("eager", eager), ("fused", fused)):
                torch.manual_seed(args.seed)
                histories[name] = _train(name, model, data, args, device, dtype, bar)
        v = verdict(histories["eager"], histories["fused"], len(y_test), steps_per_epoch)

        title = (f"{args.arch} on {dataset.name}: {len(y_train)} train / {len(y_test)} test images, "
                 f"{num_classes} classes, {args.size}x{args.size}, {args.dtype}, batch {args.batch}, "
                 f"{args.epochs} epochs | {device.type} | fused backend {backend}")
        print("\n" + title)
        rows = [[e + 1, histories["eager"]["test_loss"][e], histories["fused"]["test_loss"][e],
                 100 * histories["eager"]["test_acc"][e], 100 * histories["fused"]["test_acc"][e],
                 histories["eager"]["epoch_s"][e], histories["fused"]["epoch_s"][e]]
                for e in range(args.epochs)]
        print(format_table(["epoch", "eager test loss", "fused test loss", "eager test acc %", "fused test acc %",
                            "eager epoch s", "fused epoch s"], rows))
        acc, loss = v["final_test_acc"], v["last_epoch_train_loss"]
        print(f"parity verdict: {v['status']} | final test accuracy eager {100 * acc['eager']:.2f}% vs fused "
              f"{100 * acc['fused']:.2f}% (allowed difference {100 * acc['bound']:.2f} points: {acc['status']}) | "
              f"last-epoch train loss eager {loss['eager']:.4f} vs fused {loss['fused']:.4f} (allowed "
              f"{loss['bound']:.4f} over {loss['steps']} steps: {loss['status']})")
        for reason in v["reasons"]:
            print(f"inconclusive: {reason}")

        torch.save(fused.state_dict(), writer.path("checkpoint_fused.pt"))
        torch.save(eager.state_dict(), writer.path("checkpoint_eager.pt"))
        config = dict(arch=args.arch, epochs=args.epochs, batch=args.batch, size=args.size, lr=args.lr,
                      dtype=args.dtype, backend=backend, seed=args.seed, test_fraction=args.test_fraction,
                      limit=args.limit, eager_model_source=source)
        dataset_info = dict(name=dataset.name, classes=dataset.classes, train_images=len(y_train),
                            test_images=len(y_test))
        records = [dict(variant=name, backend=None if name == "eager" else backend,
                        interpreted=name != "eager" and backend == "triton" and triton_interpreted(), **h)
                   for name, h in histories.items()]
        writer.write_json("train.json", result_document(
            "train", getattr(args, "argv", None), device, config, records, dataset=dataset_info, verdict=v,
            checkpoints=dict(fused="checkpoint_fused.pt", eager="checkpoint_eager.pt")))
        writer.chart("train.png", plots.training_chart, histories,
                     title.replace(" | ", "\n", 1) + f" | verdict: {v['status']}")
        writer.finish()
    return v["exit_code"]
