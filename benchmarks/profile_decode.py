"""Cross-check of CUDA-graph decoding, each model alone in a fresh compile: sparse-gpt2 vs dense GPT-2.

    TORCH_LOGS=perf_hints python -m benchmarks.profile_decode     # on a GPU

GPT-2 small shape, random weights, bf16, the sparse model at FFN FLOPs 0.4 served as
``harness.inference_copy`` makes it; batch 32, 16-token prompt, 32 new tokens, greedy,
``cache_implementation="static"`` + ``CompileConfig(mode="reduce-overhead")``. Three untimed
``generate`` calls, one timed, then one under ``torch.profiler``: the GPU kernel time (each kernel
counted once, ``harness.kernel_ms_of_events``) and the top kernels. The sparse model runs first,
so an order effect against ``bench_decode`` (dense first) shows up as a disagreement.
"""

import argparse
import time

import torch
from transformers import CompileConfig

from . import harness as H


def main():
    S = H.common_settings(H.add_common_args(argparse.ArgumentParser(), output=None).parse_args([]), budget_s=540.0)
    H.configure_torch(S)
    models, _ = H.build_models(H.GPT2_SMALL, 0.4, S)
    for name in ("sparse", "dense"):
        m = H.inference_copy(models.pop(name), S)
        ids = torch.randint(1, 50000, (32, 16), device=S["device"])
        kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids),
                  cache_implementation="static", compile_config=CompileConfig(mode="reduce-overhead"))
        H.reset_compiler()
        with torch.no_grad():
            for _ in range(3):
                m.generate(ids, **kw)
            H.sync(S)
            t = time.perf_counter()
            m.generate(ids, **kw)
            H.sync(S)
            print(name, "generate 32 tokens", round((time.perf_counter() - t) * 1e3, 1), "ms", flush=True)
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as prof:
                m.generate(ids, **kw)
                H.sync(S)
        print(name, "GPU kernel ms (each kernel once)", round(H.kernel_ms_of_events(prof.events()), 2))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=90))
        del m


if __name__ == "__main__":
    main()
