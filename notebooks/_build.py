"""Builds jopt's notebooks (``notebooks/*.ipynb``) from the cells written below.

The notebooks are generated, stored without outputs, so that a change to a
notebook is a reviewable change to this file. Each notebook starts with the same
two cells: one that installs jopt when it is missing, and a ``parameters`` cell
(papermill-style) whose ``SMALL`` flag - set by ``JOPT_NOTEBOOK_SMALL=1`` - runs
the same code with CI-sized settings.

Usage::

    python notebooks/_build.py           # (re)write every notebook
    python notebooks/_build.py --check   # exit 1 if a stored notebook is stale
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat

__all__ = ["NOTEBOOKS", "build", "main"]

HERE = Path(__file__).resolve().parent

# The repository a notebook clones when it does not run inside a clone (on Colab). Its
# GitHub owner is not fixed yet: OWNER is a placeholder to replace on release.
REPOSITORY = "https://github.com/OWNER/jopt"


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str, *, tags: tuple[str, ...] = ()) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(textwrap.dedent(text).strip())
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def install_cell() -> nbformat.NotebookNode:
    return code(f'''
        # Installs jopt only when it is missing, from a clone of its repository: the clone this
        # notebook sits in, else a fresh clone of JOPT_REPOSITORY (on Colab: set it to jopt's
        # repository - OWNER is a placeholder). REPO is the clone, None if there is none.
        import importlib.util, os, pathlib, subprocess, sys

        JOPT_REPOSITORY = os.environ.get("JOPT_REPOSITORY", "{REPOSITORY}")
        _here = pathlib.Path.cwd()
        REPO = next((p for p in (_here.parent, _here, _here / "jopt-repo")
                     if (p / "pyproject.toml").is_file() and (p / "jopt" / "__init__.py").is_file()),
                    None)
        if importlib.util.find_spec("jopt") is None:
            if REPO is None:
                REPO = _here / "jopt-repo"  # not "jopt": that name would shadow the package
                subprocess.check_call(["git", "clone", "--depth", "1", JOPT_REPOSITORY, str(REPO)])
            subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e", str(REPO)])
            sys.path.insert(0, str(REPO))  # an editable install is seen by new processes only
            importlib.invalidate_caches()
    ''')


def parameters_cell(extra: str = "") -> nbformat.NotebookNode:
    text = '''
        # Parameters (papermill: this cell is tagged "parameters").
        # SMALL runs the same code with tiny sizes; CI sets JOPT_NOTEBOOK_SMALL=1.
        import os

        SMALL = os.environ.get("JOPT_NOTEBOOK_SMALL", "0") not in ("", "0")
        SEED = 0
    '''
    return code(textwrap.dedent(text) + textwrap.dedent(extra), tags=("parameters",))


# --------------------------------------------------------------------------------------
# 01 - optimizers from the ground up
# --------------------------------------------------------------------------------------

def notebook_01() -> list[nbformat.NotebookNode]:
    return [
        md(r'''
            # 01 · Optimizers from the ground up

            Every optimizer in jopt is a pair of pure functions, `init(params) -> state` and
            `update(grads, state, params) -> (updates, state)` (optax's protocol), so a training
            step is always the same three lines:

            ```python
            grads = jax.grad(loss)(params)
            updates, state = tx.update(grads, state, params)
            params = jopt.apply_updates(params, updates)
            ```

            This notebook builds up the classic algorithms on problems small enough to draw:

            1. linear regression fitted by full-batch **gradient descent** and by minibatch **SGD**;
            2. GD, SGD, **momentum** (heavy-ball and EMA forms), **Nesterov**, **AdaGrad**, **RMSprop**
               and **Adam** racing on the Rosenbrock valley and on an ill-conditioned quadratic;
            3. why **learning-rate decay** and **gradient clipping** matter, on cases where they
               change the outcome.

            It runs on a CPU in about a minute; on Colab any runtime works.
        '''),
        install_cell(),
        parameters_cell(),
        code(r'''
            import jax
            import jax.numpy as jnp
            import matplotlib.pyplot as plt
            import numpy as np

            import jopt

            print(f"jax {jax.__version__} on {jax.default_backend()}, jopt {jopt.__version__}")

            NUM_POINTS = 256                      # linear-regression data set
            EPOCHS = 20 if SMALL else 40          # minibatch SGD epochs
            RACE_STEPS = 2000 if SMALL else 3000  # steps on Rosenbrock
            GRID = 120 if SMALL else 400          # contour-plot resolution
        '''),
        md(r'''
            ## 1. Linear regression: gradient descent and SGD

            Data: $y_i = 3x_i + \varepsilon_i$ with $x_i \sim U(-1, 1)$ and Gaussian noise
            $\varepsilon_i$. Model $\hat y = wx + b$, fitted by minimising the mean squared error

            $$J(w, b) = \frac1N \sum_{i=1}^N (w x_i + b - y_i)^2, \qquad
              \frac{\partial J}{\partial w} = \frac2N \sum_i (w x_i + b - y_i)\,x_i, \qquad
              \frac{\partial J}{\partial b} = \frac2N \sum_i (w x_i + b - y_i).$$

            **Gradient descent** (Cauchy, 1847) steps against the gradient with learning rate
            $\alpha$: $\;\theta \leftarrow \theta - \alpha \nabla J(\theta)$. `jax.grad` computes
            $\nabla J$ for us; `jopt.gd(alpha)` is the update rule.
        '''),
        code(r'''
            rng = np.random.default_rng(SEED)
            x = rng.uniform(-1.0, 1.0, NUM_POINTS).astype(np.float32)
            y = (3.0 * x + 0.5 * rng.normal(size=NUM_POINTS)).astype(np.float32)

            # The least-squares solution: the best any optimizer can reach on this sample.
            w_ls, b_ls = np.linalg.lstsq(np.stack([x, np.ones_like(x)], axis=1), y, rcond=None)[0]


            def mse(params, xb, yb):
                return jnp.mean((params["w"] * xb + params["b"] - yb) ** 2)


            tx = jopt.gd(learning_rate=0.5)
            params = {"w": jnp.array(0.0), "b": jnp.array(0.0)}
            state = tx.init(params)


            @jax.jit
            def gd_step(params, state):
                loss, grads = jax.value_and_grad(mse)(params, x, y)
                updates, state = tx.update(grads, state, params)
                return jopt.apply_updates(params, updates), state, loss


            gd_losses = []
            for step in range(50):
                params, state, loss = gd_step(params, state)
                gd_losses.append(float(loss))
            gd_params = params
            print(f"GD:            w = {float(gd_params['w']):.4f}, b = {float(gd_params['b']):.4f}")
            print(f"least squares: w = {w_ls:.4f}, b = {b_ls:.4f}")
        '''),
        md(r'''
            **Stochastic gradient descent** (Robbins & Monro, 1951) replaces the full gradient by
            the gradient on a random minibatch $B$ of the data,
            $\hat g = \nabla \frac1{|B|}\sum_{i \in B}(w x_i + b - y_i)^2$: an unbiased but noisy
            estimate that costs $|B|/N$ of a full gradient. One *epoch* is one pass over the
            shuffled data. The update rule is the same (`jopt.sgd`); only the gradient changes.
        '''),
        code(r'''
            BATCH = 16
            tx = jopt.sgd(learning_rate=0.1)
            params = {"w": jnp.array(0.0), "b": jnp.array(0.0)}
            state = tx.init(params)


            @jax.jit
            def sgd_step(params, state, xb, yb):
                loss, grads = jax.value_and_grad(mse)(params, xb, yb)
                updates, state = tx.update(grads, state, params)
                return jopt.apply_updates(params, updates), state, loss


            sgd_losses = []
            for epoch in range(EPOCHS):
                order = rng.permutation(NUM_POINTS)
                for start in range(0, NUM_POINTS, BATCH):
                    batch = order[start:start + BATCH]
                    params, state, loss = sgd_step(params, state, x[batch], y[batch])
                    sgd_losses.append(float(loss))
            sgd_params = params
            print(f"SGD: w = {float(sgd_params['w']):.4f}, b = {float(sgd_params['b']):.4f} "
                  f"after {len(sgd_losses)} minibatch steps")
        '''),
        code(r'''
            fig, (ax_fit, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
            ax_fit.scatter(x, y, s=8, alpha=0.4, color="gray", label="data")
            grid = np.linspace(-1, 1, 2)
            ax_fit.plot(grid, 3.0 * grid, "k--", label="true line, slope 3")
            for name, p, style in [("GD", gd_params, "C0-"), ("SGD", sgd_params, "C1-")]:
                w, b = float(p["w"]), float(p["b"])
                ax_fit.plot(grid, w * grid + b, style, label=f"{name} fit, slope {w:.3f}")
            ax_fit.set(xlabel="x", ylabel="y", title="Data and fitted lines")
            ax_fit.legend()
            ax_loss.plot(np.arange(1, len(sgd_losses) + 1) / (NUM_POINTS // BATCH), sgd_losses,
                         "C1-", alpha=0.6, label="SGD (minibatch loss)")
            ax_loss.plot(np.arange(1, len(gd_losses) + 1), gd_losses, "C0-", label="GD (full loss)")
            ax_loss.axhline(float(mse({"w": w_ls, "b": b_ls}, x, y)), color="k", ls=":",
                            label="least-squares loss")
            ax_loss.set(xlabel="GD step / SGD epoch", ylabel="MSE", yscale="log", title="Loss")
            ax_loss.legend()
            plt.show()

            # Check: both recover the least-squares slope (itself close to the true 3).
            assert abs(float(gd_params["w"]) - w_ls) < 1e-3
            assert abs(float(sgd_params["w"]) - w_ls) < 0.15
            assert abs(w_ls - 3.0) < 0.2
        '''),
        md(r'''
            ## 2. The classic algorithms

            With gradient $g_t = \nabla J(\theta_t)$ and learning rate $\alpha$ (all states start
            at zero; $\odot$, squares and square roots are elementwise):

            | method | update rule | jopt |
            | --- | --- | --- |
            | GD / SGD | $\theta \leftarrow \theta - \alpha g$ | `jopt.gd(α)`, `jopt.sgd(α)` |
            | heavy-ball momentum (Polyak 1964) | $v \leftarrow \beta v + g,\;\; \theta \leftarrow \theta - \alpha v$ | `jopt.momentum(α, β)` |
            | momentum, EMA form | $v \leftarrow \beta v + (1-\beta) g,\;\; \theta \leftarrow \theta - \alpha v$ | `jopt.momentum(α, β, dampening=β)` |
            | Nesterov (Sutskever et al. 2013) | $v \leftarrow \beta v + g,\;\; \theta \leftarrow \theta - \alpha (g + \beta v)$ | `jopt.nesterov(α, β)` |
            | AdaGrad (Duchi et al. 2011) | $G \leftarrow G + g^2,\;\; \theta \leftarrow \theta - \alpha\, g / \sqrt{G + \epsilon}$ | `jopt.adagrad(α)` |
            | RMSprop (Tieleman & Hinton 2012) | $\nu \leftarrow \rho \nu + (1-\rho) g^2,\;\; \theta \leftarrow \theta - \alpha\, g / \sqrt{\nu + \epsilon}$ | `jopt.rmsprop(α, ρ)` |
            | Adam (Kingma & Ba 2015) | $m \leftarrow \beta_1 m + (1-\beta_1) g,\;\; s \leftarrow \beta_2 s + (1-\beta_2) g^2,$ <br> $\theta \leftarrow \theta - \alpha\, \hat m / (\sqrt{\hat s} + \epsilon),\;\; \hat m = \frac{m}{1-\beta_1^t},\; \hat s = \frac{s}{1-\beta_2^t}$ | `jopt.adam(α, β1, β2)` |

            Heavy-ball momentum is also written $\theta_{t+1} = \theta_t - \alpha g_t + \beta(\theta_t - \theta_{t-1})$.
            The EMA form is the same method with the learning rate scaled by $1-\beta$: the runs
            below check that. AdaGrad, RMSprop and Adam divide each coordinate by a running size of
            its own gradients, so steep and flat directions move at similar speeds.

            The race runs every optimizer for a fixed number of steps inside one `jax.lax.scan`
            (one compiled loop, no Python per step). "SGD" on these deterministic functions is GD
            with Gaussian noise added to each gradient - the perturbation a minibatch estimate
            brings.
        '''),
        code(r'''
            def run(tx, fn, x0, steps, *, noise=0.0, seed=0):
                """Optimises fn from x0 with tx; returns the iterates, x0 first."""
                grad_fn = jax.grad(fn)

                @jax.jit
                def trajectory(x0, key):
                    def step(carry, key):
                        x, state = carry
                        g = grad_fn(x) + noise * jax.random.normal(key, x.shape)
                        updates, state = tx.update(g, state, x)
                        x = jopt.apply_updates(x, updates)
                        return (x, state), x

                    keys = jax.random.split(key, steps)
                    _, xs = jax.lax.scan(step, (x0, tx.init(x0)), keys)
                    return jnp.concatenate([x0[None], xs])

                return np.asarray(trajectory(jnp.asarray(x0, jnp.float32), jax.random.key(seed)))


            def race(optimizers, fn, x0, steps, noisy=None):
                """Runs every optimizer from x0; noisy maps a name to its gradient-noise scale."""
                noisy = noisy or {}
                return {name: run(tx, fn, x0, steps, noise=noisy.get(name, 0.0))
                        for name, tx in optimizers.items()}


            def plot_race(fn, paths, box, title, minimum, levels):
                """Contours with each optimizer's path (a dot every 1/15 of the run), and loss."""
                fig, (ax_c, ax_l) = plt.subplots(1, 2, figsize=(13, 5))
                (x_lo, x_hi), (y_lo, y_hi) = box
                gx, gy = np.meshgrid(np.linspace(x_lo, x_hi, GRID), np.linspace(y_lo, y_hi, GRID))
                gz = np.asarray(jax.vmap(fn)(jnp.stack([gx.ravel(), gy.ravel()], 1))).reshape(gx.shape)
                ax_c.contour(gx, gy, gz, levels=levels, colors="0.75", linewidths=0.6)
                for i, (name, xs) in enumerate(paths.items()):
                    style = "--" if "EMA" in name else "-"
                    ax_c.plot(xs[:, 0], xs[:, 1], style, color=f"C{i}", lw=1.2, label=name)
                    every = max(1, len(xs) // 15)
                    ax_c.plot(xs[::every, 0], xs[::every, 1], ".", color=f"C{i}", ms=6)
                    losses = np.asarray(jax.vmap(fn)(jnp.asarray(xs)))
                    ax_l.plot(losses, style, color=f"C{i}", label=name)
                ax_c.plot(*next(iter(paths.values()))[0], "ko")
                ax_c.plot(*minimum, "r*", ms=14)
                ax_c.set(xlim=(x_lo, x_hi), ylim=(y_lo, y_hi), title=f"{title}: paths")
                # float32 resolves f down to about 1e-14 near a minimum at 0: no point below.
                ax_l.set(xlabel="step", ylabel="f", yscale="log", ylim=(1e-14, None),
                         title=f"{title}: loss")
                ax_l.legend(fontsize=8)
                plt.show()


            def table(fn, paths, target):
                print(f"{'optimizer':24s} {'final f':>10s} {'first step with f < ' + str(target):>24s}")
                for name, xs in paths.items():
                    losses = np.asarray(jax.vmap(fn)(jnp.asarray(xs)))
                    hit = np.flatnonzero(losses < target)
                    print(f"{name:24s} {losses[-1]:10.2e} {hit[0] if hit.size else '-':>24}")
        '''),
        md(r'''
            ### Rosenbrock's banana valley

            $f(x, y) = (1 - x)^2 + 100\,(y - x^2)^2$, minimum $f(1, 1) = 0$ at the end of a long,
            curved, flat-bottomed valley with steep walls: a step size safe for the walls is tiny
            along the valley floor. Learning rates were picked per optimizer as roughly the largest
            that stays stable from the start $(-1.5, 2)$.
        '''),
        code(r'''
            def rosenbrock(p):
                return (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2


            rosenbrock_optimizers = {
                "GD": jopt.gd(1e-3),
                "SGD (noisy gradients)": jopt.sgd(1e-3),
                "momentum (heavy ball)": jopt.momentum(2e-4, 0.9),
                "momentum (EMA)": jopt.momentum(2e-3, 0.9, dampening=0.9),
                "Nesterov": jopt.nesterov(2e-4, 0.9),
                "AdaGrad": jopt.adagrad(0.5),
                "RMSprop": jopt.rmsprop(3e-3),
                "Adam": jopt.adam(5e-2),
            }
            rosenbrock_paths = race(rosenbrock_optimizers, rosenbrock, [-1.5, 2.0], RACE_STEPS,
                                    noisy={"SGD (noisy gradients)": 5.0})
            plot_race(rosenbrock, rosenbrock_paths, ((-2, 2), (-1, 3)), "Rosenbrock", (1, 1),
                      levels=np.logspace(-1, 3.5, 20))
            table(rosenbrock, rosenbrock_paths, 1e-2)
        '''),
        code(r'''
            # Check: the EMA form is heavy-ball momentum with alpha scaled by (1 - beta) ...
            np.testing.assert_allclose(rosenbrock_paths["momentum (EMA)"],
                                       rosenbrock_paths["momentum (heavy ball)"], atol=1e-3)
            # ... and Adam gets to the minimum first.
            final = {name: rosenbrock(xs[-1]) for name, xs in rosenbrock_paths.items()}
            assert final["Adam"] < 1e-3
            assert final["Adam"] == min(final.values())
        '''),
        md(r'''
            ### An ill-conditioned quadratic

            $f(x, y) = \tfrac12 (x^2 + \kappa y^2)$ with condition number $\kappa = 50$. Gradient
            descent must keep $\alpha < 2/L = 2/\kappa$ to stay stable in the steep direction,
            and then crawls in the flat one at rate $1 - \alpha$ per step. Momentum fixes the
            crawl: here it uses Polyak's optimal setting for a quadratic,
            $\alpha = 4/(\sqrt L + \sqrt\mu)^2$, $\beta = \big(\tfrac{\sqrt\kappa - 1}{\sqrt\kappa + 1}\big)^2$,
            and Nesterov its textbook $\alpha = 1/L$, $\beta = \tfrac{\sqrt\kappa - 1}{\sqrt\kappa + 1}$.
            The valley is aligned with the axes, which is the case per-coordinate scaling
            (AdaGrad, RMSprop, Adam) handles best; rotate it and their edge shrinks. Watch
            RMSprop: its steps have size about $\alpha$ whatever the gradient, so with a constant
            rate it ends up hovering around the minimum - a first case for decay (part 3).
        '''),
        code(r'''
            KAPPA = 50.0


            def quadratic(p):
                return 0.5 * (p[0] ** 2 + KAPPA * p[1] ** 2)


            sqrt_kappa = np.sqrt(KAPPA)
            polyak_lr = 4.0 / (sqrt_kappa + 1.0) ** 2
            polyak_beta = ((sqrt_kappa - 1.0) / (sqrt_kappa + 1.0)) ** 2
            quadratic_optimizers = {
                "GD": jopt.gd(1.9 / KAPPA),
                "SGD (noisy gradients)": jopt.sgd(1.9 / KAPPA),
                "momentum (heavy ball)": jopt.momentum(polyak_lr, polyak_beta),
                "momentum (EMA)": jopt.momentum(polyak_lr / (1 - polyak_beta), polyak_beta,
                                                dampening=polyak_beta),
                "Nesterov": jopt.nesterov(1.0 / KAPPA, (sqrt_kappa - 1) / (sqrt_kappa + 1)),
                "AdaGrad": jopt.adagrad(1.0),
                "RMSprop": jopt.rmsprop(0.05),
                "Adam": jopt.adam(0.1),
            }
            quadratic_paths = race(quadratic_optimizers, quadratic, [-4.0, 1.0], 300,
                                   noisy={"SGD (noisy gradients)": 0.5})
            plot_race(quadratic, quadratic_paths, ((-4.5, 1.5), (-1.5, 1.5)), "Quadratic, κ = 50", (0, 0),
                      levels=np.logspace(-2, 1.7, 15))
            table(quadratic, quadratic_paths, 1e-6)
        '''),
        code(r'''
            def steps_to(fn, xs, target):
                losses = np.asarray(jax.vmap(fn)(jnp.asarray(xs)))
                hit = np.flatnonzero(losses < target)
                return hit[0] if hit.size else np.inf


            # Check: momentum (both forms) and Nesterov need far fewer steps than GD here.
            gd_steps = steps_to(quadratic, quadratic_paths["GD"], 1e-6)
            for name in ("momentum (heavy ball)", "momentum (EMA)", "Nesterov"):
                assert 2 * steps_to(quadratic, quadratic_paths[name], 1e-6) < gd_steps, name
        '''),
        md(r'''
            ## 3. Learning-rate decay matters

            With a constant learning rate, SGD does not converge: near the minimum the gradient
            noise keeps kicking the iterate around a ball whose size grows with $\alpha$. Robbins
            and Monro's conditions, $\sum_t \alpha_t = \infty$ and $\sum_t \alpha_t^2 < \infty$,
            are met by decaying rates such as $\alpha_t = \alpha_0 / (1 + kt)$
            (`jopt.schedules.inverse_time_decay`); an exponential decay over the run
            (`jopt.schedules.exponential_decay`) is the common practical choice. A schedule is a
            function `step -> α`, accepted wherever a learning rate is.

            Below: minibatch SGD on the linear regression of part 1 with a large rate and batches of 8.
        '''),
        code(r'''
            def sgd_path(learning_rate, epochs, batch=8, seed=SEED):
                """Parameter (w, b) after every minibatch step of SGD on the regression data."""
                tx = jopt.sgd(learning_rate)
                order = np.concatenate([np.random.default_rng(seed + e).permutation(NUM_POINTS)
                                        for e in range(epochs)]).reshape(-1, batch)
                xj, yj = jnp.asarray(x), jnp.asarray(y)

                @jax.jit
                def path(theta, order):
                    def step(carry, idx):
                        theta, state = carry
                        grads = jax.grad(lambda t: jnp.mean((t[0] * xj[idx] + t[1] - yj[idx]) ** 2))(theta)
                        updates, state = tx.update(grads, state, theta)
                        theta = jopt.apply_updates(theta, updates)
                        return (theta, state), theta

                    return jax.lax.scan(step, (theta, tx.init(theta)), order)[1]

                return np.asarray(path(jnp.zeros(2), jnp.asarray(order)))


            steps = EPOCHS * NUM_POINTS // 8
            schedules = {
                "constant α = 0.3": 0.3,
                "exponential decay 0.3 → 0.003": jopt.schedules.exponential_decay(0.3, steps, 0.01),
                "inverse time 0.3 / (1 + 0.05 t)": jopt.schedules.inverse_time_decay(0.3, 0.05),
            }
            decay_paths = {name: sgd_path(lr, EPOCHS) for name, lr in schedules.items()}

            fig, ax = plt.subplots(figsize=(9, 4))
            for name, thetas in decay_paths.items():
                ax.plot(thetas[:, 0], lw=0.8, label=name)
            ax.axhline(w_ls, color="k", ls=":", label="least-squares slope")
            ax.set(xlabel="minibatch step", ylabel="slope w", ylim=(w_ls - 0.5, w_ls + 0.5),
                   title="SGD with a constant rate keeps oscillating; a decayed rate settles")
            ax.legend()
            plt.show()

            tail = slice(-steps // 5, None)
            spread = {name: np.abs(t[tail, 0] - w_ls).mean() for name, t in decay_paths.items()}
            for name, s in spread.items():
                print(f"{name:34s} mean |w - w_ls| over the last 20% of steps: {s:.4f}")
            # Check: decay brings SGD at least 5x closer to the least-squares solution.
            assert spread["exponential decay 0.3 → 0.003"] * 5 < spread["constant α = 0.3"]
            assert spread["inverse time 0.3 / (1 + 0.05 t)"] * 5 < spread["constant α = 0.3"]
        '''),
        md(r'''
            ## 4. Gradient clipping matters

            Far from the minimum Rosenbrock's gradient is huge (about 4000 at $(-2, -1)$): one
            step of SGD with momentum at $\alpha = 10^{-3}$ jumps to the other wall, the next
            gradient is larger still, and the iterates blow up to `nan`. Clipping by global norm,

            $$g \leftarrow g \cdot \min\!\Big(1, \frac{c}{\lVert g \rVert_2}\Big),$$

            bounds every step by $\alpha c$ while keeping its direction; it is a transformation of
            its own, chained in front of the optimizer:
            `jopt.chain(jopt.clip_by_global_norm(c), jopt.sgd(...))`. The same protects neural
            networks from the occasional exploding gradient.
        '''),
        code(r'''
            start = [-2.0, -1.0]
            clip_paths = {
                "SGD + momentum": run(jopt.sgd(1e-3, momentum=0.9), rosenbrock, start, 2000),
                "clip_by_global_norm(10) → SGD + momentum": run(
                    jopt.chain(jopt.clip_by_global_norm(10.0), jopt.sgd(1e-3, momentum=0.9)),
                    rosenbrock, start, 2000),
            }
            for name, xs in clip_paths.items():
                finite = np.isfinite(xs).all(axis=1)
                last = xs[finite][-1]
                print(f"{name:42s} finite for {finite.sum():5d} of {len(xs)} iterates; "
                      f"last finite point ({last[0]:.3g}, {last[1]:.3g})")

            fig, ax = plt.subplots(figsize=(7, 5))
            gx, gy = np.meshgrid(np.linspace(-2.5, 2.5, GRID), np.linspace(-1.5, 4.5, GRID))
            gz = (1 - gx) ** 2 + 100 * (gy - gx ** 2) ** 2
            ax.contour(gx, gy, gz, levels=np.logspace(-1, 3.5, 20), colors="0.75", linewidths=0.6)
            for i, (name, xs) in enumerate(clip_paths.items()):
                xs = xs[np.isfinite(xs).all(axis=1)][:50 if i == 0 else None]
                ax.plot(xs[:, 0], xs[:, 1], ".-" if i == 0 else "-", color=f"C{3 - 2 * i}", lw=1, label=name)
            ax.plot(*start, "ko"); ax.plot(1, 1, "r*", ms=14)
            ax.set(xlim=(-2.5, 2.5), ylim=(-1.5, 4.5), title="Without clipping the first steps explode")
            ax.legend(loc="upper center")
            plt.show()

            # Check: unclipped SGD diverges, clipped SGD reaches the minimum.
            assert not np.isfinite(clip_paths["SGD + momentum"][-1]).all()
            np.testing.assert_allclose(clip_paths["clip_by_global_norm(10) → SGD + momentum"][-1],
                                       [1.0, 1.0], atol=1e-2)
        '''),
        md(r'''
            ## Takeaways

            * GD and SGD use the same update; SGD trades an exact gradient for a cheap, noisy one
              and needs a **decaying learning rate** to settle.
            * **Momentum** (either form - they differ only by a rescaled $\alpha$) and **Nesterov**
              turn GD's crawl along flat directions into fast progress on ill-conditioned problems.
            * **AdaGrad, RMSprop and Adam** rescale each coordinate by its gradient history; Adam
              adds momentum and bias correction and is the robust default.
            * **Clipping** is a separate transformation chained in front of any optimizer.

            Next: [02_mnist_mlp.ipynb](02_mnist_mlp.ipynb) trains a real network with the same
            optimizers.
        '''),
    ]


# --------------------------------------------------------------------------------------
# 02 - the MNIST MLP with jopt.train
# --------------------------------------------------------------------------------------

def notebook_02() -> list[nbformat.NotebookNode]:
    return [
        md(r'''
            # 02 · Training the MNIST MLP with `jopt.train`

            The reference model is a multilayer perceptron 784-64-64-10 (ReLU) trained with Adam
            ($\alpha = 10^{-3}$), batches of 128, for 5 epochs: the recipe of
            `configs/default.py`. `jopt.train.train_and_evaluate(config, workdir)` is the whole
            job - the same function the command line runs
            (`jopt train --config configs/default.py --workdir runs/mnist`). Each epoch is one
            jitted `lax.scan` over the batches, with the images kept on the device as `uint8`
            and the parameters packed into one flat buffer, so the optimizer update is a single
            fused kernel.

            After training: the learning curves, the confusion matrix on the test set, and some
            of the digits the network gets wrong.
        '''),
        install_cell(),
        parameters_cell('''
            # "mnist" (downloaded on first use) or "fashion_mnist"; CI uses the latter.
            DATASET = os.environ.get("JOPT_NOTEBOOK_DATASET", "mnist")
        '''),
        code(r'''
            import tempfile

            import jax
            import matplotlib.pyplot as plt
            import numpy as np

            import jopt
            from jopt.cli import load_config
            from jopt.train import create_model, make_apply_fn, train_and_evaluate

            print(f"jax {jax.__version__} on {jax.default_backend()}, {jax.device_count()} device(s)")
            if REPO is None:
                raise FileNotFoundError(
                    "configs/default.py ships with jopt's repository: run this notebook from a "
                    "clone, or uninstall jopt and re-run the first cell to clone JOPT_REPOSITORY.")

            # Same as: jopt train --config configs/default.py --config.dataset=...
            config = load_config(REPO / "configs" / "default.py", [f"--config.dataset={DATASET}"])
            config.seed = SEED
            if SMALL:  # a quick run on a subset: same code path
                config.num_epochs = 2
                config.train_subset = 4096
                config.test_subset = 1000
            print(config)
        '''),
        md(r'''
            ## Train

            The data set is loaded once here (so its test images can be looked at afterwards)
            and handed to `train_and_evaluate`, which keeps the `train_subset`/`test_subset` of
            the config. The work directory receives `metrics.jsonl` (one record per epoch),
            `curves.png`, the config and orbax checkpoints; a fresh temporary directory is used
            because training in a directory that already holds a checkpoint *resumes* it.
        '''),
        code(r'''
            dataset = jopt.data.subset(jopt.data.load(config.dataset),
                                       train=config.train_subset, test=config.test_subset)
            print(dataset)
            workdir = tempfile.mkdtemp(prefix="jopt_02_")
            result = train_and_evaluate(config, workdir, dataset=dataset)
            print(f"\nfinal test accuracy {100 * result.metrics['test_accuracy']:.2f}% "
                  f"(work directory {workdir})")
        '''),
        code(r'''
            from IPython.display import Image, display

            # The curves train_and_evaluate drew into its work directory.
            history = result.history
            display(Image(filename=os.path.join(workdir, "curves.png")))
            print("seconds per epoch (the first includes compilation):",
                  ", ".join(f"{r['epoch_time_s']:.2f}" for r in history))
        '''),
        md(r'''
            ## Where the network goes wrong

            `result.params` is the trained parameter tree; `make_apply_fn(model)` is the function
            the training loop evaluates with (raw `uint8` images in, logits out). The **confusion
            matrix** counts, for each true class (row), the predicted classes (columns): the
            diagonal holds the correct answers.
        '''),
        code(r'''
            CLASS_NAMES = {
                "mnist": [str(d) for d in range(10)],
                "fashion_mnist": ["T-shirt", "trouser", "pullover", "dress", "coat",
                                  "sandal", "shirt", "sneaker", "bag", "boot"],
            }[config.dataset]

            model = create_model(config, dataset.num_classes)
            predict = jax.jit(make_apply_fn(model))
            logits = np.asarray(predict(result.params, dataset.test_images))
            probabilities = np.asarray(jax.nn.softmax(logits))
            predictions = logits.argmax(axis=1)
            labels = dataset.test_labels
            accuracy = float((predictions == labels).mean())
            print(f"test accuracy recomputed from the returned parameters: {100 * accuracy:.2f}%")

            confusion = np.zeros((dataset.num_classes, dataset.num_classes), dtype=int)
            np.add.at(confusion, (labels, predictions), 1)

            fig, ax = plt.subplots(figsize=(7, 6))
            image = ax.imshow(confusion, cmap="Blues")
            for (i, j), count in np.ndenumerate(confusion):
                if count:
                    ax.text(j, i, count, ha="center", va="center", fontsize=8,
                            color="white" if count > confusion.max() / 2 else "black")
            ticks = range(dataset.num_classes)
            ax.set_xticks(ticks, CLASS_NAMES, rotation=45)
            ax.set_yticks(ticks, CLASS_NAMES)
            ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (test set)")
            fig.colorbar(image)
            plt.show()

            off_diagonal = confusion * (1 - np.eye(dataset.num_classes, dtype=int))
            worst = np.dstack(np.unravel_index(np.argsort(-off_diagonal, axis=None)[:3],
                                               off_diagonal.shape))[0]
            print("most frequent confusions:",
                  "; ".join(f"{CLASS_NAMES[t]} taken for {CLASS_NAMES[p]} {off_diagonal[t, p]}x"
                            for t, p in worst))
        '''),
        code(r'''
            wrong = np.flatnonzero(predictions != labels)
            # The most confident mistakes first: often ambiguous or mislabelled images.
            wrong = wrong[np.argsort(-probabilities[wrong, predictions[wrong]])][:16]
            fig, axes = plt.subplots(2, 8, figsize=(13, 4))
            for ax, i in zip(axes.flat, wrong):
                ax.imshow(dataset.test_images[i], cmap="gray_r")
                ax.set_title(f"{CLASS_NAMES[labels[i]]} → {CLASS_NAMES[predictions[i]]}\n"
                             f"p = {probabilities[i, predictions[i]]:.2f}", fontsize=9)
            for ax in axes.flat:
                ax.axis("off")
            fig.suptitle("Misclassified test images: true → predicted (confidence)")
            plt.show()
        '''),
        code(r'''
            # Check: the returned parameters reproduce the reported accuracy, and the model learned.
            assert abs(accuracy - result.metrics["test_accuracy"]) < 1e-6
            assert confusion.sum() == len(labels) and np.trace(confusion) == (predictions == labels).sum()
            if SMALL:
                assert accuracy > 0.6
            else:  # the reference figures of the README (5 epochs, full data)
                assert accuracy >= {"mnist": 0.97, "fashion_mnist": 0.86}[config.dataset]
        '''),
        md(r'''
            ## Next

            * Change the recipe from the command line: `--config.optimizer.name=adamw`,
              `--config.optimizer.schedule.name=warmup_cosine`,
              `--config.optimizer.state_storage=int8`, `--config.compute_dtype=bfloat16`.
            * [03_data_parallel.ipynb](03_data_parallel.ipynb) runs the same step on every device;
              [04_compression.ipynb](04_compression.ipynb) prunes and quantizes this MLP;
              [05_computation_graph.ipynb](05_computation_graph.ipynb) shows what XLA compiles.
        '''),
    ]


# --------------------------------------------------------------------------------------
# 03 - data parallelism
# --------------------------------------------------------------------------------------

def notebook_03() -> list[nbformat.NotebookNode]:
    return [
        md(r'''
            # 03 · Data parallelism: one training step on every device

            Data parallelism splits each global batch of $B$ examples over $N$ devices. Every
            device holds the parameters, computes the gradient $g_i$ of the mean loss over its
            $B/N$ examples, and the devices average them,

            $$g = \frac1N \sum_{i=1}^N g_i,$$

            which is exactly the gradient of the mean loss over the global batch: every device
            then applies the same update and the parameters stay identical everywhere. The
            averaging is one collective operation, an **all-reduce** (`lax.pmean`).

            This notebook writes that step by hand with `jax.pmap` and with `jax.shard_map`,
            then trains the MLP with `jopt.parallel.DataParallel` - replicated, and with the
            optimizer state sharded over the devices (ZeRO-1) - and checks that every variant
            computes the same thing as a single device.

            **Devices.** On a machine without an accelerator the cell below asks XLA for 8 CPU
            devices (`--xla_force_host_platform_device_count`, set before jax is imported), so
            the collectives really run. On Colab pick a TPU runtime: JAX finds the TPU by
            itself, with no setup call (`jax.tools.colab_tpu` no longer exists); a v5e-1 has one
            device, a v2-8 or v5e-8 eight. Everything below works for any device count that
            divides the batch size.
        '''),
        install_cell(),
        parameters_cell('''
            # "mnist" (downloaded on first use) or "fashion_mnist"; CI uses the latter.
            DATASET = os.environ.get("JOPT_NOTEBOOK_DATASET", "mnist")
            SIMULATED_DEVICES = 8  # CPU devices to simulate when there is no accelerator
        '''),
        code(r'''
            # Must run before jax is imported: the device count is fixed when jax starts.
            import glob, shutil


            def accelerator_present():
                """Whether a GPU or TPU is attached, checked without importing jax."""
                return bool(shutil.which("nvidia-smi") or glob.glob("/dev/nvidia[0-9]*")
                            or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
                            or os.environ.get("TPU_ACCELERATOR_TYPE") or os.environ.get("COLAB_TPU_ADDR"))


            xla_flags = os.environ.get("XLA_FLAGS", "")
            if "jax" in sys.modules:
                print("jax is already imported: restart the kernel to change the number of devices.")
            elif not accelerator_present() and "xla_force_host_platform_device_count" not in xla_flags:
                # Only the CPU backend reads this flag: harmless even if the check above missed
                # an accelerator.
                os.environ["XLA_FLAGS"] = (
                    f"{xla_flags} --xla_force_host_platform_device_count={SIMULATED_DEVICES}").strip()
        '''),
        code(r'''
            import time

            import jax
            import jax.numpy as jnp
            import matplotlib.pyplot as plt
            import numpy as np
            import optax
            from jax.sharding import NamedSharding
            from jax.sharding import PartitionSpec as P

            import jopt
            from jopt.models import MLP
            from jopt.parallel import DataParallel, communication_bytes

            # TPUs (and GPUs, with TF32) multiply float32 matrices in reduced precision by
            # default; the checks below compare variants to float32 rounding, so ask for full
            # precision (over two epochs bf16 passes drift the parameters by ~0.3).
            jax.config.update("jax_default_matmul_precision", "highest")
            N = jax.device_count()
            print(f"jax {jax.__version__}: {N} {jax.devices()[0].platform} device(s): {jax.devices()}")
            BATCH = 128  # the global batch; each device gets BATCH // N examples
            jopt.parallel.check_batch_size(BATCH, N)

            dataset = jopt.data.load(DATASET)
            if SMALL:
                dataset = jopt.data.subset(dataset, train=2048, test=1000)
            steps = len(dataset.train_images) // BATCH
            rng = np.random.default_rng(SEED)


            def epoch_batches():
                """One epoch of shuffled global batches, [steps, BATCH, ...]."""
                order = rng.permutation(len(dataset.train_images))[: steps * BATCH].reshape(steps, BATCH)
                return {"images": dataset.train_images[order], "labels": dataset.train_labels[order]}


            epochs = [epoch_batches(), epoch_batches()]
            batches = epochs[0]
            print(dataset, f"- one epoch = {steps} steps of {BATCH} = {N} x {BATCH // N} examples")

            model = MLP()
            params = model.init(jax.random.key(SEED), jnp.zeros((1, 28, 28)))


            def loss_fn(params, images, labels):
                logits = model.apply(params, images.astype(jnp.float32) / 255.0)
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        '''),
        md(r'''
            ## 1. The step by hand

            The reference: one jitted step on one device, over one global batch.
        '''),
        code(r'''
            tx = jopt.adam(1e-3)
            opt_state = tx.init(params)
            images, labels = batches["images"][0], batches["labels"][0]


            @jax.jit
            def single_device_step(params, opt_state, images, labels):
                loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
                updates, opt_state = tx.update(grads, opt_state, params)
                return jopt.apply_updates(params, updates), opt_state, loss


            reference = single_device_step(params, opt_state, images, labels)


            def max_difference(a, b):
                """Largest elementwise difference of two trees (on the host: they may live on
                different devices)."""
                return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        '''),
        md(r'''
            **`pmap`** runs the function once per device on the leading axis of its mapped
            arguments (`in_axes=0`: the batch reshaped to `[N, B/N, ...]`); `lax.pmean` over the
            named axis averages the gradients. Parameters and optimizer state go in *unmapped*
            (`in_axes=None`) and, being equal on every device after the `pmean`, come back
            unmapped too (`out_axes=None`): no stacking of N copies, no `unreplicate`.
        '''),
        code(r'''
            def device_step(params, opt_state, images, labels):
                loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
                loss, grads = jax.lax.pmean((loss, grads), axis_name="batch")  # the all-reduce
                updates, opt_state = tx.update(grads, opt_state, params)
                return jopt.apply_updates(params, updates), opt_state, loss


            pmap_step = jax.pmap(device_step, axis_name="batch",
                                 in_axes=(None, None, 0, 0), out_axes=(None, None, None))
            per_device = lambda x: x.reshape(N, -1, *x.shape[1:])
            pmapped = pmap_step(params, opt_state, per_device(images), per_device(labels))
            print(f"pmap: loss {float(pmapped[2]):.6f} (one device: {float(reference[2]):.6f}), "
                  f"largest parameter difference {max_difference(pmapped[0], reference[0]):.1e}")
        '''),
        md(r'''
            **`shard_map`** is the API JAX recommends now that `pmap` is in maintenance mode:
            the function sees one device's block of each argument, as laid out over a
            `Mesh` by the `PartitionSpec`s: `P("batch")` splits the leading axis over the mesh
            axis, `P()` replicates. One subtlety: `shard_map` tracks which values vary across
            devices. The parameters come in replicated, so their gradient should be replicated
            too, and JAX makes it so by **summing** the per-device gradients itself. Followed by
            our `pmean`, that would give a step $N$ times too large. `lax.pcast(params, "batch",
            to="varying")` declares a per-device copy first, so each device differentiates its
            own loss and the `pmean` averages, as in `pmap`.
        '''),
        code(r'''
            mesh = jax.make_mesh((N,), ("batch",))
            split = NamedSharding(mesh, P("batch"))
            sharded_images, sharded_labels = jax.device_put(images, split), jax.device_put(labels, split)


            def shard_map_device_step(params, opt_state, images, labels):
                local_params = jax.lax.pcast(params, "batch", to="varying")
                loss, grads = jax.value_and_grad(loss_fn)(local_params, images, labels)
                loss, grads = jax.lax.pmean((loss, grads), axis_name="batch")
                updates, opt_state = tx.update(grads, opt_state, params)
                return jopt.apply_updates(params, updates), opt_state, loss


            def sharded(device_fn):
                return jax.jit(jax.shard_map(device_fn, mesh=mesh,
                                             in_specs=(P(), P(), P("batch"), P("batch")),
                                             out_specs=(P(), P(), P())))


            shard_mapped = sharded(shard_map_device_step)(params, opt_state, sharded_images, sharded_labels)
            naive = sharded(device_step)(params, opt_state, sharded_images, sharded_labels)
            print(f"shard_map: largest parameter difference {max_difference(shard_mapped[0], reference[0]):.1e}")
            print(f"without pcast: {max_difference(naive[0], reference[0]):.1e} "
                  f"(every gradient summed over the {N} devices first)")

            # Check: both parallel steps compute the single-device step.
            assert max_difference(pmapped[0], reference[0]) < 1e-5
            assert max_difference(shard_mapped[0], reference[0]) < 1e-5
        '''),
        md(r'''
            ## 2. `jopt.parallel.DataParallel`

            `DataParallel(loss_fn, optimizer, strategy=...)` builds these steps and runs a
            whole epoch as one compiled `lax.scan` on every device. Strategies:

            * `"none"` - one device, the reference;
            * `"pmap"` and `"shard_map"` - the two steps above (replicated parameters and state);
            * `"zero1"` - ZeRO stage 1 (Rajbhandari et al. 2020): the parameters are packed into
              flat buffers and each device keeps the optimizer state of its $1/N$ slice only.
              Gradients are **reduce-scattered** (device $i$ receives the average of slice $i$),
              each device updates its slice, and the slices are **all-gathered**. A ring
              all-reduce is a reduce-scatter followed by an all-gather, so this sends no more
              bytes, and the state takes $1/N$ of the memory;
            * `compression="int8"` replaces the float32 gradient exchange by block-wise int8
              codes with error feedback (what quantization drops is added to the next step's
              gradient), about a quarter of the bytes.

            Each variant trains two epochs from the same initial parameters on the same batches
            and reports its fastest epoch (a first call includes compilation).
        '''),
        code(r'''
            def batch_loss(params, batch):  # DataParallel's loss: (mean loss, auxiliary outputs)
                return loss_fn(params, batch["images"], batch["labels"]), {}


            def state_bytes_per_device(opt_state):
                """Bytes of optimizer state held by the first device."""
                return sum(shard.data.nbytes for leaf in jax.tree.leaves(opt_state)
                           for shard in leaf.addressable_shards if shard.device == jax.devices()[0])


            variants = {
                "one device": dict(strategy="none"),
                "pmap": dict(strategy="pmap"),
                "shard_map": dict(strategy="shard_map"),
                "shard_map + int8": dict(strategy="shard_map", compression="int8"),
                "ZeRO-1": dict(strategy="zero1"),
            }
            if N == 1:  # nothing to exchange with a single device
                variants.pop("shard_map + int8")
            runs = {}
            for name, options in variants.items():
                trainer = DataParallel(batch_loss, jopt.adam(1e-3), **options)
                state = trainer.init(params)
                sent = communication_bytes(trainer.epoch_hlo(state, trainer.shard_batches(batches)),
                                           trainer.num_devices)
                state_bytes = state_bytes_per_device(state.opt_state)
                losses, seconds = [], []
                for epoch in epochs:
                    device_batches = trainer.shard_batches(epoch)
                    start = time.perf_counter()
                    state, metrics = trainer.train_epoch(state, device_batches)
                    losses.append(np.asarray(metrics.loss))  # waits for the epoch to finish
                    seconds.append(time.perf_counter() - start)
                losses, seconds = np.concatenate(losses), min(seconds)
                runs[name] = dict(losses=losses, params=trainer.params(state), seconds=seconds,
                                  state_bytes=state_bytes, sent=sent)
                print(f"{name:17s} final loss {losses[-1]:.4f}, fastest epoch {seconds * 1e3:7.1f} ms")
        '''),
        code(r'''
            reference_run = runs["one device"]
            print(f"{'variant':17s} {'max |Δθ| vs one device':>23s} {'state bytes/device':>19s} "
                  f"{'sent bytes/device/step':>23s}  collectives")
            for name, run in runs.items():
                difference = max_difference(run["params"], reference_run["params"])
                ops = ", ".join(op for op in run["sent"] if op != "total") or "-"
                print(f"{name:17s} {difference:23.1e} {run['state_bytes']:19,} {run['sent']['total']:23,.0f}  {ops}")

            fig, ax = plt.subplots(figsize=(8, 4))
            for name, run in runs.items():
                ax.plot(run["losses"], label=name, lw=1, ls="--" if "int8" in name else "-")
            ax.set(xlabel="step", ylabel="training loss", title=f"Two epochs on {N} device(s)")
            ax.legend()
            plt.show()
        '''),
        md(r'''
            The exact variants agree with one device to float32 rounding (the sums run in a
            different order), ZeRO-1 holds $1/N$ of the optimizer state per device while sending
            what the all-reduce sends, and int8 compression sends about a quarter of the bytes
            for a slightly different - but not lost - trajectory. On simulated CPU devices the
            times say little (all "devices" share the same cores); on a TPU or multi-GPU machine
            the same code spreads the work.
        '''),
        code(r'''
            # Check: every exact variant computes the one-device result, and ZeRO-1 shards the state.
            for name in ("pmap", "shard_map", "ZeRO-1"):
                assert max_difference(runs[name]["params"], reference_run["params"]) < 1e-4, name
                np.testing.assert_allclose(runs[name]["losses"], reference_run["losses"], rtol=1e-4)
            assert runs["ZeRO-1"]["state_bytes"] * N <= 1.05 * runs["shard_map"]["state_bytes"] + 4096 * N
            if N > 1:
                int8_sent, float_sent = runs["shard_map + int8"]["sent"]["total"], runs["shard_map"]["sent"]["total"]
                assert int8_sent < 0.3 * float_sent
                assert abs(runs["shard_map + int8"]["losses"][-1] - reference_run["losses"][-1]) < 0.05
        '''),
    ]


# --------------------------------------------------------------------------------------
# 04 - pruning and quantization
# --------------------------------------------------------------------------------------

def notebook_04() -> list[nbformat.NotebookNode]:
    return [
        md(r'''
            # 04 · Compressing the MLP: pruning and quantization

            Two ways to make the trained MLP of notebook 02 smaller:

            * **pruning** (`jopt.pruning`) sets most weights to exactly zero and stores only the
              rest. `pruning.prune(optimizer, schedule)` wraps any optimizer so that it trains a
              masked network, recomputing the masks from the weights' magnitudes as the
              schedule says (gradual pruning, Zhu & Gupta 2017);
            * **quantization** (`jopt.quantization`) stores each weight as a small integer code
              times a float scale per output channel: post-training quantization (PTQ) of a
              trained model, and quantization-aware training (QAT) for the aggressive 4-, 2- and
              1-bit codes. The quantized model runs with real `int8 × int8 → int32` matrix
              products.

            Every model here is trained with the epoch function of `jopt.train` (one jitted
            `lax.scan` per epoch), with the recipe of `configs/default.py`.
        '''),
        install_cell(),
        parameters_cell('''
            # "mnist" (downloaded on first use) or "fashion_mnist"; CI uses the latter.
            DATASET = os.environ.get("JOPT_NOTEBOOK_DATASET", "mnist")
        '''),
        code(r'''
            import functools
            import tempfile

            import jax
            import jax.numpy as jnp
            import matplotlib.pyplot as plt
            import numpy as np

            import jopt
            from jopt import pruning, quantization
            from jopt.cli import load_config
            from jopt.train import (build_epoch_fn, build_eval_fn, create_model, epoch_key,
                                    init_train_state, make_apply_fn, make_loss_fn,
                                    prepare_eval_data, shuffle_batches)

            print(f"jax {jax.__version__} on {jax.default_backend()}")
            if REPO is None:
                raise FileNotFoundError(
                    "configs/default.py ships with jopt's repository: run this notebook from a "
                    "clone, or uninstall jopt and re-run the first cell to clone JOPT_REPOSITORY.")
            config = load_config(REPO / "configs" / "default.py", [f"--config.dataset={DATASET}"])
            config.seed = SEED
            EPOCHS = 2 if SMALL else config.num_epochs
            dataset = jopt.data.load(config.dataset)
            if SMALL:
                dataset = jopt.data.subset(dataset, train=4096, test=1000)
            print(dataset, f"- {EPOCHS} epochs of batch {config.batch_size}")

            train_images = jax.device_put(dataset.train_images)
            train_labels = jax.device_put(dataset.train_labels)
            eval_data = prepare_eval_data(dataset.test_images, dataset.test_labels, 1000)
            steps_per_epoch = len(dataset.train_images) // config.batch_size
            total_steps = EPOCHS * steps_per_epoch


            def fit(model, tx):
                """Trains model with tx for EPOCHS epochs; returns the final TrainState."""
                epoch_fn = build_epoch_fn(config, make_loss_fn(make_apply_fn(model)), tx)
                state = init_train_state(config, model, tx, dataset.train_images.shape[1:])
                for epoch in range(1, EPOCHS + 1):
                    batches = shuffle_batches(epoch_key(config.seed, epoch),
                                              len(dataset.train_images), config.batch_size)
                    state, _ = epoch_fn(state, train_images, train_labels, batches)
                return state


            @functools.cache  # one compiled evaluation per apply function
            def evaluator(apply_fn):
                return build_eval_fn(apply_fn)


            def accuracy(apply_fn, params):
                """Test accuracy of apply_fn(params, uint8 images) -> logits."""
                return float(evaluator(apply_fn)(params, eval_data)["accuracy"])


            def unflatten(params):
                """The parameter tree (jopt.train keeps it packed in a FlatParams)."""
                return params.unpack() if isinstance(params, jopt.flat.FlatParams) else params
        '''),
        md(r'''
            ## The dense baseline

            The reference MLP 784-64-64-10 trained with Adam: 55,050 float32 parameters, 215 kB.
        '''),
        code(r'''
            model = create_model(config, dataset.num_classes)  # MLP, inputs standardised
            apply_fn = make_apply_fn(model)
            dense_params = unflatten(fit(model, jopt.adam(config.optimizer.learning_rate)).params)
            dense_accuracy = accuracy(apply_fn, dense_params)
            dense_bytes = pruning.nbytes(dense_params)
            print(f"dense: test accuracy {100 * dense_accuracy:.2f}%, {dense_bytes:,} bytes")
            results = {"dense float32": (dense_accuracy, dense_bytes)}
        '''),
        md(r'''
            ## Pruning

            **One shot, no retraining.** `pruning.compute_masks(params, s)` keeps, in each weight
            matrix, the $1-s$ fraction of entries with the largest magnitude (biases are not
            pruned). Zeroing the rest of a trained network costs little accuracy at first, then
            a lot.
        '''),
        code(r'''
            def apply_masks(params, masks):
                return jax.tree.map(lambda p, m: jnp.where(m, p, 0.0), params, masks)


            sparsities = [0.5, 0.7, 0.8, 0.9, 0.95]
            one_shot = {s: accuracy(apply_fn, apply_masks(dense_params, pruning.compute_masks(dense_params, s)))
                        for s in sparsities}
            for s, acc in one_shot.items():
                print(f"one-shot {100 * s:.0f}% sparse: test accuracy {100 * acc:.2f}%")
        '''),
        md(r'''
            **Gradual pruning during training.** The wrapper hands the optimizer the gradients of
            the masked network and zeroes pruned weights at every step; the schedule raises the
            sparsity from 0 to $s_f$ between 20% and 80% of training,
            $s_t = s_f\,\big(1 - (1 - \tfrac{t - t_0}{t_1 - t_0})^3\big)$, fast while many weights
            are redundant and slowly at the end, so the network adapts as it loses weights.
            Masks are chosen per layer (each matrix 90% sparse) or globally (one magnitude
            threshold for all matrices: the large first layer gives up more).
        '''),
        code(r'''
            TARGET = 0.9
            schedule = pruning.polynomial_decay(0.0, TARGET, int(0.2 * total_steps), int(0.8 * total_steps),
                                                frequency=max(1, total_steps // 50))
            pruned = {}
            for granularity in ("per_layer", "global"):
                tx = pruning.prune(jopt.adam(config.optimizer.learning_rate), schedule,
                                   granularity=granularity)
                state = fit(model, tx)
                params = unflatten(state.params)
                pruned[granularity] = params
                acc = accuracy(apply_fn, params)
                report = pruning.size_report(params)
                results[f"pruned {100 * TARGET:.0f}% ({granularity})"] = (acc, report["sparse_bytes"])
                layers = ", ".join(f"{name} {100 * float(jnp.mean(layer['kernel'] == 0)):.0f}%"
                                   for name, layer in params["params"].items())
                print(f"{granularity:9s}: test accuracy {100 * acc:.2f}%, sparsity "
                      f"{100 * report['sparsity']:.1f}% ({layers}), {report['sparse_bytes']:,} bytes "
                      f"({report['compression']:.1f}x smaller)")

            schedule_steps = np.arange(total_steps + 1)
            fig, (ax_s, ax_p) = plt.subplots(1, 2, figsize=(12, 4))
            ax_s.plot(schedule_steps, 100 * np.asarray(jax.vmap(schedule.sparsity)(schedule_steps)))
            ax_s.set(xlabel="step", ylabel="target sparsity (%)", title="Zhu & Gupta schedule")
            # How many of the 64 first-layer units still read each pixel.
            readers = np.asarray(pruned["per_layer"]["params"]["hidden_0"]["kernel"] != 0).sum(1)
            image = ax_p.imshow(readers.reshape(28, 28), cmap="viridis")
            ax_p.set(title="first layer after pruning: units reading each pixel")
            ax_p.axis("off")
            fig.colorbar(image, ax=ax_p)
            plt.show()
        '''),
        md(r'''
            Which pixels keep their connections? Not only the useful ones: a weight reading a
            pixel that is blank in (almost) every image receives (almost) no gradient, keeps its
            random initial magnitude, and magnitude pruning cannot tell it from a useful weight -
            after a full run the border of this map stays lit. Such weights cost storage but no
            accuracy (their input is zero); weight decay (e.g. `jopt.adamw`) is the usual remedy,
            as it shrinks the weights the loss does not hold up.

            `pruning.strip` exports the pruned tree as `SparseArray`s (per array the smallest of
            a bitmask, an index list or dense storage), and `pruning.save_sparse` writes them to
            an `.npz` whose size reflects the sparsity.
        '''),
        code(r'''
            with tempfile.TemporaryDirectory() as directory:
                path = f"{directory}/pruned.npz"
                file_bytes = pruning.save_sparse(path, pruning.strip(pruned["per_layer"]))
                restored = pruning.load_sparse(path, like=pruned["per_layer"], dense=True)
            print(f"pruned model on disk: {file_bytes:,} bytes (dense: {dense_bytes:,})")
            restored_accuracy = accuracy(apply_fn, jax.tree.map(jnp.asarray, restored))
            print(f"reloaded model: test accuracy {100 * restored_accuracy:.2f}%")
        '''),
        md(r'''
            ## Quantization

            **Post-training quantization.** `quantization.quantize_params(params, mode)` replaces
            each kernel by codes and one scale per output channel: int8 codes in $[-127, 127]$
            with $s = \max|w|/127$, int4 in $[-7, 7]$, ternary $\{-1, 0, 1\}$ and binary
            $\{-1, 1\}$ with $s = $ mean $|w|$. `quantization.quantized_apply` runs the model
            on them in integer arithmetic (activations are quantized per example to int8 on the
            fly). int8 is nearly free; fewer bits cost more and more accuracy.
        '''),
        code(r'''
            @functools.cache
            def int_apply_fn(model):
                """apply(qvariables, uint8 images) with int8 x int8 -> int32 matmuls."""
                return lambda qvariables, images: quantization.quantized_apply(
                    model, qvariables, images.astype(jnp.float32) / 255.0)


            ptq = {}
            for mode in quantization.MODES:
                qvariables = quantization.quantize_params(dense_params, mode)
                sizes = quantization.size_report(dense_params, qvariables)
                ptq[mode] = accuracy(int_apply_fn(model), qvariables)
                results[f"PTQ {mode}"] = (ptq[mode], sizes["quantized_bytes"])
                print(f"PTQ {mode:8s}: test accuracy {100 * ptq[mode]:.2f}%, "
                      f"{sizes['quantized_bytes']:,} bytes ({sizes['ratio']:.1f}x smaller; "
                      f"weights {sizes['weight_ratio']:.1f}x)")
        '''),
        md(r'''
            **Quantization-aware training.** `model.clone(quantize_weights=mode)` builds the same
            network (`jopt.models.MLP`) from `quantization.QuantDense` layers: the forward pass uses the quantized weights,
            $\hat w = s\,q(w/s)$, and the backward pass the straight-through estimator
            ($\partial \hat w / \partial w = 1$ inside the clipping range), so the float weights
            keep learning while the network learns to live with the rounding. Its parameters are
            named like `nn.Dense`'s, so the same `quantize_params` / `quantized_apply` export it.
        '''),
        code(r'''
            qat = {}
            for mode in (["ternary"] if SMALL else ["int4", "ternary", "binary"]):
                qat_model = model.clone(quantize_weights=mode)  # QuantDense layers in place of nn.Dense
                qat_params = unflatten(fit(qat_model, jopt.adam(config.optimizer.learning_rate)).params)
                qvariables = quantization.quantize_params(qat_params, mode)
                sizes = quantization.size_report(qat_params, qvariables)
                qat[mode] = accuracy(int_apply_fn(qat_model), qvariables)
                results[f"QAT {mode}"] = (qat[mode], sizes["quantized_bytes"])
                print(f"QAT {mode:8s}: test accuracy {100 * qat[mode]:.2f}% "
                      f"(PTQ of the float model: {100 * ptq[mode]:.2f}%), {sizes['quantized_bytes']:,} bytes")
        '''),
        md(r'''
            ## Summary
        '''),
        code(r'''
            print(f"{'model':24s} {'test accuracy':>14s} {'bytes':>9s} {'smaller':>8s}")
            for name, (acc, size) in results.items():
                print(f"{name:24s} {100 * acc:13.2f}% {size:9,} {dense_bytes / size:7.1f}x")

            fig, ax = plt.subplots(figsize=(8, 4.5))
            for name, (acc, size) in results.items():
                ax.scatter(size / 1024, 100 * acc)
                ax.annotate(name, (size / 1024, 100 * acc), fontsize=8, xytext=(4, 2),
                            textcoords="offset points")
            ax.set(xscale="log", xlabel="model size (KiB, log scale)", ylabel="test accuracy (%)",
                   title="Accuracy against size")
            ax.grid(alpha=0.3)
            plt.show()
        '''),
        code(r'''
            # Check: what the notebook claims.
            per_layer = pruned["per_layer"]["params"]
            for layer in per_layer.values():  # every kernel pruned to the target, biases untouched
                assert abs(float(jnp.mean(layer["kernel"] == 0)) - TARGET) < 0.01
            assert restored_accuracy == results["pruned 90% (per_layer)"][0]
            assert results["pruned 90% (per_layer)"][0] > one_shot[0.9]  # training through pruning helps
            assert abs(ptq["int8"] - dense_accuracy) < 0.01  # int8 PTQ is nearly lossless
            assert results["PTQ int8"][1] * 3.5 < dense_bytes
            assert qat["ternary"] > ptq["ternary"]  # QAT recovers what 2-bit PTQ loses
        '''),
    ]


# --------------------------------------------------------------------------------------
# 05 - what XLA runs
# --------------------------------------------------------------------------------------

def notebook_05() -> list[nbformat.NotebookNode]:
    return [
        md(r'''
            # 05 · What XLA runs: the computation graph of a training step

            `jax.jit` turns a Python function into a program in three stages:

            1. **trace** - run the Python once on abstract values and record a **jaxpr**, JAX's
               own small functional language;
            2. **lower** - translate the jaxpr to **StableHLO**, the input language of the XLA
               compiler;
            3. **compile** - XLA optimises the program (fusing elementwise operations into
               kernels, choosing layouts, scheduling) and emits the **optimized HLO** that runs.

            `jopt.inspect.inspect_step(step, *args)` does all three ahead of time - nothing is
            executed - and returns a `StepReport` with the jaxpr, both HLO texts, XLA's cost
            analysis (FLOPs, bytes accessed), the kernels it launches and the compile time. This
            notebook uses it on a training step of the MNIST MLP, then compares per-leaf and
            flat (`jopt.flat.FlatParams`) optimizer updates, and the optimizer-state codecs.
            It runs on any backend; the numbers below are for the one it runs on.
        '''),
        install_cell(),
        parameters_cell('''
            BATCH = 128
        '''),
        code(r'''
            import time

            import flax.linen as nn
            import jax
            import jax.numpy as jnp
            import numpy as np
            import optax

            import jopt
            from jopt.flat import FlatParams
            from jopt.inspect import compare, inspect_step

            print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind})")

            MANY_LEAVES = 20 if SMALL else 300  # arrays in the per-leaf vs flat comparison
            BIG_BUFFER = 1 << 18 if SMALL else 1 << 24  # parameters in the state-storage comparison


            def best_time(fn, *args, repeats=5 if SMALL else 30):
                """Fastest wall time of fn(*args) in seconds, after one warm-up call (the best
                of several runs is the least disturbed by whatever else the machine does)."""
                jax.block_until_ready(fn(*args))
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    jax.block_until_ready(fn(*args))
                    times.append(time.perf_counter() - start)
                return min(times)
        '''),
        md(r'''
            ## 1. One training step

            The reference MLP 784-64-64-10 with Adam and softmax cross-entropy; the batch arrives
            as `uint8` pixels and is normalised inside the step. The compiled program depends
            only on the shapes and dtypes of the arguments, so random pixels stand in for a
            batch of digits.
        '''),
        code(r'''
            class MLP(nn.Module):
                hidden: tuple[int, ...] = (64, 64)

                @nn.compact
                def __call__(self, x):
                    x = x.reshape(x.shape[0], -1)
                    for width in self.hidden:
                        x = nn.relu(nn.Dense(width)(x))
                    return nn.Dense(10)(x)


            model = MLP()
            params = model.init(jax.random.key(SEED), jnp.zeros((1, 28, 28)))["params"]
            tx = jopt.adam(1e-3)
            opt_state = tx.init(params)


            def loss_fn(params, images, labels):
                logits = model.apply({"params": params}, images.astype(jnp.float32) / 255.0)
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


            @jax.jit
            def train_step(params, opt_state, images, labels):
                loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
                updates, opt_state = tx.update(grads, opt_state, params)
                return jopt.apply_updates(params, updates), opt_state, loss


            image_key, label_key = jax.random.split(jax.random.key(SEED + 1))
            images = jax.random.randint(image_key, (BATCH, 28, 28), 0, 256).astype(jnp.uint8)
            labels = jax.random.randint(label_key, (BATCH,), 0, 10)

            report = inspect_step(train_step, params, opt_state, images, labels)
            print(report.summary())
        '''),
        md(r'''
            ## 2. The jaxpr

            The jaxpr lists every primitive operation the step performs - forward pass, backward
            pass (added by `jax.value_and_grad`) and optimizer update - with the shape and dtype
            of every value. The whole step is a few hundred equations; Adam's update of a single
            array is short enough to read: the two moment EMAs, bias correction and the scaled
            step, exactly the formulas of notebook 01.
        '''),
        code(r'''
            counts = sorted(report.primitive_counts.items(), key=lambda kv: -kv[1])
            print(f"{report.num_jaxpr_eqns} equations; most used primitives:",
                  ", ".join(f"{name} x{n}" for name, n in counts[:10]))

            w = jnp.zeros((64, 64))
            adam_update = inspect_step(lambda grads, state: tx.update(grads, state), w, tx.init(w))
            print(adam_update.jaxpr)
        '''),
        md(r'''
            ## 3. The optimized HLO: what actually runs

            The lowered StableHLO has about one operation per jaxpr equation. XLA then **fuses**
            chains of elementwise operations and reductions into single kernels, so their
            intermediate arrays are never written to memory. The entry computation below is the
            sequence of kernels one step launches: the matrix multiplications (`dot`, or a
            library-call fusion on CPU), the fused elementwise work around them, and, at the end,
            the optimizer's fused updates of each parameter array (its two moments and the
            parameter itself).
        '''),
        code(r'''
            stablehlo_ops = report.stablehlo_text.count(" = stablehlo.")
            print(f"StableHLO operations: {stablehlo_ops}; kernels after XLA's passes: "
                  f"{report.num_kernels} ({report.num_fusions} fusions)\n")
            entry = report.entry_hlo().splitlines()
            kept = [line for line in entry if " parameter(" not in line]
            print(f"(omitting {len(entry) - len(kept)} parameter lines)")
            print("\n".join(line if len(line) < 160 else line[:157] + "..." for line in kept))
        '''),
        md(r'''
            ## 4. Cost analysis: FLOPs and bytes

            XLA's cost model counts the floating-point operations and the bytes each kernel reads
            and writes. For the MLP the matrix multiplications dominate: the forward pass costs
            $2B\sum_l n_{l-1} n_l$ FLOPs for batch $B$ and layer widths $n_l$; the backward pass
            costs twice that (a gradient for the weights and one for the activations, except the
            input's, which nobody needs). Dividing by the measured step time gives the FLOP rate
            and memory bandwidth the step achieves.
        '''),
        code(r'''
            widths = [784, 64, 64, 10]
            forward = 2 * BATCH * sum(a * b for a, b in zip(widths, widths[1:]))
            backward = 2 * forward - 2 * BATCH * widths[0] * widths[1]
            print(f"matmul FLOPs by hand: {(forward + backward) / 1e6:.2f} M; "
                  f"XLA's count, elementwise work included: {report.flops / 1e6:.2f} M")

            step_time = best_time(train_step, params, opt_state, images, labels)
            print(f"step time {step_time * 1e3:.3f} ms -> {report.flops / step_time / 1e9:.2f} GFLOP/s, "
                  f"{report.bytes_accessed / step_time / 1e9:.2f} GB/s (by XLA's byte count); "
                  f"arithmetic intensity {report.arithmetic_intensity:.1f} FLOP/byte")

            # Check: XLA's count agrees with the hand count, plus a little elementwise work. Only
            # on CPU: GPU cost models have missed FLOPs of library (cuBLAS) calls (jax#22249).
            if jax.default_backend() == "cpu":
                assert forward + backward <= report.flops <= 1.1 * (forward + backward)
        '''),
        md(r'''
            ## 5. Per-leaf vs flat optimizer updates

            An optimizer applied to a pytree runs its update once per parameter array: each
            array gets its own fused kernels, and XLA compiles each of them. A model with hundreds
            of arrays pays in kernel launches (which dominate on GPU/TPU when arrays are small)
            and, above all, in compile time. `FlatParams.pack(params)` packs the tree into one
            buffer per dtype; any optimizer works on it unchanged, and `unpack()` inside the step
            gives the tree back as free slices, so the loss is written as before.

            First the MLP's step, then the update alone on a model with many arrays.
        '''),
        code(r'''
            flat = FlatParams.pack(params)
            flat_state = tx.init(flat)


            @jax.jit
            def flat_train_step(flat, opt_state, images, labels):
                loss, grads = jax.value_and_grad(lambda f: loss_fn(f.unpack(), images, labels))(flat)
                updates, opt_state = tx.update(grads, opt_state, flat)
                return jopt.apply_updates(flat, updates), opt_state, loss


            flat_report = inspect_step(flat_train_step, flat, flat_state, images, labels)
            print(flat, "\n")
            print(compare({"per-leaf step": report, "flat step": flat_report}))
            print(f"\nstep time: per-leaf {step_time * 1e3:.3f} ms, flat "
                  f"{best_time(flat_train_step, flat, flat_state, images, labels) * 1e3:.3f} ms")
        '''),
        code(r'''
            rng = np.random.default_rng(SEED)
            many = {f"layer{i:03d}": jnp.asarray(rng.normal(size=(int(rng.integers(16, 256)), 64)),
                                                 jnp.float32)
                    for i in range(MANY_LEAVES)}
            many_flat = FlatParams.pack(many)


            def update_step(params, grads, state):
                updates, state = tx.update(grads, state, params)
                return jopt.apply_updates(params, updates), state


            per_leaf_update = inspect_step(jax.jit(update_step), many, many, tx.init(many))
            flat_update = inspect_step(jax.jit(update_step), many_flat, many_flat, tx.init(many_flat))
            print(f"{MANY_LEAVES} arrays, {many_flat.num_params:,} parameters, Adam update only\n")
            print(compare({"per-leaf": per_leaf_update, "flat": flat_update}))
            times = {
                "per-leaf": best_time(jax.jit(update_step), many, many, tx.init(many)),
                "flat": best_time(jax.jit(update_step), many_flat, many_flat, tx.init(many_flat)),
            }
            print("\nupdate time: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in times.items()))

            # Check: a few kernels for the whole model, and much less to compile.
            assert flat_update.num_kernels < per_leaf_update.num_kernels / 2
            assert flat_update.num_jaxpr_eqns < per_leaf_update.num_jaxpr_eqns / 2
            assert flat_update.compile_time_s < per_leaf_update.compile_time_s
        '''),
        md(r'''
            The flat update does the same arithmetic (same FLOPs, same bytes) in a handful of
            kernels, and compiles in a fraction of the time. Per-step time is another question,
            and the answer depends on the backend: on a CPU the two are close and either may win;
            on GPU and TPU, where every kernel launch costs microseconds, fewer kernels save that
            overhead. Measure on your hardware: the scripts in `benchmarks/` time both side by
            side.

            ## 6. Optimizer-state storage

            Adam keeps two moments per parameter: 8 bytes of state per parameter in float32.
            `state_storage="bfloat16"` halves that; `"int8"` stores block-wise quantized moments
            (about 2 bytes per parameter). The reports show what each codec costs inside the
            update: compare their kernels, FLOPs and bytes accessed.
        '''),
        code(r'''
            big = jnp.zeros(BIG_BUFFER)
            storage_reports, state_bytes = {}, {}
            for storage in ("float32", "bfloat16", "int8"):
                tx_s = jopt.adam(1e-3, state_storage=storage)
                state = tx_s.init(big)
                state_bytes[storage] = jopt.storage.state_nbytes(state) / big.size

                def update_with_storage(params, grads, state, tx_s=tx_s):
                    updates, state = tx_s.update(grads, state, params)
                    return jopt.apply_updates(params, updates), state

                storage_reports[storage] = inspect_step(update_with_storage, big, big, state)
            print(compare(storage_reports))
            print("\nstate bytes per parameter: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in state_bytes.items()))

            # Check: the codecs shrink the state as documented.
            assert state_bytes["float32"] >= 8.0
            assert state_bytes["bfloat16"] <= 4.01
            assert state_bytes["int8"] <= 2.1
        '''),
        md(r'''
            ## Takeaways

            * `inspect_step` shows each stage of `jit`: the jaxpr you wrote, the HLO XLA runs,
              and the static cost of running it - for any jitted function, sharded ones included
              (their figures are per device).
            * XLA fuses elementwise chains: the optimizer update of one array becomes one or a
              few kernels. The number of parameter arrays, not of parameters, sets the kernel
              count and the compile time of a per-leaf update; flat buffers remove that
              dependence.
            * FLOPs and bytes from the cost model, divided by a measured step time, tell whether
              a step is compute- or bandwidth-bound on your hardware.
        '''),
    ]


NOTEBOOKS = {
    "01_optimizers": (notebook_01, {}),
    "02_mnist_mlp": (notebook_02, {}),
    "03_data_parallel": (notebook_03, {"accelerator": "TPU"}),
    "04_compression": (notebook_04, {}),
    "05_computation_graph": (notebook_05, {}),
}


def build(name: str) -> nbformat.NotebookNode:
    """Returns notebook ``name`` as an nbformat node (no outputs, stable cell ids)."""
    cells_fn, extra_metadata = NOTEBOOKS[name]
    nb = nbformat.v4.new_notebook()
    nb.cells = cells_fn()
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
        **extra_metadata,
    }
    nbformat.validate(nb)
    return nb


def _serialise(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a stored notebook differs from its generated form")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = HERE / f"{name}.ipynb"
        text = _serialise(build(name))
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"stale notebooks: {', '.join(stale)}; run python notebooks/_build.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
