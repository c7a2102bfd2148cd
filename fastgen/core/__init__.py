"""The sigma-space core: denoisers, schedules, solvers and a reference ODE solve.

Everything here sees a model as an EDM denoiser ``D(x, sigma, **cond) -> x0_hat`` with the
VE-scaled state ``x = x0 + sigma * eps``. This package imports nothing else from fastgen.
"""
