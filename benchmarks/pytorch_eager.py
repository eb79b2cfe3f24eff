#!/usr/bin/env python3
"""Times an eager PyTorch implementation of mHC's pre and post steps against bench_cpu.

The eager code below follows docs/SPEC.md section 2 step by step, the way a model written in PyTorch
would: whole-tensor ops, each one a pass over memory, activations read in fp32 (`.float()`), results
rounded once to the storage type. It runs on the same number of threads as bench_cpu
(torch.set_num_threads), on the same shapes, and the script then runs bench_cpu for the same ops and
prints time_pytorch / time_mhc for each.

Ops compared (names as in bench_cpu):
  pre_fused   RMS norm, projection, gates, Sinkhorn (20 iterations), pre apply: y_in from R
  pre_apply   y_in[c] = sum_m pre_m R[m][c] with the coefficients given
  post        R'[o][c] = post_o y[c] + sum_i comb[i][o] R[i][c]

Debian's python3-torch calls the system BLAS (libblas.so.3); with the reference BLAS alone its matmul
is about 30 times slower than with OpenBLAS, so install libopenblas0-pthread too (the script prints
the fp32 GEMM rate PyTorch reaches, to check).

Usage (Debian: apt-get install python3-torch libopenblas0-pthread; the build from README's quick start):
  python3 benchmarks/pytorch_eager.py --bench build/benchmarks/bench_cpu --threads 2 \
      --tokens 4096 --hidden 4096 --storage fp32,bf16
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

N = 4
SINKHORN_ITERS = 20
EPS_RMS = 1e-6
EPS_PRE = 1e-6
EPS_SINKHORN = 1e-6
POST_MULT = 2.0


def sinkhorn(logits, iters=SINKHORN_ITERS, eps=EPS_SINKHORN):
    """SPEC.md section 3 on [T, n, n] logits in comb orientation."""
    p = torch.softmax(logits, dim=-1) + eps
    p = p / (p.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        p = p / (p.sum(dim=-1, keepdim=True) + eps)
        p = p / (p.sum(dim=-2, keepdim=True) + eps)
    return p


def coefficients(residual, phi, alpha, bias):
    """Steps 1-5: pre [T, n], post [T, n], comb [T, n, n], all fp32."""
    t, n, c = residual.shape
    x = residual.reshape(t, n * c).float()
    rstd = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + EPS_RMS)
    z = (x @ phi.t()) * rstd
    a = z * alpha + bias
    pre = torch.sigmoid(a[:, :n]) + EPS_PRE
    post = POST_MULT * torch.sigmoid(a[:, n:2 * n])
    comb = sinkhorn(a[:, 2 * n:].reshape(t, n, n))
    return pre, post, comb


def pre_apply(residual, pre):
    """Step 6: y_in [T, C] in the storage type."""
    return (pre.unsqueeze(-1) * residual.float()).sum(dim=1).to(residual.dtype)


def pre_fused(residual, phi, alpha, bias):
    pre, post, comb = coefficients(residual, phi, alpha, bias)
    return pre_apply(residual, pre), post, comb


def post_step(residual, y, post, comb):
    """Step 8: R' [T, n, C] in the storage type; comb[i][o] is source i to destination o."""
    mixed = torch.bmm(comb.transpose(1, 2), residual.float())
    return (post.unsqueeze(-1) * y.float().unsqueeze(1) + mixed).to(residual.dtype)


def median_seconds(fn, min_time=1.0, min_reps=5):
    fn()  # warm up: first-touch of outputs, thread pool start
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_pytorch(tokens, hidden, dtype):
    g = torch.Generator().manual_seed(1)
    m3 = N * (N + 2)
    residual = torch.randn(tokens, N, hidden, generator=g).to(dtype)
    y = torch.randn(tokens, hidden, generator=g).to(dtype)
    phi = torch.randn(m3, N * hidden, generator=g) / (N * hidden) ** 0.5
    alpha = torch.cat([torch.full((N,), 0.01), torch.full((N,), 0.01), torch.full((N * N,), 0.01)])
    bias = torch.randn(m3, generator=g) * 0.1
    pre, post, comb = coefficients(residual, phi, alpha, bias)
    with torch.inference_mode():
        return {
            "pre_fused": median_seconds(lambda: pre_fused(residual, phi, alpha, bias)),
            "pre_apply": median_seconds(lambda: pre_apply(residual, pre)),
            "post": median_seconds(lambda: post_step(residual, y, post, comb)),
        }


def time_mhc(bench, threads, tokens, hidden, storages):
    regex = "^(pre_fused|pre_apply|post)/(%s)/T:(%s)/C:(%s)/n:4(/mhc)?/real_time$" % (
        "|".join(storages), "|".join(map(str, tokens)), "|".join(map(str, hidden)))
    cmd = [bench, "--threads=%d" % threads, "--mapping=mhc",
           "--tokens=" + ",".join(map(str, tokens)), "--hidden=" + ",".join(map(str, hidden)),
           "--storage=" + ",".join(storages), "--benchmark_filter=" + regex,
           "--benchmark_format=json", "--benchmark_min_time=0.5"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = {}
    for b in json.loads(out)["benchmarks"]:
        parts = b["name"].split("/")
        key = (parts[0], parts[1], int(parts[2][2:]), int(parts[3][2:]))
        scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b["time_unit"]]
        result[key] = (b["real_time"] * scale, b.get("roofline_fraction"))
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", required=True, help="path to the bench_cpu executable")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", default="4096")
    ap.add_argument("--hidden", default="4096")
    ap.add_argument("--storage", default="fp32,bf16")
    args = ap.parse_args()
    tokens = [int(v) for v in args.tokens.split(",")]
    hidden = [int(v) for v in args.hidden.split(",")]
    storages = args.storage.split(",")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for s in storages:
        if s not in dtypes:
            sys.exit("unknown storage type %r (fp32, bf16)" % s)

    torch.set_num_threads(args.threads)
    print("PyTorch %s on %d threads (cpu capability: %s)" % (
        torch.__version__, torch.get_num_threads(), torch.backends.cpu.get_cpu_capability()
        if hasattr(torch.backends, "cpu") and hasattr(torch.backends.cpu, "get_cpu_capability")
        else "n/a"))
    a = torch.randn(1024, 1024)
    gemm = median_seconds(lambda: a @ a, min_time=0.3)
    print("PyTorch fp32 GEMM (1024^3): %.1f GFLOP/s" % (2 * 1024 ** 3 / gemm * 1e-9))
    mhc = time_mhc(args.bench, args.threads, tokens, hidden, storages)
    print("%-10s %-5s %6s %6s %14s %14s %10s %10s" % (
        "op", "type", "T", "C", "pytorch_ms", "mhc_ms", "speedup", "mhc_roof"))
    for s in storages:
        for t in tokens:
            for c in hidden:
                eager = time_pytorch(t, c, dtypes[s])
                for op in ("pre_fused", "pre_apply", "post"):
                    ours, roof = mhc[(op, s, t, c)]
                    print("%-10s %-5s %6d %6d %14.3f %14.3f %9.1fx %10.2f" % (
                        op, s, t, c, eager[op] * 1e3, ours * 1e3, eager[op] / ours, roof or float("nan")))


if __name__ == "__main__":
    main()
