"""noise_step: training pure ternary weights from forward-mode directional derivatives, no gradient memory.

Will Brickner, "noise_step: Training in 1.58b With No Gradient Memory", preprint, December 2024
(no arXiv id: the author reports arXiv declined it; distributed as a PDF on GitHub; paper only, no
code). It builds on Baydin et al., "Gradients without Backpropagation", arXiv 2202.08587. The
weights θ ∈ {−1, 0, 1}^P carry no scale. One step on a batch:

    ν_i ~ Bernoulli(s) ⊙ U{−1, +1}                  i = 1..n, regenerated from (seed, step, i)
    α_i = J·ν_i = d/dε L(θ + ε ν_i)|ε=0              forward mode (jax.jvp), no backward pass
    α_τ,i = sgn(α_i) · 1[|α_i| ≥ median_j |α_j|]     one tern per perturbation
    ĝ = Σ_i ν_i α_τ,i ;   θ ← T(θ − T(ĝ))            T: ≤ −1/3 → −1, ≥ 1/3 → +1, else 0

J is the Jacobian of the batch-mean loss with respect to the weights read as real numbers, so α_i is
the directional derivative along ν_i (what reverse mode would give as ∇L·ν_i, here without ever
forming ∇L). No learning rate, no momentum, no optimizer state. The density s follows the loss: by
default 6e-5, then 1.5e-5 once the loss falls below 2, then 3.7e-6 below 1 (the paper's MNIST
schedule; ``densities`` / ``loss_thresholds``); the stage never goes back.

A model is its init seed plus the per-step terns α_τ (log2 3 bits each, packed 5 per byte by
:func:`pack_terns`) and the steps at which the density stage changed: :func:`replay` regenerates
every ν_i and re-applies every update, reconstructing the weights bit-exactly (integer arithmetic
only) without data or forward passes.

Implementation and memory model
-------------------------------
* Weights are a dict of int8 kernels ``(in, out)`` used as ``y = x @ W``. A perturbation is stored
  sparsely: ``capacity`` slots of (global flat position, value ±1 or 0 for unused). The number of
  non-zeros is drawn ~ Binomial(P, s), positions uniformly; a position drawn twice is kept once
  (probability ≈ k²/2P per perturbation, e.g. 6e-4 at k = 20, P = 3.3e5), so ν matches
  Bernoulli(s) ⊙ U{±1} up to these rare collisions. Counts beyond ``capacity`` (> 6σ) are cut.
* The loss is written against a hook ``perturb(name, x, y)`` that each linear calls on its output:
  under the jvp the hook adds the tangent ``x ν_name`` computed as a gather of the ≤ capacity
  touched input columns and a scatter-add into the output columns; its primal is ``y`` (the
  perturbation enters at ε = 0 only). So the tangent of the weights is never materialised: no
  P-sized float buffer exists, only the int8 weights themselves.
* Perturbations are evaluated ``chunk_size`` at a time with ``vmap`` (``lax.map`` over chunks):
  the primal forward is computed once per chunk and shared; each perturbation in the chunk carries
  its own tangent activations. Live memory ≈ primal activations of one layer + chunk_size × tangent
  activations of one layer (forward mode keeps nothing for a backward pass) + O(n·capacity) indices,
  versus backprop's stored activations of all layers + a P-sized gradient (+ optimizer moments).
* The update sorts the n·capacity touched positions, sums duplicates per position and scatters
  the new ternary values: O(n·capacity) memory again, in place on the donated weights.
* Measured (XLA memory_analysis, experiments/results/noise_step_mnist/table.md): the tangent
  activations make memory grow with chunk_size × batch, so forward mode wins over backprop + Adam
  only while chunk_size·batch·width is small next to the weights (LLM-like shapes; see the test
  with wide layers and batch 8) or with small chunks (MNIST MLP, batch 256: peak 4.9 MiB at
  chunk 1 vs 8.4 MiB for Adam+STE, but 18.9 MiB at chunk 16). With int8 storage XLA on CPU also
  materialises a float32 copy of each kernel for the dot (hoisted out of the chunk loop).
"""

from lowrank_jax.noise_step.checkpoint import (
    SeedCheckpoint,
    checkpoint_sizes,
    make_checkpoint,
    pack_terns,
    replay,
    unpack_terns,
)
from lowrank_jax.noise_step.update import (
    Layout,
    LossFn,
    NoiseStepConfig,
    NoiseStepState,
    Params,
    Perturb,
    apply_update,
    apply_update_counted,
    capacity_for,
    directional_derivatives,
    init_state,
    init_ternary,
    median_threshold,
    next_stage,
    no_perturb,
    noise_step_update,
    perturbations,
    ternarize,
)

__all__ = [
    "Layout",
    "LossFn",
    "NoiseStepConfig",
    "NoiseStepState",
    "Params",
    "Perturb",
    "SeedCheckpoint",
    "apply_update",
    "apply_update_counted",
    "capacity_for",
    "checkpoint_sizes",
    "directional_derivatives",
    "init_state",
    "init_ternary",
    "make_checkpoint",
    "median_threshold",
    "next_stage",
    "no_perturb",
    "noise_step_update",
    "pack_terns",
    "perturbations",
    "replay",
    "ternarize",
    "unpack_terns",
]
