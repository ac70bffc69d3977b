"""Reference fits of single-variable power laws with scipy's curve_fit.

Writes power_law_fixtures.json next to this file. Each case holds the data
(x, loss), the law, the objective and curve_fit's estimates. The objective
is the one matscale minimises for that case:
  - "log":    curve_fit of ln L(x) on ln(loss)   (sum of squared log residuals)
  - "linear": curve_fit of L(x) on loss          (sum of squared residuals)
curve_fit's Levenberg-Marquardt runs with tight tolerances (1e-15) so that
its answer is the minimum to rounding level, not to its default 1.5e-8.

Run: python3 tests/data/scaling/make_fixtures.py
"""
import json
import pathlib

import numpy as np
import scipy
from scipy.optimize import curve_fit

TIGHT = dict(ftol=1e-15, xtol=1e-15, gtol=1e-15, maxfev=100000)


def power(x, a, b):
    return a * x ** (-b)


def power_e(x, a, b, e):
    return e + a * x ** (-b)


def fit(x, y, law, objective, p0):
    f = power if law == "power" else power_e
    if objective == "linear":
        p, _ = curve_fit(f, x, y, p0=p0, **TIGHT)
        sse = float(np.sum((f(x, *p) - y) ** 2))
    else:
        p, _ = curve_fit(lambda x, *q: np.log(f(x, *q)), x, np.log(y), p0=p0, **TIGHT)
        sse = float(np.sum((np.log(f(x, *p)) - np.log(y)) ** 2))
    names = ["a", "b", "E"]
    params = {n: float(v) for n, v in zip(names, p)}
    params.setdefault("E", 0.0)
    return params, sse


def main():
    rng = np.random.default_rng(20261125)
    cases = []

    def add(name, x, y, law, objective, p0, note=""):
        params, sse = fit(x, y, law, objective, p0)
        cases.append(dict(name=name, law=law, objective=objective, p0=list(p0),
                          x=x.tolist(), loss=y.tolist(), params=params, sse=sse, note=note))

    # Data-size scan like the study's (structures), noisy pure power law.
    x = np.array([3e1, 1e2, 3e2, 1e3, 3e3, 1e4, 3e4, 1e5, 3e5, 1e6])
    y = 80.0 * x ** -0.35 * np.exp(0.03 * rng.standard_normal(x.size))
    add("data_power_log", x, y, "power", "log", (80.0, 0.3))
    add("data_power_linear_study_p0", x, y, "power", "linear", (1.0, 1.0),
        "the study's call: curve_fit(a*x**-b) from p0=(1, 1)")

    # Parameter scan with an irreducible loss.
    x = np.geomspace(2e3, 1e7, 14)
    y = (1.2 + 60.0 * x ** -0.3) * np.exp(0.01 * rng.standard_normal(x.size))
    add("params_power_e_log", x, y, "power_e", "log", (50.0, 0.3, 1.0))
    add("params_power_e_linear", x, y, "power_e", "linear", (50.0, 0.3, 1.0))
    add("params_power_log", x, y, "power", "log", (10.0, 0.1))
    add("params_power_linear", x, y, "power", "linear", (10.0, 0.1))

    # Compute scan (FLOPs), repeated x values (several runs per budget).
    x = np.repeat(np.geomspace(1e12, 1e18, 7), 3)
    y = (0.5 + 4e3 * x ** -0.25) * np.exp(0.02 * rng.standard_normal(x.size))
    add("compute_power_e_log", x, y, "power_e", "log", (4e3, 0.25, 0.5))
    add("compute_power_e_linear", x, y, "power_e", "linear", (4e3, 0.25, 0.5))

    out = dict(
        generator="tests/data/scaling/make_fixtures.py",
        versions=dict(numpy=np.__version__, scipy=scipy.__version__),
        cases=cases,
    )
    path = pathlib.Path(__file__).with_name("power_law_fixtures.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    for c in cases:
        print(c["name"], c["params"], c["sse"])


if __name__ == "__main__":
    main()
