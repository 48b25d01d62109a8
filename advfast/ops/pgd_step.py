"""One PGD step and the random start, with their plain PyTorch reference.

pgd_step(x_adv, x_nat, grad, eps, alpha, norm, lower, upper):
    linf: y = x_adv + alpha * sign(grad)
    l2:   y = x_adv + alpha * grad / ||grad||_2            (per sample; zero gradient -> no move)
    then project y onto the eps-ball around x_nat per sample
    linf: clamp y - x_nat to [-eps, eps];  l2: rescale y - x_nat to norm eps when it is longer,
    then clamp to [lower, upper].
Since x_nat is in [lower, upper], the final clamp only moves elements towards x_nat, so the result
stays in the ball.

eps and alpha are python floats or per-sample tensors of shape (B,) (a 0-dim tensor is broadcast).
Python floats are checked for eps >= 0, alpha >= 0 and finiteness for free. Tensor values are checked
only for CPU tensors outside torch.compile: checking CUDA values would need a host sync every step,
so a negative or non-finite CUDA eps/alpha is the caller's responsibility.

The steps are non-differentiable (sign, projection) and always run under torch.no_grad().
"""

from __future__ import annotations

import functools
import math

import torch

from advfast.ops import _dispatch
from advfast.ops.dtypes import compute_dtype

NORMS = {"linf": 0, "l2": 1}

_IMPLEMENTED = ("cuda", "triton", "cpp", "torch")
_AUTO_ORDER = ("cuda", "triton", "cpp", "torch")


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------- checks

def _check_norm(norm) -> int:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
    return NORMS[norm]


def _check_bounds(lower, upper) -> tuple[float, float]:
    for name, v in (("lower", lower), ("upper", upper)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a python float, got {type(v).__name__}")
        if math.isnan(v):
            raise ValueError(f"{name} must not be NaN")
    if lower > upper:
        raise ValueError(f"lower must be <= upper, got lower={lower}, upper={upper}")
    return float(lower), float(upper)


def _check_radius(name: str, value, x: torch.Tensor, x_name: str = "x_adv") -> float | torch.Tensor:
    """eps/alpha: a finite float >= 0, or a floating tensor of shape (B,) or () on x's device."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a tensor of shape (B,), got a bool")
    if isinstance(value, (int, float)):
        v = float(value)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        return v
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a float or a tensor of shape (B,), got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}; use .float()")
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but {x_name} is on {x.device}; move {name} to {x.device}")
    batch = x.shape[0]
    if value.dim() != 0 and tuple(value.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one value per sample) or be a float, "
                         f"got shape {tuple(value.shape)}")
    if value.device.type == "cpu" and not _compiling():  # free on CPU; a host sync on CUDA, so skipped
        if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
            raise ValueError(f"{name} must hold finite values >= 0")
    return value


def _check_input(name: str, t, ref: torch.Tensor | None = None, same_dtype: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if ref is None:
        if t.dim() == 0:
            raise ValueError(f"{name} must have a batch dimension (shape (B, ...)), got a 0-dim tensor")
        return
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but x_adv has {tuple(ref.shape)}; they must match")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but x_adv is on {ref.device}; move it to {ref.device}")
    if same_dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x_adv has {ref.dtype}; cast it with .to({ref.dtype})")


def _check_step_args(x_adv, x_nat, grad, eps, alpha, norm, lower, upper):
    _check_input("x_adv", x_adv)
    _check_input("x_nat", x_nat, x_adv)
    _check_input("grad", grad, x_adv, same_dtype=False)  # e.g. a bf16 gradient for fp32 x is fine
    norm_id = _check_norm(norm)
    lower, upper = _check_bounds(lower, upper)
    eps = _check_radius("eps", eps, x_adv)
    alpha = _check_radius("alpha", alpha, x_adv)
    return eps, alpha, norm_id, lower, upper


# -------------------------------------------------------------------------------------- reference

def _per_sample(value: float | torch.Tensor, x: torch.Tensor) -> float | torch.Tensor:
    """A float stays a float; a tensor becomes (B, 1, ..., 1) in x's dtype, ready to broadcast."""
    if isinstance(value, torch.Tensor):
        return value.to(x.dtype).expand(x.shape[0]).reshape((x.shape[0],) + (1,) * (x.dim() - 1))
    return value


def _sample_norms(t: torch.Tensor) -> torch.Tensor:
    """Per-sample l2 norms in float64, as the kernels compute them: a float32 gradient whose sum of
    squares underflows float32 (|g| ~ 1e-23) still has a norm, so it still gets a step."""
    norms = torch.linalg.vector_norm(t.flatten(1), dim=1, dtype=torch.float64)
    return norms.reshape((t.shape[0],) + (1,) * (t.dim() - 1))


def pgd_step_reference(x_adv: torch.Tensor, x_nat: torch.Tensor, grad: torch.Tensor,
                       eps: float | torch.Tensor, alpha: float | torch.Tensor, norm: str = "linf",
                       lower: float = 0.0, upper: float = 1.0) -> torch.Tensor:
    """The plain PyTorch sequence, computed in x's dtype (float32 for half inputs); returns x's dtype.

    Tests hold every backend to this function applied to float64 copies of the inputs.
    """
    compute = compute_dtype(x_adv.dtype)
    x, xn, g = x_adv.to(compute), x_nat.to(compute), grad.to(compute)
    eps, alpha = _per_sample(eps, x), _per_sample(alpha, x)
    if norm == "linf":
        y = x + alpha * g.sign()
        y = torch.minimum(torch.maximum(y, xn - eps), xn + eps)
    elif norm == "l2":
        gnorm = _sample_norms(g)
        step = torch.where(gnorm > 0, alpha / torch.where(gnorm > 0, gnorm, 1.0), 0.0).to(compute)
        y = x + step * g
        delta = y - xn
        dnorm = _sample_norms(delta)
        too_long = dnorm > eps
        # Samples inside the ball keep y itself (not xn + delta): a zero gradient leaves x bit for bit.
        shrink = (eps / torch.where(too_long, dnorm, 1.0)).to(compute)
        y = torch.where(too_long, xn + delta * shrink, y)
    else:
        raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
    return y.clamp(lower, upper).to(x_adv.dtype)


# ---------------------------------------------------------------------------------------- backends

@functools.lru_cache(maxsize=64)
def _filled(value: float, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Python floats expanded for the compiled ops' (B,) arguments; cached so a fixed eps/alpha
    # costs no fill kernel per step. Never written to.
    return torch.full((n,), value, dtype=dtype, device=device)


def _as_radius_vector(value: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """eps/alpha as the compiled ops take them: shape (B,), in the compute dtype (float64 for float64 x,
    float32 otherwise), so a float64 step is not limited by a float32 radius."""
    dtype = compute_dtype(x.dtype)
    if isinstance(value, torch.Tensor):
        return value.to(dtype).expand(x.shape[0]).contiguous()
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        # a fill captured into a CUDA graph runs only at replay: a cached tensor would hold garbage
        # for eager calls until then, so inside a capture the vector is never cached
        return torch.full((x.shape[0],), value, dtype=dtype, device=x.device)
    return _filled(value, x.shape[0], x.device, dtype)


def _run(backend: str, out: torch.Tensor, x_adv, x_nat, grad, eps, alpha, norm_id, lower, upper):
    """Write the step of x_adv into ``out`` (out is x_adv or a fresh tensor in x_adv's layout)."""
    if backend in ("cuda", "cpp"):
        if out is not x_adv:
            out.copy_(x_adv)
        torch.ops.advfast.pgd_step_(out, x_nat, grad, _as_radius_vector(eps, x_adv),
                                    _as_radius_vector(alpha, x_adv), norm_id, lower, upper)
    elif backend == "triton":
        from advfast.kernels import pgd_step as kernels

        with _dispatch.device_guard(out.device):
            kernels.pgd_step(out, x_adv, x_nat, grad, eps, alpha, norm_id, lower, upper)
    else:
        out.copy_(pgd_step_reference(x_adv, x_nat, grad, eps, alpha,
                                     "linf" if norm_id == 0 else "l2", lower, upper))
    return out


def _resolve(backend: str, device: torch.device) -> str:
    if backend == "auto" and _compiling():
        return "torch"  # inductor fuses the reference sequence into one kernel itself
    return _dispatch.resolve("pgd_step", backend, device, _IMPLEMENTED, _AUTO_ORDER)


def pgd_step_(x_adv: torch.Tensor, x_nat: torch.Tensor, grad: torch.Tensor, eps: float | torch.Tensor,
              alpha: float | torch.Tensor, norm: str = "linf", lower: float = 0.0, upper: float = 1.0,
              backend: str = "auto") -> torch.Tensor:
    """One PGD step written into x_adv; returns x_adv. See the module docstring."""
    eps, alpha, norm_id, lower, upper = _check_step_args(x_adv, x_nat, grad, eps, alpha, norm, lower, upper)
    name = _resolve(backend, x_adv.device)
    if x_adv.numel() == 0:
        return x_adv
    with torch.no_grad():
        return _run(name, x_adv, x_adv, x_nat, grad, eps, alpha, norm_id, lower, upper)


def pgd_step(x_adv: torch.Tensor, x_nat: torch.Tensor, grad: torch.Tensor, eps: float | torch.Tensor,
             alpha: float | torch.Tensor, norm: str = "linf", lower: float = 0.0, upper: float = 1.0,
             backend: str = "auto") -> torch.Tensor:
    """One PGD step; returns a new tensor with x_adv's dtype and memory layout. See the module docstring."""
    eps, alpha, norm_id, lower, upper = _check_step_args(x_adv, x_nat, grad, eps, alpha, norm, lower, upper)
    name = _resolve(backend, x_adv.device)
    with torch.no_grad():
        if name == "torch":
            y = pgd_step_reference(x_adv, x_nat, grad, eps, alpha, norm, lower, upper)
            if y.stride() != x_adv.stride():
                y = torch.empty_like(x_adv).copy_(y)
            return y
        out = torch.empty_like(x_adv)
        if x_adv.numel() == 0:
            return out
        return _run(name, out, x_adv, x_nat, grad, eps, alpha, norm_id, lower, upper)


# ------------------------------------------------------------------------------------ random start

def random_start(x_nat: torch.Tensor, eps: float | torch.Tensor, norm: str = "linf", lower: float = 0.0,
                 upper: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniform random point of the eps-ball around x_nat, clamped to [lower, upper].

    linf: x_nat + U(-eps, eps) per element. l2: x_nat + eps * U^(1/d) * z / ||z|| with z ~ N(0, I)
    per sample (d = elements per sample): uniform in the l2 ball. The result keeps x_nat's dtype and
    layout and is deterministic for a given ``generator`` (which must live on x_nat's device).

    ACL's official code does not clamp the start to [0, 1] (its first forward sees x_nat + delta
    unclamped). After the first pgd_step both lie in the ball and in [lower, upper], but the first
    iterate can differ where the start left the box; pass lower=-inf, upper=inf here to reproduce
    ACL's start exactly.
    """
    _check_input("x_nat", x_nat)
    norm_id = _check_norm(norm)
    lower, upper = _check_bounds(lower, upper)
    # The ball is around x_nat, so eps's batch size and device are checked against x_nat.
    eps = _check_radius("eps", eps, x_nat, "x_nat")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != x_nat.device.type:
            raise ValueError(f"generator is on {generator.device} but x_nat is on {x_nat.device}; "
                             f"use torch.Generator(device={str(x_nat.device)!r})")
    compute = compute_dtype(x_nat.dtype)
    with torch.no_grad():
        x = x_nat.to(compute)
        radius = _per_sample(eps, x)
        if norm_id == 0:
            delta = torch.empty_like(x).uniform_(-1.0, 1.0, generator=generator) * radius
        else:
            z = torch.empty_like(x).normal_(generator=generator)
            d = x[0].numel()
            u = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, dtype=compute,
                           device=x.device)
            delta = z / _sample_norms(z).clamp_min(1e-30) * (u.pow(1.0 / d) * radius)
        return (x + delta).clamp(lower, upper).to(x_nat.dtype)
