"""GPU benchmark of the Triton tree-attention kernel (one command: python benchmarks/tree_attention_gpu.py).

Compares, in bf16, the kernel with torch SDPA over a dense boolean mask (and
FlexAttention where the installed torch has it) for P in {512, 2K, 8K, 32K}
× N in {16, 64, 128} × D in {64, 128} × B in {1, 8}: median time, achieved
bandwidth (bytes of K/V read ÷ time) and that bandwidth as a fraction of a
measured device-to-device copy. Then one end-to-end row: a verification
forward of a 1B-class Llama config with random weights, kernel vs reference.
Prints a markdown table; ``--out FILE`` also writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from specdec.tree import TokenTree
from specdec.tree_attention import tree_attention_torch
from specdec.tree_attention.triton_kernel import pack_ancestor_mask, tree_attention_triton


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def copy_bandwidth():
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / t  # bytes read + written


def random_tree(n):
    g = torch.Generator().manual_seed(n)
    parents = [-1] + [int(torch.randint(max(0, i - 4), i, (1,), generator=g)) for i in range(1, n)]
    return TokenTree(torch.zeros(n, dtype=torch.long), torch.tensor(parents)).ancestor_mask.cuda()


FLEX_OFF: list[str] = []  # why FlexAttention is left out of the table, once it has failed


def flex_fn(b, hq, hkv, n, p):
    if FLEX_OFF:
        return None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        FLEX_OFF.append("torch has no FlexAttention")
        return None
    anc = random_tree(n)

    def mask_mod(bi, hi, qi, ki):
        return (ki < p) | anc[qi, (ki - p).clamp(min=0)] & (ki >= p)

    block = create_block_mask(mask_mod, None, None, n, p + n, device="cuda")
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block, enable_gqa=hq != hkv)


def kernel_table(copy_bw, hq=32, hkv=8):
    rows = []
    for d in (64, 128):
        for b in (1, 8):
            for p in (512, 2048, 8192, 32768):
                for n in (16, 64, 128):
                    q = torch.randn(b, hq, n, d, device="cuda", dtype=torch.bfloat16)
                    k = torch.randn(b, hkv, p + n, d, device="cuda", dtype=torch.bfloat16)
                    v = torch.randn_like(k)
                    anc = random_tree(n)
                    bits = pack_ancestor_mask(anc)
                    kv_bytes = 2 * k.numel() * k.element_size()
                    t_kernel = timed(lambda: tree_attention_triton(q, k, v, packed_mask=bits))
                    t_sdpa = timed(lambda: tree_attention_torch(q, k, v, anc))
                    flex = flex_fn(b, hq, hkv, n, p)
                    t_flex = float("nan")
                    if flex is not None:
                        try:
                            t_flex = timed(lambda: flex(q, k, v))
                        except Exception as err:  # an inductor that cannot lower it here: the table goes on without it
                            FLEX_OFF.append(f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
                            print(f"FlexAttention left out: {FLEX_OFF[0]}", flush=True)
                    err = ((tree_attention_triton(q, k, v, packed_mask=bits).float() - tree_attention_torch(q.float(), k.float(), v.float(), anc)).norm()
                           / tree_attention_torch(q.float(), k.float(), v.float(), anc).norm()).item()
                    rows.append(dict(D=d, B=b, P=p, N=n, kernel_ms=t_kernel * 1e3, sdpa_ms=t_sdpa * 1e3, flex_ms=t_flex * 1e3,
                                     kernel_GBps=kv_bytes / t_kernel / 1e9, frac_of_copy=kv_bytes / t_kernel / copy_bw, rel_err=err))
                    print(rows[-1], flush=True)
    return rows


def end_to_end():
    from transformers import LlamaConfig, LlamaForCausalLM

    from specdec.runner import TreeRunner

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=32000, max_position_embeddings=8192)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    prompt = torch.randint(0, 32000, (4096,))
    tree = TokenTree(torch.randint(0, 32000, (64,)), torch.tensor([-1] + [max(0, i - 2) for i in range(1, 64)]))
    out = {}
    for backend in ("torch", "triton"):
        with torch.inference_mode(), TreeRunner(model, attn=backend) as runner:
            runner.prefill(prompt)

            def step():
                runner.forward(tree)
                runner.rollback(prompt.numel())

            out[backend] = timed(step, reps=10)
    return {"config": "Llama 1.2B-class (16 layers, 2048 hidden, GQA 32/8), P=4096, N=64, bf16",
            "reference_ms": out["torch"] * 1e3, "kernel_ms": out["triton"] * 1e3}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth: {bw / 1e9:.0f} GB/s")
    rows = kernel_table(bw)
    e2e = end_to_end()
    print("\n| D | B | P | N | kernel ms | SDPA+mask ms | Flex ms | kernel GB/s | × copy BW | rel err |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['D']} | {r['B']} | {r['P']} | {r['N']} | {r['kernel_ms']:.3f} | {r['sdpa_ms']:.3f} | {r['flex_ms']:.3f} | "
              f"{r['kernel_GBps']:.0f} | {r['frac_of_copy']:.2f} | {r['rel_err']:.1e} |")
    if FLEX_OFF:
        print(f"\nFlex column empty: {FLEX_OFF[0]}")
    print(f"\nend to end: {e2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_GBps": bw / 1e9, "rows": rows, "end_to_end": e2e,
                       "flex_left_out": FLEX_OFF[:1]}, f, indent=2)


if __name__ == "__main__":
    main()
