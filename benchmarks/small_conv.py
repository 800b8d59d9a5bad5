"""Weight gradients of small-map convolutions: oneDNN's kernel against pipeline.small_conv's GEMM, on CPU.

    python benchmarks/small_conv.py [--batch 32] [--rounds 5]

Part 1, per convolution (resnet18's 3x3 convs and a 1x1 downsample, by output map size): milliseconds of the weight
gradient alone, bf16 and fp32, native vs GEMM, with the ratio; it is what sets small_conv.MAX_OUTPUT_PIXELS.
Part 2, whole training steps (forward, backward, fused AdamW) of resnet18 and resnet50 at 64 and 128 px, bf16 and
fp32 with channels_last, plain nn.Conv2d vs converted, so the per-conv gains are seen in what a user trains.
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

from pipeline import small_conv  # noqa: E402

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
    print(f"weight gradient of one conv, batch {batch}, channels_last: ms (native / GEMM = speedup)")
    print(f"{'conv':<28}{'out map':>8}{'bf16 native':>13}{'GEMM':>8}{'x':>7}{'fp32 native':>13}{'GEMM':>8}{'x':>7}")
    gains = []
    for cin, cout, k, stride, side in CONVS:
        row = f"{cin}->{cout} {k}x{k} stride {stride}"
        out_side = (side + 2 * (k // 2) - k) // stride + 1
        row = f"{row:<28}{f'{out_side}x{out_side}':>8}"
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(batch, cin, side, side, dtype=dtype).to(memory_format=torch.channels_last)
            w = torch.randn(cout, cin, k, k, dtype=dtype).to(memory_format=torch.channels_last)
            conf = ((stride, stride), (k // 2, k // 2), (1, 1))
            g = torch.randn_like(F.conv2d(x, w, None, *conf)).contiguous(memory_format=torch.channels_last)
            native = lambda: torch.ops.aten.convolution_backward(g, x, w, None, *conf, False, [0, 0], 1,  # noqa: E731
                                                                 [False, True, False])
            gemm = lambda: small_conv.weight_grad(g, x, w.shape, *conf)  # noqa: E731
            # Alternate the two, so load from other processes falls on both.
            a, b = zip(*[(timed(native, 1), timed(gemm, 1)) for _ in range(rounds)])
            a, b = statistics.median(a), statistics.median(b)
            row += f"{a:>13.2f}{b:>8.2f}{a / b:>7.2f}"
            if dtype == torch.bfloat16 and out_side * out_side <= small_conv.MAX_OUTPUT_PIXELS[dtype]:
                gains.append(a / b)
        print(row)
    return gains


def step_rate(model, x, y, precision: str, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

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


def whole_steps(batch: int, rounds: int) -> list[str]:
    print(f"\ntraining step img/s, batch {batch}, channels_last, fused AdamW (plain -> converted = speedup)")
    print(f"{'model':<10}{'size':>5}{'fp32 plain':>12}{'converted':>11}{'x':>6}{'bf16 plain':>12}{'converted':>11}"
          f"{'x':>6}{'bf16/fp32':>11}")
    summary = []
    for name in ("resnet18", "resnet50"):
        model = timm.create_model(name, num_classes=10).to(memory_format=torch.channels_last).train()
        for size in (64, 128):
            x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (batch,))
            rates = {}
            for precision in ("fp32", "bf16"):
                got = {"plain": [], "converted": []}
                for _ in range(rounds):
                    for kind in ("plain", "converted"):
                        (small_conv.convert if kind == "converted" else small_conv.restore)(model)
                        got[kind].append(step_rate(model, x, y, precision, 3))
                rates[precision] = {k: statistics.median(v) for k, v in got.items()}
            small_conv.restore(model)
            f, b = rates["fp32"], rates["bf16"]
            print(f"{name:<10}{size:>5}{f['plain']:>12.1f}{f['converted']:>11.1f}{f['converted'] / f['plain']:>6.2f}"
                  f"{b['plain']:>12.1f}{b['converted']:>11.1f}{b['converted'] / b['plain']:>6.2f}"
                  f"{b['converted'] / f['converted']:>11.2f}")
            summary.append(f"{name}@{size} bf16 {b['converted'] / b['plain']:.2f}x")
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
          f"whole step converted vs plain: {', '.join(steps)}")


if __name__ == "__main__":
    main()
