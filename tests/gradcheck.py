"""Centred-difference gradient checks shared by the kernel and model tests (float64)."""
import numpy as np


def numerical_grad(f, x, h=1e-5):
    """Centred differences of the scalar f() w.r.t. every element of x (modified in place)."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = f()
        x[i] = old - h
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


def rel_error(a, b):
    return np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b)))


def check_model_gradient(model, params, x, y, g, rng, per_tensor, rtol=1e-6):
    """Compare the analytic gradient g of model.loss_and_grad at `params` (the model's bound flat
    vector) with centred differences on `per_tensor` random coordinates of every tensor, to
    relative error `rtol`."""
    for spec in model.layout.specs:
        lo = model.layout.offsets[spec.name]
        for i in lo + rng.choice(spec.size, size=min(spec.size, per_tensor), replace=False):
            old = params[i]
            h = 1e-5 * max(1.0, abs(old))
            params[i] = old + h
            fp = model.loss_and_grad(x, y)[0]
            params[i] = old - h
            fm = model.loss_and_grad(x, y)[0]
            params[i] = old
            num = (fp - fm) / (2 * h)
            err = abs(num - g[i]) / max(1e-8, abs(num) + abs(g[i]))
            assert err < rtol or abs(num - g[i]) < 1e-10, (spec.name, i, num, g[i], err)
