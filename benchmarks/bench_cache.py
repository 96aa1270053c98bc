"""Benchmark: residual caching vs a bare Hugging Face forward on the embedded model.

Prints tokens/s of (1) a bare HF forward, (2) the cached forward at all layers, (3) the cached
forward with only the first third of the layers requested (early stop), the ratios of their
per-batch time to the bare forward, and peak memory. Targets: <= 1.10x at all layers, <= 0.6x for
the first third. Run: ``.venv/bin/python benchmarks/bench_cache.py [--batches N]``.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from em_interp import ChatExample, cache_residuals, load_model


def make_examples(n: int, seed: int = 0) -> list[ChatExample]:
    """``n`` chat examples of about 64 tokens with varied lengths."""
    rng = torch.Generator().manual_seed(seed)
    words = ("health money travel advice water sleep budget risk doctor savings plan safety friend "
             "learn garden city history science music exercise").split()
    out = []
    for _ in range(n):
        q = " ".join(words[int(i)] for i in torch.randint(len(words), (int(torch.randint(6, 14, (1,), generator=rng)),), generator=rng))
        a = " ".join(words[int(i)] for i in torch.randint(len(words), (int(torch.randint(20, 40, (1,), generator=rng)),), generator=rng))
        out.append(ChatExample(f"Question about {q}?", a.capitalize() + "."))
    return out


def peak_rss_mib() -> float:
    """Peak resident memory of this process, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    """Run the three measurements and print a table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(progress=False)
    examples = make_examples(args.examples)
    # The baseline is a separate, untouched HF model (booting the bridge rewires the wrapped one),
    # fed the same length-sorted batches that cache_residuals builds.
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(model.load_flags["location"], dtype=torch.float32).eval()
    items = sorted((model.tokenize(e) for e in examples), key=lambda i: len(i.input_ids))
    n_tokens = sum(len(i.input_ids) for i in items)
    batches = [model.pad(items[i : i + args.batch_size]) for i in range(0, len(items), args.batch_size)]

    def bare() -> None:
        with torch.inference_mode():
            for b in batches:
                plain(input_ids=b.input_ids, attention_mask=b.attention_mask)

    third = list(range(model.n_layers // 3))
    runs = {
        "bare HF forward": bare,
        "cached, all layers": lambda: cache_residuals(model, examples, batch_size=args.batch_size, progress=False),
        f"cached, first third (layers 0-{third[-1]})": lambda: cache_residuals(
            model, examples, layers=third, batch_size=args.batch_size, progress=False),
    }
    bare()  # warm-up
    times: dict[str, float] = {}
    for _ in range(args.repeats):  # interleave repeats so drift hits all runs alike
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name] = min(times.get(name, float("inf")), time.perf_counter() - start)
    base = times["bare HF forward"]
    print(f"model {model.name}, {len(examples)} examples, {n_tokens} tokens, batch {args.batch_size}, best of {args.repeats}")
    print(f"{'run':40s} {'tokens/s':>10s} {'time ratio':>11s}")
    for name, t in times.items():
        print(f"{name:40s} {n_tokens / t:10.0f} {t / base:10.2f}x")
    print(f"peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
