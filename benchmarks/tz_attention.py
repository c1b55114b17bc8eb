"""The DynamicCity projection module's costliest attention, alone: the tz plane at the CarlaSC paper size.

    .venv/bin/python benchmarks/tz_attention.py [--threads 2] [--block 512]

The projection module reduces the time branch's (T, X/2, Y/2, Z/2) = (16, 64, 64, 4) volume to the tz plane
before the plane's time downsampling: 16 x 4 = 64 positions, each a sequence of 64 x 64 voxel tokens plus the
query token (4,097), latent width 16 in 2 heads of dimension 8 (the shapes `benchmarks/profile_step.py` shows). Times
forward and backward of PyTorch's scaled_dot_product_attention against an exact blocked softmax in plain
tensor ops (query blocks of `--block` rows), two repetitions each, fp32 on CPU.
"""
import argparse
import time

import torch
import torch.nn.functional as F

SEQUENCES, HEADS, TOKENS, HEAD_DIM = 64, 2, 64 * 64 + 1, 8


def blocked(q, k, v, block: int):
    """Softmax attention one block of query rows at a time (the same values as SDPA)."""
    rows = [torch.softmax(q[:, :, i:i + block] * HEAD_DIM**-0.5 @ k.transpose(-1, -2), -1) @ v
            for i in range(0, q.shape[2], block)]
    return torch.cat(rows, 2)  # (N, H, L, D)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--block", type=int, default=512)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    q, k, v = (torch.randn(SEQUENCES, HEADS, TOKENS, HEAD_DIM, requires_grad=True) for _ in range(3))
    for name, attend in (("sdpa", lambda: F.scaled_dot_product_attention(q, k, v)),
                         ("blocked", lambda: blocked(q, k, v, a.block))):
        for rep in range(2):
            start = time.perf_counter()
            out = attend()
            mid = time.perf_counter()
            out.sum().backward()
            end = time.perf_counter()
            print(f"{name} {rep}: forward {mid - start:.2f} s, backward {end - mid:.2f} s", flush=True)
            q.grad = k.grad = v.grad = None


if __name__ == "__main__":
    main()
