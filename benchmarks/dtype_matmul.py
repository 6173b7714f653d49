"""fp32 against bf16 matmul speed on this CPU, as it is and as a CPU without native bf16.

    python benchmarks/dtype_matmul.py
    python benchmarks/dtype_matmul.py --rounds 7 --threads 2

Times a (1024 x 1024) @ (1024 x 4096) product, the size of a mid-size model's MLP projection over
a prompt, in fp32 and in bf16. Each setting runs in its own process (oneDNN reads its
instruction-set cap once, when it starts): "this CPU" as it is, and "without native bf16" under
``ONEDNN_MAX_CPU_ISA=AVX512_CORE ATEN_CPU_CAPABILITY=avx2``. The two settings alternate round by
round so that machine load hits them alike. Prints a Markdown table of median GFLOP/s and what
``--dtype auto`` resolves to on CPU in each setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

M, K, N = 1024, 1024, 4096
SETTINGS = {
    "this CPU": {},
    "without native bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx2"},
}
CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def child(threads: int | None, reps: int) -> None:
    """One process's figures, as JSON on stdout: GFLOP/s per dtype and what auto resolves to."""
    import torch

    from vacap.model import DTYPE_NAMES, resolve_dtype

    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
    operands = {"fp32": (a, b), "bf16": (a.bfloat16(), b.bfloat16())}
    for x, y in operands.values():  # warm-up: oneDNN builds its kernels on first use
        x @ y
    seconds = {name: [] for name in operands}
    for _ in range(reps):  # the dtypes alternate, so load hits them alike
        for name, (x, y) in operands.items():
            start = time.perf_counter()
            x @ y
            seconds[name].append(time.perf_counter() - start)
    result = {name: 2 * M * K * N / statistics.median(times) / 1e9 for name, times in seconds.items()}
    result["auto"] = DTYPE_NAMES[resolve_dtype("auto", torch.device("cpu"))]
    result["aten"] = torch.backends.cpu.get_cpu_capability()
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5, help="products per dtype per round")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.threads, args.reps)
        return
    base = {key: value for key, value in os.environ.items() if key not in CAPS}
    runs = {label: [] for label in SETTINGS}
    for _ in range(args.rounds):
        for label, caps in SETTINGS.items():
            command = [sys.executable, __file__, "--child", "--reps", str(args.reps)]
            command += ["--threads", str(args.threads)] if args.threads else []
            out = subprocess.run(command, env={**base, **caps}, capture_output=True, text=True, check=True)
            runs[label].append(json.loads(out.stdout))
    threads = runs["this CPU"][0]["threads"]
    print(f"\n### fp32 vs bf16 matmul, ({M} x {K}) @ ({K} x {N}), {threads} threads, median of {args.rounds} rounds\n")
    print("| setting | ATen kernels | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 | `--dtype auto` |")
    print("|---|---|---:|---:|---:|---|")
    for label, results in runs.items():
        fp32 = statistics.median(r["fp32"] for r in results)
        bf16 = statistics.median(r["bf16"] for r in results)
        first = results[0]
        print(f"| {label} | {first['aten']} | {fp32:.0f} | {bf16:.0f} | {bf16 / fp32:.2f} | {first['auto']} |")


if __name__ == "__main__":
    main()
