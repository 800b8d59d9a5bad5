"""Small-map convolutions: oneDNN's kernels against pipeline.small_conv's GEMMs, on CPU.

    python benchmarks/small_conv.py [--batch 32] [--rounds 5]

Part 1, per convolution (resnet18's 3x3 convs and a 1x1 downsample, by output map size), bf16 and fp32: milliseconds
of the forward, the input gradient and the weight gradient, native vs GEMM, with the ratios. These are hot-cache
numbers; small_conv's limits were set from whole steps, where weights come from memory and the GEMMs win more.
Part 2, whole training steps (forward, backward, the pipeline's AdamW) of resnet18 and resnet50 at 64 and 128 px,
bf16 and fp32 with channels_last: plain nn.Conv2d, GEMM weight gradients only, and small_conv as the pipeline runs it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline.platform import small_conv  # noqa: E402
from pipeline.train import optim

# (in, out, kernel, stride, input side): resnet18's stages at 64 and 128 px inputs and the stage-4 downsample.
CONVS = [(512, 512, 3, 1, 2), (512, 512, 3, 1, 4), (256, 512, 3, 2, 8), (256, 512, 1, 2, 8), (256, 256, 3, 1, 4),
         (256, 256, 3, 1, 8), (128, 128, 3, 1, 8), (128, 128, 3, 1, 16), (64, 64, 3, 1, 16), (64, 64, 3, 1, 32)]


def timed(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def per_conv(batch: int, rounds: int) -> list[float]:
    gains = []
    for dtype in (torch.bfloat16, torch.float32):
        print(f"\n{str(dtype).split('.')[-1]}, batch {batch}, channels_last: ms native / GEMM (speedup)")
        print(f"{'conv':<26}{'out map':>8}{'forward':>22}{'input grad':>22}{'weight grad':>22}")
        for cin, cout, k, stride, side in CONVS:
            out_side = (side + 2 * (k // 2) - k) // stride + 1
            row = f"{f'{cin}->{cout} {k}x{k} stride {stride}':<26}{f'{out_side}x{out_side}':>8}"
            x = torch.randn(batch, cin, side, side, dtype=dtype).to(memory_format=torch.channels_last)
            w = torch.randn(cout, cin, k, k, dtype=dtype).to(memory_format=torch.channels_last)
            conf = ((stride, stride), (k // 2, k // 2), (1, 1))
            g = torch.randn_like(F.conv2d(x, w, None, *conf)).contiguous(memory_format=torch.channels_last)

            def native(mask):
                return lambda: torch.ops.aten.convolution_backward(g, x, w, None, *conf, False, [0, 0], 1, mask)
            pairs = [(lambda: F.conv2d(x, w, None, *conf), lambda: small_conv.conv_forward(x, w, None, *conf)),
                     (native([True, False, False]), lambda: small_conv.input_grad(g, x.shape, w, *conf)),
                     (native([False, True, False]), lambda: small_conv.weight_grad(g, x, w.shape, *conf))]
            for a_fn, b_fn in pairs:
                # Alternate the two, so load from other processes falls on both.
                a, b = zip(*[(timed(a_fn, 1), timed(b_fn, 1)) for _ in range(rounds)])
                a, b = statistics.median(a), statistics.median(b)
                row += f"{f'{a:.2f} / {b:.2f} ({a / b:.1f}x)':>22}"
            if dtype == torch.bfloat16 and out_side * out_side <= small_conv.MAX_OUTPUT_PIXELS[dtype]:
                gains.append(a / b)
            print(row)
    return gains


def step_rate(model, x, y, precision: str, steps: int) -> float:
    opt = optim.build_optimizer([{"params": list(model.parameters())}], "adamw", 1e-4, 0.9, False, (0.9, 0.999))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(x) / (time.perf_counter() - start)


VARIANTS = {"plain": None, "wgrad only": 1 << 62, "small_conv": small_conv.FULL_GEMM_MIN_WEIGHT}


def whole_steps(batch: int, rounds: int) -> list[str]:
    print(f"\ntraining step img/s, batch {batch}, channels_last, the pipeline's AdamW: plain nn.Conv2d, GEMM weight "
          f"gradients only, small_conv as the pipeline runs it (speedup over plain)")
    print(f"{'model':<10}{'size':>5}{'precision':>10}" + "".join(f"{v:>18}" for v in VARIANTS))
    summary = []
    for name in ("resnet18", "resnet50"):
        model = timm.create_model(name, num_classes=10).to(memory_format=torch.channels_last).train()
        for size in (64, 128):
            x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (batch,))
            for precision in ("fp32", "bf16"):
                got = {v: [] for v in VARIANTS}
                for _ in range(rounds):
                    for variant, min_weight in VARIANTS.items():
                        (small_conv.restore if min_weight is None else small_conv.convert)(model)
                        small_conv.FULL_GEMM_MIN_WEIGHT = min_weight or VARIANTS["small_conv"]
                        got[variant].append(step_rate(model, x, y, precision, 3))
                rates = {v: statistics.median(r) for v, r in got.items()}
                cells = [f"{r:.1f} ({r / rates['plain']:.2f}x)" for r in rates.values()]
                print(f"{name:<10}{size:>5}{precision:>10}" + "".join(f"{c:>18}" for c in cells))
                summary.append(f"{name}@{size} {precision} {rates['small_conv'] / rates['plain']:.2f}x")
            small_conv.restore(model)
    small_conv.FULL_GEMM_MIN_WEIGHT = VARIANTS["small_conv"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    gains = per_conv(args.batch, args.rounds)
    steps = whole_steps(args.batch, max(1, args.rounds // 2))
    print(f"summary: GEMM weight gradient {min(gains):.1f}-{max(gains):.1f}x oneDNN's on the bf16 convs it takes; "
          f"whole step small_conv vs plain: {', '.join(steps)}")


if __name__ == "__main__":
    main()
