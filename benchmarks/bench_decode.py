"""Decoding: ``generate`` tokens/s and the time of one decode step, dense, sparse and the ideal.

    python -m benchmarks.bench_decode --output docs/benchmarks/results/decode_h200.json  # GPU: GPT-2 small, bf16
    python -m benchmarks.bench_decode --tiny --device cpu --output /tmp/decode.json      # smoke run, seconds

Models as in ``bench_e2e`` (``harness.build_models``), served as ``harness.inference_copy`` makes
them (bf16 on GPU, eval, the sparse FFNs' fused weights frozen).

* ``generate``: greedy, a ``--prompt-len`` (16) token prompt, ``--new-tokens`` (128) new tokens
  (EOS never stops it early), at each ``--batches`` (1, 32); ``eager`` (dynamic cache) and
  ``cuda_graphs`` (static cache + ``CompileConfig(mode="reduce-overhead")``, GPU only). On GPU each
  model's ``generate`` runs in a fresh process (``--isolation process``): in one process the
  CUDA-graph figures of models measured one after another depended on their order.
* ``step``: one decode forward (one new token per row, static cache holding the prompt):
  ``eager`` times the forward itself; ``cuda_graph`` (GPU only) captures it once in a
  ``torch.cuda.CUDAGraph`` and times replays with CUDA events, so no host loop hides the model's
  GPU time. Each replay rewrites the same cache slot: the cost of one step at position
  ``--prompt-len``.
"""

from __future__ import annotations

import argparse

import torch

from . import harness as H

SECTION = "decode"
STAGES = ("generate", "step")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    H.add_common_args(p, output=f"{H.RESULTS_DIR}/decode.json")
    p.add_argument("--ratios", default=None, help="FFN FLOPs targets of the sparse model (default 0.4)")
    p.add_argument("--stages", default=None, help=f"comma list of {','.join(STAGES)} (default both)")
    p.add_argument("--modes", default=None, help="generate: eager,cuda_graphs; step: eager,cuda_graph (default: all the device runs)")
    p.add_argument("--batches", default=None, help="batch sizes (default 1,32; --tiny 1,2)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 16; --tiny 4)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per generate call (default 128; --tiny 4)")
    H.add_isolation_arg(p, "generate")
    return p.parse_args(argv)


def settings(args) -> dict:
    S = H.common_settings(args, budget_s=540.0)
    stages = H.csv(args.stages) or list(STAGES)
    if set(stages) - set(STAGES):
        raise SystemExit(f"--stages: unknown {sorted(set(stages) - set(STAGES))}; choose from {','.join(STAGES)}")
    modes = H.csv(args.modes) or ["eager", "cuda_graphs", "cuda_graph"]
    if set(modes) - {"eager", "cuda_graphs", "cuda_graph"}:
        raise SystemExit("--modes: choose from eager,cuda_graphs (generate),cuda_graph (step)")
    S.update(model=H.TINY if args.tiny else H.GPT2_SMALL, ratios=H.csv(args.ratios, float) or [0.4],
             stages=stages, modes=modes,
             batches=H.csv(args.batches, int) or ([1, 2] if args.tiny else [1, 32]),
             prompt_len=args.prompt_len or (4 if args.tiny else 16),
             new_tokens=args.new_tokens or (4 if args.tiny else 128),
             isolation=H.isolation(args, S))
    return S


def prompt(model, S, batch):
    g = torch.Generator().manual_seed(batch)
    return torch.randint(1, model.config.vocab_size, (batch, S["prompt_len"]), generator=g).to(S["device"])


def measure_generate(model, S, batch: int, mode: str) -> dict:
    """Greedy ``generate`` tokens/s: eager dynamic cache, or static cache + reduce-overhead compile."""
    from transformers import CompileConfig

    n_new = S["new_tokens"]
    ids = prompt(model, S, batch)
    kwargs = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                  pad_token_id=model.config.eos_token_id, attention_mask=torch.ones_like(ids))
    if mode == "cuda_graphs":
        kwargs.update(cache_implementation="static", compile_config=CompileConfig(mode="reduce-overhead"))
        H.reset_compiler()
        if hasattr(model, "_compiled_call"):  # a fresh compiled call for this batch size
            del model._compiled_call
    else:
        kwargs.update(disable_compile=True)

    @torch.no_grad()
    def gen():
        out = model.generate(ids, **kwargs)
        if out.shape[1] != ids.shape[1] + n_new:
            raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, not {n_new}")
        return out

    out = dict(first_call_s=H.first_call_s(gen, S))
    out.update(H.time_fn(gen, S, reps=min(S["reps"], 5), min_sample_ms=0.0))
    out["tokens_per_s"] = batch * n_new / out["median_ms"] * 1e3
    return out


def decode_step(model, S, batch: int):
    """A no-grad callable running one decode forward of ``batch`` rows on a static cache that holds the prompt."""
    from transformers import StaticCache

    ids = prompt(model, S, batch)
    p = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=p + 1)
    mask = torch.ones(batch, p + 1, dtype=torch.long, device=S["device"])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask[:, :p], past_key_values=cache, use_cache=True,
              cache_position=torch.arange(p, device=S["device"]))
    step_ids = ids[:, -1:].clone()
    position = torch.full((batch, 1), p, device=S["device"])
    cache_position = torch.tensor([p], device=S["device"])

    def rewind():  # back to the prompt's length, so every call writes the same slot p
        for layer in getattr(cache, "layers", ()):
            n = getattr(layer, "cumulative_length", None)
            if isinstance(n, torch.Tensor):
                n.fill_(p)  # a device op: captured in the CUDA graph too
            elif n is not None:
                layer.cumulative_length = p

    @torch.no_grad()
    def step():
        rewind()
        return model(input_ids=step_ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                     position_ids=position, cache_position=cache_position).logits

    return step


def measure_step(model, S, batch: int, mode: str) -> dict:
    """Median ms of one decode step: the eager forward, or replays of its CUDA graph (CUDA events)."""
    step = decode_step(model, S, batch)
    if mode == "cuda_graph":
        if not S["gpu"]:
            raise RuntimeError("cuda_graph needs CUDA")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream before capture, as CUDA graphs ask
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        fn = graph.replay
    else:
        fn = step
    out = H.time_fn(fn, S, min_sample_ms=S["sample_ms"])
    out["gpu_kernel_ms"] = H.gpu_kernel_ms(fn, S)
    out["tokens_per_s"] = batch / out["median_ms"] * 1e3
    return out


def _isolated_worker(S, target, kind, stage, batch, mode):
    model = H.inference_copy(H.model_in_fresh_process(S, target, kind), S)
    return measure_generate(model, S, batch, mode) if stage == "generate" else measure_step(model, S, batch, mode)


def plan(S):
    """(stage, mode) pairs in the order they run; modes the device cannot run are recorded as skipped."""
    pairs = []
    for stage in S["stages"]:
        for mode in (("eager", "cuda_graphs") if stage == "generate" else ("eager", "cuda_graph")):
            if mode in S["modes"]:
                pairs.append((stage, mode))
    return pairs


def bench(S: dict, results: H.Results, section: str = SECTION):
    rows = results.section(section, S)
    for target, kinds, models, info in H.models_per_target(S, results, section):
        infer = {kind: H.inference_copy(m, S) for kind, m in models.items()}
        del models
        for stage, mode in plan(S):
            for batch in S["batches"]:
                for kind in kinds:
                    row = dict(stage=stage, mode=mode, batch=batch, kind=kind, target=None if kind == "dense" else target,
                               prompt_len=S["prompt_len"], new_tokens=S["new_tokens"] if stage == "generate" else 1,
                               ffn_flops_ratio=info[kind]["ffn_flops_ratio"])
                    if mode.startswith("cuda") and not S["gpu"]:
                        H.skip(rows, row, f"{mode} needs CUDA", results)
                        continue
                    if S["isolation"] and stage == "generate":
                        fn = lambda k=kind, b=batch, m=mode: H.in_fresh_process(_isolated_worker, S, target, k, stage, b, m)  # noqa: E731
                    elif stage == "generate":
                        fn = lambda k=kind, b=batch, m=mode: measure_generate(infer[k], S, b, m)  # noqa: E731
                    else:
                        fn = lambda k=kind, b=batch, m=mode: measure_step(infer[k], S, b, m)  # noqa: E731
                    results.measure(rows, row, fn, label=f"{section} {stage} {mode} b={batch} {kind}@{target}")
                    H.free_memory(S)
        del infer
    H.add_stage_ratios(rows)
    results.save()


def main(argv=None):
    return H.run_main(parse_args, settings, bench, argv, benchmark="bench_decode")


if __name__ == "__main__":
    main()
