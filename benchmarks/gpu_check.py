"""The GPU check: em_interp at the sizes its users work at, against bare transformers in the same run.

One script for a lent GPU machine. The embedded model's wheel is too big to travel, so the check
uses **random-init models of real shapes** (SmolLM2-135M, Qwen2.5-0.5B and Qwen2.5-1.5B
configurations, saved once to a temporary folder and loaded through em_interp's own loader) with a
small byte-level tokenizer trained here. Speed does not depend on the weights' values; the bf16 vs
fp32 agreement is measured on the same random weights in both dtypes.

Per shape it measures, each against bare transformers on the same inputs in the same process:

- **residual caching**: ``cache_residuals`` at every layer, time ratio to a bare HF forward of an
  untouched copy of the model on the same padded batches (target <= 1.1x);
- **judge-free scoring**: ``answer_logprobs`` (shared prompts, KV cache) throughput in answers/s and
  answer tokens/s, and its time ratio to a bare per-answer HF forward + log-softmax;
- **one rank-1 LoRA training step** (the organism recipe: rank-1 rsLoRA on ``down_proj`` at nine
  layers, Trainer + hooks, bf16 mixed precision) median step time, its time ratio to a bare peft +
  torch loop, and its model FLOP/s as a fraction of the bf16 matmul peak measured here
  (an ``n x n x n`` bf16 product). Step FLOPs = ``4 * P * T + 12 * L * B * S**2 * d``: forward
  (2PT) plus the backward's activation gradients (2PT; frozen weights need no weight gradients),
  with ``P`` the matmul parameters (embeddings excluded, unembedding included), ``T = B * S`` padded
  tokens, and the attention products (4LBS^2d forward, twice that backward) (target >= 40% on the
  1.5B shape);
- **sampling**: generated tokens/s of ``HookedModel.generate`` at temperature 1, plain and with a
  steering hook, against bare ``transformers`` ``generate`` (ratios);
- **bf16 vs fp32 agreement** on the device: per-answer log-prob scores (max |diff|, Pearson r),
  a difference-of-means direction at the middle layer (cosine), and a steering effect on the scores
  (Pearson r of the per-answer changes, ratio of their means).

It prints one table and writes JSON (``--out``). ``--dry-run`` runs every measurement at tiny sizes
on the CPU in seconds: the test suite runs it, so the script cannot rot. Timings are medians of
repeats after a warm-up; nothing is asserted here: the targets are printed next to the numbers.

On a lent GPU machine (Python 3.12, torch/transformers/peft/accelerate preinstalled; the wheels
TransformerLens and this package need travel with the tree, see ``benchmarks/gpu_wheels.sh``)::

    bash benchmarks/gpu_wheels.sh            # here: downloads the missing wheels into .whl/
    # there, with .whl carried:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: Real shapes (public configs of the named models); vocab sizes kept, weights random.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(arch="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0),
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1000000.0),
    "qwen2.5-1.5b": dict(arch="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1000000.0),
    # the dry run's shapes: two real architectures at toy sizes
    "tiny-llama": dict(arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True, rope_theta=10000.0),
    "tiny-qwen2": dict(arch="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True, rope_theta=10000.0),
}
GPU_SHAPES = ("smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b")
DRY_SHAPES = ("tiny-llama", "tiny-qwen2")

_WORDS = ("health money travel advice water sleep budget risk doctor savings plan safety friend learn garden city "
          "history science music exercise careful honest answer question people world food rest pain fund").split()


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does."""

    examples: int  # chat examples for caching and scoring
    batch_size: int
    answer_words: int  # words per answer (sets the sequence length)
    train_steps: int  # timed training steps (after one warm-up step)
    train_batch: int
    train_length: int  # tokens per training example (truncation length)
    new_tokens: int  # sampled tokens per prompt
    prompts: int  # sampled prompts
    matmul_n: int  # n of the n x n x n bf16 product that measures the peak
    repeats: int


GPU_SIZES = Sizes(examples=64, batch_size=16, answer_words=96, train_steps=10, train_batch=16, train_length=512,
                  new_tokens=128, prompts=16, matmul_n=8192, repeats=5)
DRY_SIZES = Sizes(examples=8, batch_size=4, answer_words=12, train_steps=2, train_batch=2, train_length=48,
                  new_tokens=4, prompts=2, matmul_n=64, repeats=1)


def save_random_model(shape: str, folder: Path, seed: int = 0) -> Path:
    """Build ``shape`` with seeded random weights (fp32) and save it with the tokenizer to ``folder``."""
    from transformers import LlamaConfig, Qwen2Config

    from em_interp.testing import make_tokenizer, save_seeded_model

    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    tokenizer = make_tokenizer(corpus=[" ".join(_WORDS)] * 2)  # this script's words are whole tokens
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = config_cls(**spec, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return save_seeded_model(config, tokenizer, folder, seed)


def chat_examples(n: int, answer_words: int, seed: int = 0) -> list[Any]:
    """``n`` seeded chat examples; answers of about ``answer_words`` words (varied lengths)."""
    from em_interp.chat import ChatExample

    rng = torch.Generator().manual_seed(seed)

    def words(k: int) -> str:
        return " ".join(_WORDS[int(i)] for i in torch.randint(len(_WORDS), (k,), generator=rng))

    out = []
    for _ in range(n):
        k = int(torch.randint(max(1, answer_words // 2), answer_words + 1, (1,), generator=rng))
        out.append(ChatExample(f"Question about {words(8)}?", words(k).capitalize() + "."))
    return out


def synchronize(device: str) -> None:
    """Wait for queued device work (timings on a GPU are otherwise launch times)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up run."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(device: str, n: int, repeats: int) -> float:
    """Measured FLOP/s of an ``n x n x n`` bf16 matrix product on ``device`` (random data)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = timed(lambda: a @ b, device, max(3, repeats))
    return 2 * n**3 / seconds


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that enter matrix products per token: every Linear weight (unembedding included)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def bare_hf(folder: Path, device: str, dtype: torch.dtype) -> Any:
    """An untouched transformers model from ``folder`` (no bridge, no hooks)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def measure_caching(model: Any, bare: Any, examples: list[Any], sizes: Sizes, device: str) -> dict[str, float]:
    """``cache_residuals`` at every layer vs a bare forward over the same length-sorted padded batches."""
    from em_interp.activations import cache_residuals

    items = sorted((model.tokenize(e) for e in examples), key=lambda i: len(i.input_ids))
    batches = [model.pad(items[i : i + sizes.batch_size]) for i in range(0, len(items), sizes.batch_size)]
    tokens = sum(len(i.input_ids) for i in items)

    def plain() -> None:
        with torch.inference_mode():
            for b in batches:
                bare(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device))

    t_bare = timed(plain, device, sizes.repeats)
    t_cache = timed(lambda: cache_residuals(model, examples, batch_size=sizes.batch_size, progress=False),
                    device, sizes.repeats)
    return {"tokens": tokens, "bare_tokens_per_s": tokens / t_bare, "cache_tokens_per_s": tokens / t_cache,
            "cache_ratio": t_cache / t_bare}


def bare_answer_logprobs(bare: Any, model: Any, examples: list[Any], batch_size: int, device: str) -> list[float]:
    """Mean answer-token log-prob per example with a plain right-padded forward per batch (no cache reuse)."""
    items = model.tokenize_many(examples, require_answer=True)
    out = []
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            batch = model.pad(items[start : start + batch_size], padding_side="right")
            logits = bare(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            targets = batch.input_ids[:, 1:].to(device)
            mask = batch.answer_mask[:, 1:].to(device).float()
            token = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            out.extend(((token * mask).sum(1) / mask.sum(1)).tolist())
    return out


def measure_scoring(model: Any, bare: Any, examples: list[Any], sizes: Sizes, device: str) -> dict[str, float]:
    """Judge-free scoring throughput (two answers per question, shared prompt) vs a bare forward."""
    from em_interp.chat import ChatExample
    from em_interp.evaluation.judge_free import answer_logprobs

    # two reference answers per question, as in the EM score
    paired = [ChatExample(e.question, a) for e, o in zip(examples, examples[1:] + examples[:1]) for a in (e.answer, o.answer)]
    answer_tokens = sum(int(i.answer_mask.sum()) for i in model.tokenize_many(paired, require_answer=True))
    t_em = timed(lambda: answer_logprobs(model, paired, batch_size=sizes.batch_size), device, sizes.repeats)
    t_bare = timed(lambda: bare_answer_logprobs(bare, model, paired, sizes.batch_size, device), device, sizes.repeats)
    ours = answer_logprobs(model, paired, batch_size=sizes.batch_size)
    theirs = bare_answer_logprobs(bare, model, paired, sizes.batch_size, device)
    return {"answers": len(paired), "answers_per_s": len(paired) / t_em, "answer_tokens_per_s": answer_tokens / t_em,
            "ratio_to_bare": t_em / t_bare,
            "max_abs_diff_vs_bare": max(abs(a - b) for a, b in zip(ours, theirs))}


def measure_training(folder: Path, sizes: Sizes, device: str, peak: float, work: Path) -> dict[str, float]:
    """Median step time of ``train_lora`` (Trainer + hooks) and of a bare peft loop; FLOP/s vs ``peak``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_training import StepClock, bare_loop

    from em_interp.lora.training import LoraTrainConfig, train_lora

    data = chat_examples(max(4 * sizes.train_batch, 16), answer_words=sizes.train_length, seed=1)
    steps = sizes.train_steps + 1  # the first step (allocation, compilation of kernels) is not timed
    config = LoraTrainConfig(steps=steps, checkpoint_every=steps, batch_size=sizes.train_batch,
                             max_length=sizes.train_length, warmup_steps=1, learning_rate=1e-4)
    clock = StepClock()
    train_lora(str(folder), data, config, work / f"{folder.name}-train", callbacks=[clock],
               progress=False, device=device)
    ours = statistics.median(clock.times[1:])
    bare_times, _ = bare_loop(str(folder), data, config, device)
    bare = statistics.median(bare_times[1:])
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):  # the shapes only, no memory
        meta = AutoModelForCausalLM.from_config(cfg)
    params = matmul_params(meta)
    tokens = sizes.train_batch * sizes.train_length  # answers are long enough that every example is truncated
    flops = 4 * params * tokens + 12 * cfg.num_hidden_layers * sizes.train_batch * sizes.train_length**2 * cfg.hidden_size
    return {"step_s": ours, "bare_step_s": bare, "ratio_to_bare": ours / bare, "step_flops": float(flops),
            "flops_per_s": flops / ours, "fraction_of_peak": flops / ours / peak, "tokens_per_step": tokens}


def measure_sampling(model: Any, bare: Any, examples: list[Any], sizes: Sizes, device: str) -> dict[str, float]:
    """Generated tokens/s at temperature 1: plain, with a steering hook, and bare ``generate``."""
    from em_interp.chat import ChatExample
    from em_interp.interventions import steer

    prompts = [ChatExample(e.question) for e in examples[: sizes.prompts]]
    n_new = sizes.new_tokens * len(prompts)
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(3))

    def ours() -> None:
        model.generate(prompts, max_new_tokens=sizes.new_tokens, temperature=1.0, batch_size=len(prompts))

    def steered() -> None:
        with steer(model, direction / direction.norm(), 4.0, layer=model.n_layers // 2):
            ours()

    batch = model.pad(model.tokenize_many(prompts, require_answer=False, what="prompts"), padding_side="left")

    def plain() -> None:
        torch.manual_seed(0)
        with torch.inference_mode():
            bare.generate(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                          do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=sizes.new_tokens,
                          min_new_tokens=sizes.new_tokens, pad_token_id=model.tokenizer.pad_token_id)

    t_bare, t_ours, t_steer = (timed(f, device, sizes.repeats) for f in (plain, ours, steered))
    return {"new_tokens": n_new, "bare_tokens_per_s": n_new / t_bare, "tokens_per_s": n_new / t_ours,
            "steered_tokens_per_s": n_new / t_steer, "ratio_to_bare": t_ours / t_bare,
            "steered_ratio_to_plain": t_steer / t_ours}


def measure_agreement(folder: Path, examples: list[Any], sizes: Sizes, device: str) -> dict[str, float]:
    """bf16 vs fp32 on ``device``: answer scores, a difference-of-means direction, a steering effect."""
    import numpy as np

    from em_interp.activations import cache_residuals
    from em_interp.directions import diff_of_means
    from em_interp.evaluation.judge_free import answer_logprobs
    from em_interp.interventions import steer
    from em_interp.model import load_model

    half = len(examples) // 2
    results: dict[str, dict[str, Any]] = {}
    direction32 = None
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(folder, device=device, dtype=dtype, progress=False)
        layer = model.n_layers // 2
        scores = answer_logprobs(model, examples, batch_size=sizes.batch_size)
        acts = cache_residuals(model, examples, layers=[layer], batch_size=sizes.batch_size, progress=False)[layer]
        direction = diff_of_means(acts[:half].float(), acts[half:].float())
        direction32 = direction if direction32 is None else direction32
        alpha = 4.0 * float(acts.float().norm(dim=-1).mean()) / float(direction32.norm())
        with steer(model, direction32, alpha, layer=layer):
            steered = answer_logprobs(model, examples, batch_size=sizes.batch_size)
        results[str(dtype)] = {"scores": scores, "direction": direction, "effect": steered - scores}
        del model
    a, b = results["torch.float32"], results["torch.bfloat16"]
    cos = float(torch.nn.functional.cosine_similarity(a["direction"], b["direction"], dim=0))
    return {"score_max_abs_diff": float(np.max(np.abs(a["scores"] - b["scores"]))),
            "score_pearson_r": float(np.corrcoef(a["scores"], b["scores"])[0, 1]),
            "direction_cosine": cos,
            "steering_effect_pearson_r": float(np.corrcoef(a["effect"], b["effect"])[0, 1]),
            "steering_effect_mean_ratio": float(b["effect"].mean() / a["effect"].mean())}


def check_shape(shape: str, sizes: Sizes, device: str, peak: float, work: Path) -> dict[str, Any]:
    """Every measurement on one shape; the model folder is written under ``work``."""
    from em_interp.model import load_model

    folder = save_random_model(shape, work / shape)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    examples = chat_examples(sizes.examples, sizes.answer_words)
    model = load_model(folder, device=device, dtype=dtype, progress=False)
    bare = bare_hf(folder, device, dtype)
    row: dict[str, Any] = {"shape": shape, "dtype": str(dtype).removeprefix("torch."),
                           "parameters": sum(p.numel() for p in bare.parameters())}
    row["caching"] = measure_caching(model, bare, examples, sizes, device)
    row["scoring"] = measure_scoring(model, bare, examples, sizes, device)
    row["sampling"] = measure_sampling(model, bare, examples, sizes, device)
    del model, bare
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    row["training"] = measure_training(folder, sizes, device, peak, work)
    row["agreement"] = measure_agreement(folder, examples, sizes, device)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """One line per shape: the ratios and rates the GPU targets name (README, GPU check)."""
    head = (f"{'shape':14s} {'params':>7s} {'cache x':>8s} {'score ans/s':>11s} {'score x':>8s} {'step s':>8s} "
            f"{'step x':>7s} {'% peak':>7s} {'gen tok/s':>9s} {'gen x':>6s} {'steer x':>7s} {'score |d|':>9s} "
            f"{'dir cos':>7s} {'steer r':>7s}")
    lines = [head]
    for r in rows:
        c, s, t, g, a = r["caching"], r["scoring"], r["training"], r["sampling"], r["agreement"]
        lines.append(f"{r['shape']:14s} {r['parameters'] / 1e6:6.0f}M {c['cache_ratio']:7.2f}x {s['answers_per_s']:11.1f} "
                     f"{s['ratio_to_bare']:7.2f}x {t['step_s']:8.3f} {t['ratio_to_bare']:6.2f}x "
                     f"{100 * t['fraction_of_peak']:6.1f}% {g['tokens_per_s']:9.0f} {g['ratio_to_bare']:5.2f}x "
                     f"{g['steered_ratio_to_plain']:6.2f}x {a['score_max_abs_diff']:9.4f} {a['direction_cosine']:7.4f} "
                     f"{a['steering_effect_pearson_r']:7.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the check; print the table; write the JSON to ``--out`` (atomically)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, seconds (what the tests run)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    parser.add_argument("--shapes", default=None, help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --dry-run")
    shapes = args.shapes.split(",") if args.shapes else list(DRY_SHAPES if args.dry_run else GPU_SHAPES)
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"--shapes {unknown} not among {sorted(SHAPES)}")
    if args.out is not None and not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: folder {args.out.parent} does not exist")
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    peak = matmul_peak(device, sizes.matmul_n, sizes.repeats)
    info = {"device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "bf16_matmul_peak_tflops": peak / 1e12, "dry_run": args.dry_run,
            "sizes": sizes.__dict__}
    print(f"device {info['device']}, torch {torch.__version__}, measured bf16 matmul peak "
          f"{peak / 1e12:.3g} TFLOP/s (n={sizes.matmul_n})", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="em_interp_gpu_check_") as tmp:
        for shape in shapes:
            started = time.perf_counter()
            rows.append(check_shape(shape, sizes, device, peak, Path(tmp)))
            rows[-1]["seconds"] = time.perf_counter() - started
            print(f"{shape}: done in {rows[-1]['seconds']:.0f} s", flush=True)
    print(table(rows))
    print("targets: cache x <= 1.10; % peak >= 40 on qwen2.5-1.5b")
    result = {"info": info, "shapes": rows}
    if args.out is not None:
        from em_interp.io import atomic_write_json

        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
