"""How well the polynomial backbone's Chebyshev series reproduces GELU, per degree and domain.

    python -m benchmarks.chebyshev_fit_error --output docs/benchmarks/results/chebyshev_fit_error.json

The conversion fits ``sum_i c_i T_i(clamp(h / s)) + relu(h - s)`` to GPT-2's GELU by least squares
on the layer's pre-activations, with the domain s = the 99th percentile of |h| clamped to [3, 8]
(``conversion.fit_polynomial``). Here the pre-activations are Gaussian samples N(-sigma/2, sigma^2)
(GPT-2's MLP pre-activations are centred slightly below zero) and the same fit runs on them, the
odd terms above T_1 kept at zero as the conversion's sparse terms do; each row is the relative RMS
error ||a - gelu(h)|| / ||gelu(h)|| of the activation. No model is involved: it isolates what the
activation's approximation alone costs, which the healing curve's polynomial-only row and the
narrow GELU MLP with the same neuron selection (docs/benchmarks.md §2.3) differ by.
"""

import argparse
import platform
import time

import torch

from modeling_sparse_gpt2.polynomial import chebyshev_fit, gelu_fit_error, gelu_new

from . import harness as H


def relative_error(degree: int, domain: float, sigma: float, n: int, seed: int) -> float:
    h = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * sigma - sigma / 2
    active = [0, 1] + list(range(2, degree + 1, 2))  # GELU = T_1 + even terms: the odd ones vanish
    c = chebyshev_fit(gelu_new, degree, domain, samples=h, active=active)
    return gelu_fit_error(h, c, torch.ones_like(c), domain, degree)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--degrees", default="8,12,16")
    p.add_argument("--domains", default="3,4,6,8")
    p.add_argument("--sigmas", default="1,2")
    p.add_argument("--samples", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    try:
        degrees = [int(x) for x in args.degrees.split(",")]
        domains, sigmas = [float(x) for x in args.domains.split(",")], [float(x) for x in args.sigmas.split(",")]
    except ValueError as err:
        raise SystemExit(f"--degrees/--domains/--sigmas: comma lists of numbers ({err})") from None
    rows = [{"sigma": s, "domain": dom, "degree": deg, "relative_rms_error": relative_error(deg, dom, s, args.samples, args.seed)}
            for s in sigmas for dom in domains for deg in degrees]
    print(f"{'sigma':>6} {'domain':>7} " + " ".join(f"deg {d:>2}" for d in degrees))
    for s in sigmas:
        for dom in domains:
            errs = [r["relative_rms_error"] for r in rows if r["sigma"] == s and r["domain"] == dom]
            print(f"{s:>6g} {dom:>7g} " + " ".join(f"{e:>6.2%}" for e in errs))
    if args.output:
        result = {"benchmark": "chebyshev_fit_error", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "python": platform.python_version(), "torch": torch.__version__, "settings": vars(args), "rows": rows}
        H.write_json_atomic(args.output, result)
    return rows


if __name__ == "__main__":
    main()
