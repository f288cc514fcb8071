"""diffusers' DDPM/DDIM/DPM-Solver schedulers checked against the seed's equations (part V).

The seed (course notes, part V "Réseau débruiteur (DDPM)") writes, for t = 1..T,

    forward step      z_t = sqrt(1 - beta_t) z_{t-1} + sqrt(beta_t) eps_t,   z_0 = x
    marginal          q(z_t | x) = N(sqrt(alpha_t) x, (1 - alpha_t) I),  alpha_t = prod_{k<=t} (1 - beta_k)
    requirement       prod_{k=1..T} (1 - beta_k) -> 0
    reverse step      z_{t-1} = mu(z_t) + sigma n,   n ~ N(0, I)
    mean              mu(z_t) = 1/sqrt(1 - beta_t) (z_t - beta_t / sqrt(1 - alpha_t) eps_hat(z_t))
    loss              || eps - eps_hat(sqrt(alpha_t) x + sqrt(1 - alpha_t) eps) ||^2

The seed's alpha_t is what papers (and this file) call abar_t; diffusers calls it `alphas_cumprod`.
Index convention: diffusers' timestep index t in 0..T-1 is the seed's t+1 in 1..T. Here every
seed-side array is 1-based (`betas[t]`, `abar[t]`, `abar[0] = 1`, `betas[0]` unused), so
`scheduler.alphas_cumprod[t] == abar[t + 1]`.

Seed-side quantities are written out independently in float64 (numpy). diffusers stores its
schedule in float32; where that limits agreement the test says so and, when the point is the
algebra, also runs the scheduler on the seed's float64 schedule (patched in), where agreement is
~1e-11. Tolerances come with the measured error and, mostly, with a wrong variant (an off-by-one
timestep, a sqrt slip, the other variance) that the same tolerance rejects.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

T = 1000
SCHEDULES = ["linear", "squaredcos_cap_v2"]
COSINE_S = 0.008  # Nichol & Dhariwal (2021) offset; beta clipped at 0.999

pytestmark = pytest.mark.numerics  # every test here checks float results against tolerances


# --------------------------------------------------------------------------------------------
# The seed's quantities, float64, 1-based
# --------------------------------------------------------------------------------------------

def cosine_f(u: float) -> float:
    """Nichol & Dhariwal (2021) eq. 17: abar(t) = f(t/T) / f(0) (before beta clipping)."""
    return math.cos((u + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2


def seed_betas(schedule: str) -> np.ndarray:
    """beta_1..beta_T as a 1-based array (index 0 is NaN, never used)."""
    if schedule == "linear":
        betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)  # DDPM paper: 1e-4 .. 0.02, T = 1000
    elif schedule == "squaredcos_cap_v2":
        abar_continuous = [cosine_f(t / T) / cosine_f(0.0) for t in range(T + 1)]
        betas = np.array([min(1.0 - abar_continuous[t] / abar_continuous[t - 1], 0.999) for t in range(1, T + 1)])
    else:
        raise ValueError(schedule)
    return np.concatenate([[np.nan], betas])


def seed_abar(betas: np.ndarray) -> np.ndarray:
    """abar_t = prod_{k=1..t} (1 - beta_k), 1-based, abar_0 = 1 (the empty product)."""
    abar = np.empty(T + 1)
    abar[0] = 1.0
    for t in range(1, T + 1):
        abar[t] = abar[t - 1] * (1.0 - betas[t])
    return abar


def ddpm(schedule: str, **kwargs) -> DDPMScheduler:
    """The seed's DDPM: eps prediction, no clipping of x0_hat (the seed has none), T = 1000."""
    config = dict(num_train_timesteps=T, beta_schedule=schedule, beta_start=1e-4, beta_end=0.02,
                  prediction_type="epsilon", clip_sample=False, variance_type="fixed_small")
    config.update(kwargs)
    return DDPMScheduler(**config)


def with_float64_schedule(scheduler: DDPMScheduler, betas: np.ndarray) -> DDPMScheduler:
    """Replace the scheduler's float32 schedule by the seed's float64 one, to test the algebra alone."""
    scheduler.betas = torch.from_numpy(betas[1:].copy())
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.from_numpy(seed_abar(betas)[1:].copy())
    return scheduler


def seed_mean(z, eps_hat, beta_t, abar_t):
    """mu(z_t) = 1/sqrt(1 - beta_t) (z_t - beta_t / sqrt(1 - abar_t) eps_hat)   (seed, part V)."""
    return (z - beta_t / math.sqrt(1.0 - abar_t) * eps_hat) / math.sqrt(1.0 - beta_t)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# 1. abar_t = prod (1 - beta_k), and abar_T -> 0
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_alphas_cumprod_is_the_product_of_one_minus_beta(schedule):
    betas, scheduler = seed_betas(schedule), ddpm(schedule)
    abar = seed_abar(betas)
    alphas_cumprod = scheduler.alphas_cumprod.double().numpy()

    np.testing.assert_allclose(scheduler.betas.double().numpy(), betas[1:], rtol=1e-6)
    # float32 cumprod: measured worst relative error 3.6e-7 (linear), 1.3e-5 (cosine, at t ~ T
    # where abar ~ 1e-9). Index t of diffusers is the seed's t + 1:
    np.testing.assert_allclose(alphas_cumprod, abar[1:], rtol=5e-5, atol=0)
    assert alphas_cumprod[0] == pytest.approx(1.0 - betas[1], rel=1e-7)  # diffusers' t=0 has one step of noise
    # ...and the 0-based misreading (alphas_cumprod[t] == abar_t) is off by a relative beta_{t+1}
    # (4.1e-5 .. 0.02 linear, up to 0.999 cosine), which the same tolerance rejects.
    assert not np.allclose(alphas_cumprod, abar[:-1], rtol=5e-5, atol=0)

    if schedule == "squaredcos_cap_v2":
        # Closed form of the cosine schedule (telescoping product) for every t < T; only beta_T is
        # clipped at 0.999 (unclipped it would be 1 - f(1)/f((T-1)/T) = 1).
        closed = np.array([cosine_f(t / T) / cosine_f(0.0) for t in range(1, T)])
        np.testing.assert_allclose(alphas_cumprod[:-1], closed, rtol=5e-5)
        assert (betas[1:] >= 0.999).sum() == 1 and betas[T] == 0.999

    # The seed's requirement prod_{k<=T} (1 - beta_k) -> 0. Measured abar_T:
    #   linear:  4.0358e-05  (sqrt(abar_T) = 0.0064: the signal left in z_T)
    #   cosine:  2.4288e-09  (= f((T-1)/T)/f(0) * (1 - 0.999), set by the 0.999 clip)
    expected_abar_T = {"linear": 4.0358e-05, "squaredcos_cap_v2": 2.4288e-09}[schedule]
    assert abar[T] == pytest.approx(expected_abar_T, rel=1e-4)
    assert alphas_cumprod[-1] == pytest.approx(expected_abar_T, rel=1e-4)
    assert alphas_cumprod[-1] < 1e-4
    # and the schedule is a proper noising schedule: abar decreases strictly from ~1
    assert alphas_cumprod[0] >= 0.9999 - 1e-7 and np.all(np.diff(alphas_cumprod) < 0)


# The product's own training schedulers: every diffusion stage (ddpm, sr) of the shipped configs.
CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
SEED_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # the config's names -> ours above


def shipped_diffusion_models() -> list:
    from stagediff.pipelines.registry import load_config

    return [pytest.param(stage.model, id=f"{path.stem}.{stage.name}") for path in CONFIGS
            for stage in load_config(path).stages if hasattr(stage.model, "make_train_scheduler")]


@pytest.mark.parametrize("model", shipped_diffusion_models())
def test_the_products_training_scheduler_is_the_seeds(model):
    """`make_train_scheduler` as each shipped config builds it: the DDPM paper's linear betas
    1e-4 .. 0.02 over T = 1000 (or the cosine schedule), abar_t = prod (1 - beta_k), the seed's
    posterior variance, and the configured prediction type (no x0 clipping unless asked)."""
    scheduler = model.make_train_scheduler()
    assert model.num_train_timesteps == T == scheduler.config.num_train_timesteps
    betas = seed_betas(SEED_SCHEDULES[model.beta_schedule])
    # Tolerances of test 1 (float32 storage); a beta range of 1e-4 .. 0.01 is off by up to 50%.
    np.testing.assert_allclose(scheduler.betas.double().numpy(), betas[1:], rtol=1e-6)
    np.testing.assert_allclose(scheduler.alphas_cumprod.double().numpy(), seed_abar(betas)[1:], rtol=5e-5, atol=0)
    assert scheduler.config.variance_type == "fixed_small"  # sigma_t^2 = the posterior variance (section 3)
    assert scheduler.config.prediction_type == model.prediction_type
    assert scheduler.config.clip_sample is False


# --------------------------------------------------------------------------------------------
# 2. The forward process: add_noise is the closed-form marginal of the step-by-step chain
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_add_noise_is_the_closed_form_marginal(schedule):
    betas, scheduler = seed_betas(schedule), ddpm(schedule)
    abar = seed_abar(betas)
    g = gen(0)
    x = torch.randn((T, 2, 3, 3), generator=g, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t = torch.randperm(T, generator=g)  # every timestep once, one per sample

    z = scheduler.add_noise(x, eps, t)

    # exactly the formula, with diffusers' own (float32-stored) abar
    a = scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(z, a.sqrt() * x + (1 - a).sqrt() * eps, rtol=1e-14, atol=1e-14)

    # and the seed's marginal sqrt(abar_t) x + sqrt(1 - abar_t) eps with the seed's abar_{t+1}
    a_seed = torch.from_numpy(abar)[t + 1].view(-1, 1, 1, 1)
    seed_z = a_seed.sqrt() * x + (1 - a_seed).sqrt() * eps
    # diffusers' abar is float32: |abar32 - abar| <= rel_t abar with rel_t = u sum_{k<=t} ((1 + beta_k) /
    # (1 - beta_k) + 1), u = 2^-24 (see test_stepwise_chain_has_the_closed_form_marginal), so each
    # element errs by at most rel_t abar (|x| / (2 sqrt(abar)) + |eps| / (2 sqrt(1 - abar))). Measured:
    # 0.14 (linear, 3.4e-6) and 0.18 (cosine, 5.1e-6) of it, under every ATEN_CPU_CAPABILITY.
    betas_t = torch.from_numpy(betas[1:])
    rel = 2.0 ** -24 * torch.cumsum((1 + betas_t) / (1 - betas_t) + 1, dim=0)[t].view(-1, 1, 1, 1)
    bound = rel * a_seed * (x.abs() / (2 * a_seed.sqrt()) + eps.abs() / (2 * (1 - a_seed).sqrt())) + 1e-14
    assert ((z - seed_z).abs() <= bound).all(), ((z - seed_z).abs() / bound).max()
    # the off-by-one reading (abar_t for diffusers' t) is visibly wrong
    a_off = torch.from_numpy(abar)[t].view(-1, 1, 1, 1)
    assert (z - (a_off.sqrt() * x + (1 - a_off).sqrt() * eps)).abs().max() > 1e-2


def test_stepwise_chain_has_the_closed_form_marginal():
    """z_t = sqrt(1 - beta_t) z_{t-1} + sqrt(beta_t) eps_t, from z_0 = x, has the marginal
    N(sqrt(abar_t) x, 1 - abar_t), with diffusers' abar (`alphas_cumprod`).

    Both schedules in one pass (same noise draws, different betas): N scalar chains of all
    T = 1000 steps, float64. First the chain's moment recursion exactly, then Monte Carlo.
    """
    n_chains, x = 100_000, 2.0
    checkpoints = [1, 2, 5, 10, 50, 100, 250, 500, 750, 1000]  # seed's t
    betas = {s: seed_betas(s) for s in SCHEDULES}
    abar_diffusers = {s: ddpm(s).alphas_cumprod.double().numpy() for s in SCHEDULES}

    # (a) exact moments of the chain: m_t = sqrt(1 - beta_t) m_{t-1}, v_t = (1 - beta_t) v_{t-1} + beta_t,
    # against diffusers' float32 abar. Its error is bounded by the float32 arithmetic that made it
    # (unit round-off u = 2^-24): beta_k rounded (u beta_k), 1 - beta_k rounded (u), then a t-term
    # product (t - 1 roundings), so |abar32_t - abar_t| <= rel_t abar_t with
    # rel_t = u sum_{k<=t} ((1 + beta_k) / (1 - beta_k) + 1) (to first order; 1.2e-4 linear, 2.4e-4
    # cosine at t = T). m = sqrt(abar) x then errs by rel_t / 2 relatively, v = 1 - abar by rel_t abar_t.
    # Measured: at most 0.14 (linear) and 0.18 (cosine) of these bounds, identical under
    # ATEN_CPU_CAPABILITY=default, avx2 and avx512 (the former fixed abs=1e-7 on v, 1.7 float32 ulps
    # at 1, was 95% used at t = 18); abar read one step late breaks them by 168x and 44x.
    unit_roundoff = 2.0 ** -24
    for s in SCHEDULES:
        m, v, rel = x, 0.0, 0.0
        for t in range(1, T + 1):
            m, v = math.sqrt(1 - betas[s][t]) * m, (1 - betas[s][t]) * v + betas[s][t]
            rel += unit_roundoff * ((1 + betas[s][t]) / (1 - betas[s][t]) + 1)
            a = abar_diffusers[s][t - 1]
            assert m == pytest.approx(math.sqrt(a) * x, rel=rel / 2, abs=0), (s, t)
            assert v == pytest.approx(1 - a, rel=0, abs=rel * a), (s, t)

    # (b) Monte Carlo of the chain itself
    rng = np.random.default_rng(12345)
    z = {s: np.full(n_chains, x) for s in SCHEDULES}
    samples = {s: {} for s in SCHEDULES}
    noise = np.empty(n_chains)
    for t in range(1, T + 1):
        rng.standard_normal(out=noise)
        for s in SCHEDULES:
            z[s] *= math.sqrt(1.0 - betas[s][t])
            z[s] += math.sqrt(betas[s][t]) * noise
            if t in checkpoints:
                samples[s][t] = (z[s].mean(), z[s].var(ddof=1))

    def z_scores(s, mean_of, var_of):
        """Largest |z-score| of the sample mean and variance against a predicted N(mean, var)."""
        worst = 0.0
        for t in checkpoints:
            mean_hat, var_hat = samples[s][t]
            mean, var = mean_of(t), var_of(t)
            worst = max(worst, abs(mean_hat - mean) / math.sqrt(var / n_chains),
                        abs(var_hat - var) / (var * math.sqrt(2.0 / (n_chains - 1))))
        return worst

    for s in SCHEDULES:
        a = lambda t: abar_diffusers[s][t - 1]  # noqa: E731 (seed's t -> diffusers' index t - 1)
        right = z_scores(s, lambda t: math.sqrt(a(t)) * x, lambda t: 1 - a(t))
        assert right < 5.0, (s, right)

        # Measured worst |z| of the right formula: 2.3 (linear), 2.5 (cosine). Wrong formulas cannot
        # pass the same threshold; their measured worst |z| (both schedules):
        #   variance 1 - sqrt(abar)        ~224 (sqrt slip in the marginal)
        #   variance sqrt(1 - abar)        ~222 (std/variance mix-up)
        #   beta and 1 - beta swapped      ~632 (the chain forgets x after one step)
        wrong = {
            "1 - sqrt(abar)": z_scores(s, lambda t: math.sqrt(a(t)) * x, lambda t: 1 - math.sqrt(a(t))),
            "sqrt(1 - abar)": z_scores(s, lambda t: math.sqrt(a(t)) * x, lambda t: math.sqrt(1 - a(t))),
        }
        swapped_m, swapped_v, swapped = x, 0.0, {}
        for t in range(1, T + 1):  # z_t = sqrt(beta_t) z_{t-1} + sqrt(1 - beta_t) eps_t
            swapped_m, swapped_v = math.sqrt(betas[s][t]) * swapped_m, betas[s][t] * swapped_v + 1 - betas[s][t]
            swapped[t] = (swapped_m, swapped_v)
        wrong["beta <-> 1 - beta"] = z_scores(s, lambda t: swapped[t][0], lambda t: swapped[t][1])
        for name, score in wrong.items():
            assert score > 50.0, (s, name, score)


# --------------------------------------------------------------------------------------------
# 3. The reverse step
# --------------------------------------------------------------------------------------------
#
# diffusers writes the mean as the posterior mean of q(z_{t-1} | z_t, x0_hat) with
# x0_hat = (z_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t) (DDPM paper eq. 7 and 15); the seed
# writes it in the eps form (DDPM eq. 11). They are algebraically equal; checked numerically here.
#
# sigma: the DDPM paper uses sigma_t^2 = beta_t ("fixed_large") or the posterior variance
# beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t ("fixed_small", diffusers' default).
# The seed's slide prints sigma_{t-1} = beta_t / sqrt((1 - beta_t)(1 - alpha_t)) "for" its loss:
# that is the value that makes the ELBO weight beta_t^2 / (2 sigma^2 (1 - beta_t)(1 - abar_t))
# of DDPM eq. 12 constant, so that the loss becomes the plain eps-MSE; it is also exactly the
# coefficient of eps_hat in mu. It is not a sampling std diffusers offers (it is ~beta_t, not
# ~sqrt(beta_t)); `test_seed_printed_sigma_is_the_eps_coefficient_of_the_mean` pins that down.

STEP_TIMES = [1, 2, 3, 10, 100, 500, 999, 1000]  # seed's t; diffusers' index is t - 1


def step_case(schedule: str, precision: str, variance_type: str = "fixed_small"):
    betas = seed_betas(schedule)
    scheduler = ddpm(schedule, variance_type=variance_type)
    if precision == "float64":
        with_float64_schedule(scheduler, betas)
    return betas, seed_abar(betas), scheduler


# float64: the algebra (measured error <= 7e-12 absolute, 1e-11 relative). float32: as shipped, where diffusers recomputes
# beta_t = 1 - abar_t / abar_{t-1} from its float32 abar (relative error up to 8e-4 at small t):
# worst prev_sample errors measured 8.9e-4 (linear, t = 3, |values| ~ 11) and 2.4e-3 (cosine,
# t = T, |values| ~ 370), i.e. within atol 1e-4 + rtol 7e-5.
TOLERANCES = {"float64": dict(rtol=1e-9, atol=1e-9), "float32": dict(rtol=2e-4, atol=1e-4)}
VARIANCE_RTOL = {"float64": 1e-9, "float32": 2e-3}


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddpm_step_is_the_seed_reverse_step_with_posterior_variance(schedule, precision):
    betas, abar, scheduler = step_case(schedule, precision, "fixed_small")
    tol = TOLERANCES[precision]
    g = gen(1)
    sqrt_beta_also_passes = []
    for t in STEP_TIMES:
        z = 3 * torch.randn((64, 4, 4, 4), generator=g, dtype=torch.float64)
        eps_hat = torch.randn(z.shape, generator=g, dtype=torch.float64)
        out = scheduler.step(eps_hat, t - 1, z, generator=gen(1000 + t))
        n = torch.randn(z.shape, generator=gen(1000 + t), dtype=torch.float64)  # the step's own draw

        mu = seed_mean(z, eps_hat, betas[t], abar[t])
        beta_tilde = (1 - abar[t - 1]) / (1 - abar[t]) * betas[t]
        sigma = math.sqrt(beta_tilde) if t > 1 else 0.0  # no noise on the last step (seed t = 1)
        torch.testing.assert_close(out.prev_sample, mu + sigma * n, **tol)

        assert scheduler._get_variance(t - 1).item() == pytest.approx(beta_tilde, rel=VARIANCE_RTOL[precision],
                                                                     abs=1e-19)
        # wrong variants rejected by the same tolerance: sigma = sqrt(beta_t) (fixed_large), and the
        # eps coefficient sqrt(beta_t) / sqrt(1 - abar_t) instead of beta_t / sqrt(1 - abar_t)
        sqrt_beta_also_passes.append(torch.allclose(out.prev_sample, mu + math.sqrt(betas[t]) * n, **tol))
        wrong_mu = seed_mean(z, eps_hat, betas[t], abar[t]) - (math.sqrt(betas[t]) - betas[t]) / math.sqrt(
            (1 - abar[t]) * (1 - betas[t])) * eps_hat
        assert not torch.allclose(out.prev_sample, wrong_mu + sigma * n, **tol)
    # beta_tilde_t and beta_t differ most at t = 1 (0 vs beta_1) and t = 2 (beta_tilde_2 ~ beta_2 / 2)
    assert not sqrt_beta_also_passes[0] and not sqrt_beta_also_passes[1]


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddpm_step_fixed_large_uses_beta_and_adds_no_noise_on_the_last_step(schedule, precision):
    betas, abar, scheduler = step_case(schedule, precision, "fixed_large")
    tol = TOLERANCES[precision]
    g = gen(2)
    for t in STEP_TIMES:
        z = 3 * torch.randn((64, 4, 4, 4), generator=g, dtype=torch.float64)
        eps_hat = torch.randn(z.shape, generator=g, dtype=torch.float64)
        out = scheduler.step(eps_hat, t - 1, z, generator=gen(2000 + t))
        n = torch.randn(z.shape, generator=gen(2000 + t), dtype=torch.float64)
        mu = seed_mean(z, eps_hat, betas[t], abar[t])
        assert scheduler._get_variance(t - 1).item() == pytest.approx(betas[t], rel=VARIANCE_RTOL[precision])
        if t > 1:
            torch.testing.assert_close(out.prev_sample, mu + math.sqrt(betas[t]) * n, **tol)
        else:
            # fixed_large's variance at the last step would be beta_1 = 1e-4 (std 0.01 >> tol): the
            # step must return the mean itself, whatever the generator.
            other = scheduler.step(eps_hat, 0, z, generator=gen(99)).prev_sample
            torch.testing.assert_close(out.prev_sample, mu, **tol)
            assert torch.equal(out.prev_sample, other)
            assert not torch.allclose(out.prev_sample, mu + math.sqrt(betas[1]) * n, **tol)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_seed_printed_sigma_is_the_eps_coefficient_of_the_mean(schedule):
    """d prev_sample / d eps_hat = -beta_t / sqrt((1 - beta_t)(1 - abar_t)): the seed's printed
    sigma_{t-1}; diffusers' sampling std is sqrt(beta_tilde_t) (or sqrt(beta_t)), not that value."""
    betas, abar, scheduler = step_case(schedule, "float64")
    z = torch.randn((4, 4, 4, 4), generator=gen(3), dtype=torch.float64)
    for t in [2, 10, 100, 500, 1000]:
        with_eps = scheduler.step(torch.ones_like(z), t - 1, z, generator=gen(t)).prev_sample
        without = scheduler.step(torch.zeros_like(z), t - 1, z, generator=gen(t)).prev_sample
        printed_sigma = betas[t] / math.sqrt((1 - betas[t]) * (1 - abar[t]))
        torch.testing.assert_close(with_eps - without, torch.full_like(z, -printed_sigma), rtol=1e-9, atol=1e-12)
        # printed_sigma / sqrt(beta_tilde_t) = sqrt(beta_t / ((1 - beta_t)(1 - abar_{t-1}))): comparable
        # for the first few steps and at t = T, but ~beta_t instead of ~sqrt(beta_t) in between
        if t in (100, 500):
            sampling_std = math.sqrt(scheduler._get_variance(t - 1).item())
            assert printed_sigma / sampling_std < 0.5, (t, printed_sigma, sampling_std)


def test_clip_sample_changes_the_mean_so_the_seed_needs_clip_sample_false():
    """diffusers clamps x0_hat to [-1, 1] when clip_sample=True (its default for DDPMScheduler
    and DDIMScheduler); the seed's mean has no such clamp. Equal only while |x0_hat| <= 1."""
    betas, abar = seed_betas("linear"), seed_abar(seed_betas("linear"))
    clipped = with_float64_schedule(ddpm("linear", clip_sample=True), betas)
    t = 100
    x0_small = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    x0_large = torch.full((1, 1, 2, 2), 3.0, dtype=torch.float64)
    eps = torch.full((1, 1, 2, 2), 0.3, dtype=torch.float64)
    for x0, matches in [(x0_small, True), (x0_large, False)]:
        z = math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * eps
        out = clipped.step(eps, t - 1, z, generator=gen(0))
        n = torch.randn(z.shape, generator=gen(0), dtype=torch.float64)
        seed = seed_mean(z, eps, betas[t], abar[t]) + math.sqrt((1 - abar[t - 1]) / (1 - abar[t]) * betas[t]) * n
        assert torch.allclose(out.prev_sample, seed, rtol=1e-9, atol=1e-9) == matches


# --------------------------------------------------------------------------------------------
# 4. The eps-prediction loss and x0_hat
# --------------------------------------------------------------------------------------------

# Measured with the oracle: per-sample squared norm (48 dims) <= 2.8e-6 (cosine; float32 abar in
# add_noise, amplified by 1/sqrt(1 - abar) ~ 100 at t = 1); an oracle reading abar one step late
# gives up to ~4. The product's loss (float32 mean over dims): 2.6e-11 vs 8e-5 for the late oracle.
LOSS_MAX, PRODUCT_LOSS_MAX = 1e-5, 1e-9


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_eps_loss_is_zero_for_the_oracle_and_pred_original_sample_is_x(schedule):
    betas, scheduler = seed_betas(schedule), ddpm(schedule)
    abar = torch.from_numpy(seed_abar(betas))
    g = gen(4)
    x = torch.randn((T, 3, 4, 4), generator=g, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t = torch.randperm(T, generator=g)
    z = scheduler.add_noise(x, eps, t)

    def oracle(z, t, offset=1):
        """The exact eps of z_t = sqrt(abar) x + sqrt(1 - abar) eps, seed abar_{t+offset}."""
        a = abar[(t + offset).clamp(max=T)].view(-1, 1, 1, 1)
        return (z - a.sqrt() * x) / (1 - a).sqrt()

    loss = (eps - oracle(z, t)).pow(2).sum(dim=(1, 2, 3))  # the seed's squared norm, per sample
    assert loss.max() < LOSS_MAX  # float32 abar in add_noise vs the seed's float64
    off_by_one = (eps - oracle(z, t, offset=2)).pow(2).sum(dim=(1, 2, 3))  # abar_{t+1} read one step late
    assert off_by_one.max() > 1e3 * LOSS_MAX

    # pred_original_sample = (z_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t) (DDPM eq. 15) = x with the oracle
    for index in [0, 1, 9, 99, 499, 998, 999]:
        zi, ei, xi = z[t == index], eps[t == index], x[t == index]
        x0_hat = scheduler.step(ei, index, zi, generator=gen(index)).pred_original_sample
        a = abar[index + 1].item()
        torch.testing.assert_close(x0_hat, (zi - math.sqrt(1 - a) * ei) / math.sqrt(a), rtol=1e-4, atol=1e-4)
        # step() does its scalar arithmetic in float32 (sqrt(abar_t), sqrt(1 - abar_t)): error
        # ~ 6e-8 |eps| / sqrt(abar_t), e.g. 3e-5 at t = T - 1 for the cosine schedule (abar ~ 2e-6)
        torch.testing.assert_close(x0_hat, xi, rtol=0, atol=1e-6 / math.sqrt(a))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_product_loss_is_the_seed_loss(schedule):
    """stagediff's EpsilonPredictionLoss with an oracle network: ~0; with an off-by-one oracle: not."""
    from diffusers.models.unets.unet_2d import UNet2DOutput

    from stagediff.modules.ddpm import EpsilonPredictionLoss

    abar = torch.from_numpy(seed_abar(seed_betas(schedule)))
    x = torch.randn((256, 2, 4, 4), generator=gen(5), dtype=torch.float64)

    class Oracle(torch.nn.Module):
        def __init__(self, offset):
            super().__init__()
            self.offset = offset

        def forward(self, z, t):
            a = abar[(t + self.offset).clamp(max=T)].view(-1, 1, 1, 1)
            return UNet2DOutput(sample=(z - a.sqrt() * x) / (1 - a).sqrt())

    with torch.random.fork_rng():  # the loss draws t and eps from the global generator
        torch.manual_seed(0)
        right = EpsilonPredictionLoss(Oracle(1), ddpm(schedule))(x)["loss"].item()
        torch.manual_seed(0)
        off_by_one = EpsilonPredictionLoss(Oracle(2), ddpm(schedule))(x)["loss"].item()
    assert right < PRODUCT_LOSS_MAX and off_by_one > 100 * PRODUCT_LOSS_MAX, (right, off_by_one)


def test_v_prediction_loss_targets_v_and_the_scheduler_reads_it_back():
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x (Salimans & Ho 2022): an oracle v scores ~0, and
    the scheduler's step recovers x from it at t = 0 exactly as from the oracle eps."""
    from diffusers.models.unets.unet_2d import UNet2DOutput

    from stagediff.modules.ddpm import EpsilonPredictionLoss

    scheduler = DDPMScheduler(num_train_timesteps=T, prediction_type="v_prediction", clip_sample=False)
    abar = scheduler.alphas_cumprod.double()
    x = torch.randn((64, 2, 4, 4), generator=gen(6), dtype=torch.float64)

    class Oracle(torch.nn.Module):
        def forward(self, z, t):
            a = abar[t].view(-1, 1, 1, 1)
            eps = (z - a.sqrt() * x) / (1 - a).sqrt()
            return UNet2DOutput(sample=a.sqrt() * eps - (1 - a).sqrt() * x)

    with torch.random.fork_rng():
        torch.manual_seed(0)
        assert EpsilonPredictionLoss(Oracle(), scheduler)(x)["loss"].item() < PRODUCT_LOSS_MAX
    eps = torch.randn(x.shape, generator=gen(7), dtype=torch.float64)
    t = torch.full((64,), 700)
    z = abar[700].sqrt() * x + (1 - abar[700]).sqrt() * eps
    step = scheduler.step(Oracle()(z, t).sample, 700, z)
    assert torch.allclose(step.pred_original_sample, x, atol=1e-8)


# --------------------------------------------------------------------------------------------
# 5. Fast samplers with an oracle eps
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddim_eta0_all_steps_retraces_the_forward_path_back_to_x(schedule):
    """Point-mass data x: eps*(z, t) = (z - sqrt(abar_t) x) / sqrt(1 - abar_t) is the exact eps.
    DDIM (eta = 0) over all T steps from z_T = sqrt(abar_T) x + sqrt(1 - abar_T) eps must pass
    through every z_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps (same eps) and end at x."""
    base = ddpm(schedule)
    ddim = DDIMScheduler.from_config(base.config)  # how the product builds it (make_sampler)
    ac = base.alphas_cumprod.double()
    g = gen(6)
    x = 1.5 * torch.randn((8, 2, 4, 4), generator=g, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)

    def run(offset):
        ddim.set_timesteps(T)
        assert ddim.timesteps.tolist() == list(range(T - 1, -1, -1))
        z, worst_path = base.add_noise(x, eps, torch.tensor([T - 1])), 0.0
        for t in ddim.timesteps:
            a = ac[min(int(t) + offset, T - 1)]
            z = ddim.step((z - a.sqrt() * x) / (1 - a).sqrt(), t, z, eta=0.0).prev_sample
            if t > 0:
                path = ac[t - 1].sqrt() * x + (1 - ac[t - 1]).sqrt() * eps
                worst_path = max(worst_path, (z - path).abs().max().item())
        return z, worst_path

    z0, worst_path = run(offset=0)
    assert worst_path < 1e-5  # measured 5e-7 / 6e-7
    torch.testing.assert_close(z0, x, rtol=0, atol=1e-5)  # measured 5e-9 (linear), 1.2e-7 (cosine)
    z0_off_by_one, _ = run(offset=1)  # an oracle that reads abar one step late
    assert (z0_off_by_one - x).abs().max() > 1e-3  # measured 1.4e-2 (linear) / 8.4e-3 (cosine)


# diffusers 0.42 calls np.array(tensor, copy=False) in DPMSolverMultistepScheduler.set_timesteps
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_dpm_solver_20_steps_recovers_a_point_mass(schedule):
    """DPM-Solver++ (2M, deterministic: the product's 'dpmsolver-ode'), 20 steps, from
    z_T ~ N(0, I): with the exact eps of point-mass data x every sample must land on x."""
    base = ddpm(schedule)
    dpm = DPMSolverMultistepScheduler.from_config(base.config)
    ac = base.alphas_cumprod.double()
    x = 1.5 * torch.randn((8, 2, 4, 4), generator=gen(7), dtype=torch.float64)
    z_T = torch.randn(x.shape, generator=gen(8), dtype=torch.float64)

    def run(offset):
        dpm.set_timesteps(20)
        assert len(dpm.timesteps) == 20
        z = z_T.clone()
        for t in dpm.timesteps:
            a = ac[min(int(t) + offset, T - 1)]
            z = dpm.step((z - a.sqrt() * x) / (1 - a).sqrt(), t, z).prev_sample
        return z

    assert (run(offset=0) - x).abs().max() < 1e-5  # measured 3.1e-7 (linear), 2.1e-7 (cosine)
    assert (run(offset=1) - x).abs().max() > 1e-3  # off-by-one oracle: measured 1.5e-2 / 7.1e-3
