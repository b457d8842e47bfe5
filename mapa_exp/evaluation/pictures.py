"""Pictures of one trained run, for its dashboard: what a researcher looks at to see what the model learned.

``run_pictures(module, e, datamodule)`` returns matplotlib figures of member e (plain runs: e = 0):

* ``pictures/decoder`` (2-D observations): the learned decoder's curve -- f(z) for z in [-3, 3], for MAPA
  f(h(ẑ)) through its recovered prior map (method.md §6) -- coloured by the latent value, over the training
  data, with the ground truth's own curve f_GT(z) where there is one. 2-D latents: the decoder's image of a
  latent grid.
* ``pictures/samples``: 1000 draws from the model (prior, decoder, observation noise) beside 1000 held-out
  test points; binary image data: a grid of sampled images.
* ``pictures/posterior`` (1-D latents): for 4 test points, the model's exact posterior density over its
  latent (quadrature) and what the method proposes for it (``Method.proposal_density``) -- the encoder's
  Gaussian q(z|x) (VAE/IWAE) or the MAPA family's q(m|x) over the training codes (Eq 8, Eq 7 or uniform),
  drawn at the codes.

Only drawn when a logger takes pictures (``logger=wandb``); every figure has labelled axes with units.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mapa_exp.evaluation.evaluate import model_of_module  # noqa: E402
from mapa_exp.math.quadrature import StandardNormalPrior, grid_log_posterior  # noqa: E402


@torch.no_grad()
def run_pictures(module, e: int, datamodule, prior_recovery: dict | None = None, n_points: int = 4) -> dict:
    """The figures of member e (module doc), by name; ``prior_recovery`` as the evaluation's."""
    x = {s: datamodule.member_x(s, e) for s in ("train", "val", "test")}
    model = model_of_module(module, x, e, **(prior_recovery or {}))  # the prior chosen on validation data
    truth = datamodule.truth(e)
    gt_decoder = truth.decoder if getattr(truth, "has_ground_truth", True) else None
    out = {}
    Dx, Dz = x["train"].shape[1], module.latent_dim
    if Dx == 2:
        out["pictures/decoder"] = _decoder_figure(model, gt_decoder, x["train"], Dz)
    out["pictures/samples"] = _samples_figure(model, module.likelihood, x["test"], Dz)
    if Dz == 1:
        out["pictures/posterior"] = _posterior_figure(module, e, model, x, n_points, datamodule)
    return out


def _decoder_figure(model, gt_decoder, x_train, Dz):
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    ax.scatter(x_train[:, 0], x_train[:, 1], s=2, c="0.8", label="training data")
    if Dz == 1:
        z = torch.linspace(-3, 3, 1200, dtype=torch.float64)[:, None]
        f = model.decode(z).double()
        sc = ax.scatter(f[:, 0], f[:, 1], c=z[:, 0], s=3, cmap="viridis", label="learned f(z)")
        if gt_decoder is not None:
            g = gt_decoder(z.float())
            ax.plot(g[:, 0], g[:, 1], color="black", lw=0.8, ls="--", label="ground truth f_GT(z)")
        fig.colorbar(sc, ax=ax, label="latent z (standard normal prior)")
    else:
        a = torch.linspace(-2.5, 2.5, 41, dtype=torch.float64)
        grid = torch.stack(torch.meshgrid(a, a, indexing="ij"), -1).reshape(-1, 2)
        f = model.decode(grid.to(torch.float64)).double()
        sc = ax.scatter(f[:, 0], f[:, 1], c=grid.norm(dim=1), s=3, cmap="viridis", label="learned f(z), z on a grid")
        fig.colorbar(sc, ax=ax, label="|z|")
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="best", markerscale=3)
    ax.set_title("decoder over the data")
    fig.tight_layout()
    return fig


def _samples_figure(model, likelihood, x_test, Dz, n: int = 1000):
    g = torch.Generator().manual_seed(0)
    z = model.prior.sample(n, generator=g) if not isinstance(model.prior, StandardNormalPrior) else \
        torch.randn(n, Dz, generator=g, dtype=torch.float64)
    params = model.decode(z).float()
    xs = likelihood.sample(params, generator=g)
    side = int(round(math.sqrt(x_test.shape[1])))
    if x_test.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(4.6, 4.0))
        ax.scatter(x_test[:n, 0], x_test[:n, 1], s=3, c="0.55", label="held-out test data")
        ax.scatter(xs[:, 0], xs[:, 1], s=3, c="tab:red", alpha=0.6, label="samples from the model")
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
        ax.set_aspect("equal")
        ax.legend(fontsize=7, markerscale=3)
        ax.set_title("model samples vs test data")
    elif side * side == x_test.shape[1]:  # images: sampled pixel probabilities beside test images
        fig, axes = plt.subplots(2, 8, figsize=(8, 2.4))
        probs = torch.sigmoid(params) if hasattr(likelihood, "rho") else params
        for i in range(8):
            axes[0, i].imshow(probs[i].reshape(side, side), cmap="gray_r", vmin=0, vmax=1)
            axes[1, i].imshow(x_test[i].reshape(side, side), cmap="gray_r", vmin=0, vmax=1)
            axes[0, i].axis("off")
            axes[1, i].axis("off")
        axes[0, 0].set_title("model (pixel probabilities)", fontsize=7, loc="left")
        axes[1, 0].set_title("held-out test images", fontsize=7, loc="left")
    else:
        fig, ax = plt.subplots(figsize=(4.6, 3.0))
        ax.hist([x_test[:n, 0].numpy(), xs[:, 0].numpy()], bins=40, label=["test data", "model samples"])
        ax.set_xlabel("x1 (first coordinate)")
        ax.set_ylabel("count")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _posterior_figure(module, e, model, x, n_points, datamodule):
    """The model's posterior over its latent for a few test points, and the method's own proposal."""
    points = x["test"][torch.linspace(0, x["test"].shape[0] - 1, n_points).long()]
    grid = StandardNormalPrior(1).quadrature_grid(2000)
    log_post = grid_log_posterior(points.double(), model.decode, model.likelihood, grid)  # (P, J) log masses
    density = (log_post - grid.log_weights + StandardNormalPrior(1).log_prob(grid.nodes)).exp()  # per unit latent
    fig, axes = plt.subplots(1, n_points, figsize=(3.0 * n_points, 2.6), squeeze=False)
    proposed = module.proposal_density(points, e, datamodule)
    latent = "ẑ" if not module.standard_normal_prior else "z"
    for j, ax in enumerate(axes[0]):
        ax.plot(grid.nodes[:, 0], density[j], color="black", lw=1.2, label=f"model posterior p({latent}|x)")
        if proposed is not None and proposed["kind"] == "density":  # a density over z, e.g. the encoder's q(z|x)
            ax.plot(proposed["z"], proposed["log_density"][j].double().exp(), color="tab:orange", lw=1.2, ls="--",
                    label=proposed["label"])
        elif proposed is not None:  # probabilities of training points, drawn at their codes
            codes = proposed["z"].double()
            if model.copula is not None:  # in the recovered model's own latent
                codes = model.copula.to_standard(codes)
            log_q = proposed["log_density"][j]
            top = torch.argsort(log_q, descending=True)[:50]
            ax2 = ax.twinx()
            ax2.vlines(codes[top], 0, log_q[top].exp(), color="tab:blue", lw=1, label=proposed["label"])
            ax2.set_ylabel("q(m|x)", fontsize=7)
            ax2.set_ylim(0, None)
        ax.set_xlabel(f"latent {latent}")
        if j == 0:
            ax.set_ylabel("density")
        ax.set_title(f"test point {j}", fontsize=8)
        ax.set_xlim(-4, 4)
    handles = [h for a in fig.axes for h in a.get_legend_handles_labels()[0]]
    labels = [lab for a in fig.axes for lab in a.get_legend_handles_labels()[1]]
    seen = dict(zip(labels, handles))
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=3, fontsize=7, frameon=False)
    return fig
