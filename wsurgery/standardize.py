"""Weight Standardization: the tensor math and the parametrizations that apply it.

Paper: Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and
Weight Standardization", https://arxiv.org/abs/1903.10520

Each conv filter (one output channel, all of ``in/groups x kh x kw``) is
standardized on the fly::

    W_hat = (W - mean(W)) / s(W)

Sources disagree on ``s``; :data:`CONVENTIONS` names each one so a model can be
folded with exactly the formula it was trained with.

Two parametrizations are provided for :func:`torch.nn.utils.parametrize.register_parametrization`:

* :class:`WeightStandardization` (mode ``ws``): ``W_hat`` as above.
* :class:`AdaptiveWeightStandardization` (mode ``aws``): ``gamma * W_hat(V) + beta`` with a
  learnable per-output-channel ``gamma`` and ``beta`` initialised to ``s`` and the mean of the
  pretrained filter, so the converted conv computes exactly what the original did.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError

__all__ = [
    "CONVENTIONS",
    "AdaptiveWeightStandardization",
    "WSConvention",
    "WeightStandardization",
    "as_convention",
    "filter_stats",
    "get_convention",
    "standardize_weight",
    "standardize_weight_reference",
]


#: one autograd.Function per (unbiased, eps_in_sqrt, eps); see :func:`_closed_form`
_CLOSED_FORMS: dict[tuple[bool, bool, float], type[torch.autograd.Function]] = {}


def _closed_form_class(unbiased: bool, eps_in_sqrt: bool, eps: float) -> type[torch.autograd.Function]:
    key = (unbiased, eps_in_sqrt, eps)
    fn = _CLOSED_FORMS.get(key)
    if fn is None:  # made once per convention, in eager code (a class made inside a trace recompiles each call)

        class _Fixed(torch.autograd.Function):
            @staticmethod
            def forward(ctx, weight: torch.Tensor, fan_in: int):
                return _closed_form_forward(ctx, weight, fan_in, unbiased, eps_in_sqrt, eps)

            @staticmethod
            def backward(ctx, grad_out: torch.Tensor):
                return _closed_form_backward(ctx, grad_out), None

        fn = _CLOSED_FORMS[key] = _Fixed
    return fn


@dataclass(frozen=True)
class WSConvention:
    """One formula for the per-filter scale ``s``.

    Attributes:
        name: short name used on the command line and in saved configs.
        unbiased: divide the variance by ``n - 1`` instead of ``n``.
        eps_in_sqrt: ``s = sqrt(var + eps)`` if True, else ``s = sqrt(var) + eps``.
        eps: the epsilon.
        source: where the formula comes from.
    """

    name: str
    unbiased: bool
    eps_in_sqrt: bool
    eps: float
    source: str = ""

    def __post_init__(self) -> None:
        _closed_form_class(self.unbiased, self.eps_in_sqrt, self.eps)  # before any torch.compile trace

    def with_eps(self, eps: float | None) -> WSConvention:
        if eps is None or eps == self.eps:
            return self
        if not (eps > 0 and math.isfinite(eps)):
            raise ConfigError(f"WS eps must be a positive finite number, got {eps}")
        return WSConvention(self.name, self.unbiased, self.eps_in_sqrt, float(eps), self.source)


#: Every convention wsurgery can apply and fold, by name.
CONVENTIONS: dict[str, WSConvention] = {
    "timm": WSConvention("timm", False, True, 1e-6, "timm StdConv2d: biased var, eps inside sqrt"),
    "bit": WSConvention("bit", False, True, 1e-10, "big_transfer / Composer: biased var, eps inside sqrt"),
    "paper": WSConvention("paper", True, False, 1e-5, "WS authors' code, mmcv ConvWS2d: unbiased std + eps"),
    "seed": WSConvention("seed", False, False, 1e-5, "biased std + eps: (W - mu) / (sigma + eps)"),
}


def get_convention(name: str, eps: float | None = None) -> WSConvention:
    """Look a convention up by name, optionally overriding its eps."""
    try:
        conv = CONVENTIONS[name]
    except KeyError:
        raise ConfigError(
            f"unknown WS convention {name!r}; choose one of {', '.join(CONVENTIONS)}"
        ) from None
    return conv.with_eps(eps)


def as_convention(convention: WSConvention | str) -> WSConvention:
    """A :class:`WSConvention`, or one of :data:`CONVENTIONS` by name (``"timm"``, ``"bit"``, ...)."""
    return get_convention(convention) if isinstance(convention, str) else convention


def _as_filters(weight: torch.Tensor, fan_in: int) -> torch.Tensor:
    return weight.reshape(-1, fan_in)


def filter_stats(
    weight: torch.Tensor, fan_in: int, convention: WSConvention
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-filter ``(mean, s)``, each of shape ``(num_filters,)``, in float32 or wider."""
    w = _as_filters(weight, fan_in)
    if w.dtype in (torch.float16, torch.bfloat16):
        w = w.float()
    var, mean = torch.var_mean(w, dim=1, correction=1 if convention.unbiased else 0)
    scale = torch.sqrt(var + convention.eps) if convention.eps_in_sqrt else torch.sqrt(var) + convention.eps
    return mean, scale


def _is_channels_last(weight: torch.Tensor) -> bool:
    return weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)


def _to_rows(t: torch.Tensor, fan_in: int, channels_last: bool) -> torch.Tensor:
    """``t`` as ``(num_filters, fan_in)``; with ``channels_last`` each row is ordered ``(kh, kw, in)``.

    Each filter's entries only need to be one contiguous block; their order inside it does not
    matter for per-filter statistics. So a ``channels_last`` conv weight (what
    ``model.to(memory_format=torch.channels_last)`` makes on GPU) is viewed without a copy and
    the result comes back ``channels_last`` too; other layouts pay for a copy.
    """
    if channels_last:
        return t.permute(0, 2, 3, 1).reshape(-1, fan_in)
    return t.reshape(-1, fan_in)


def _from_rows(rows: torch.Tensor, shape: torch.Size, channels_last: bool) -> torch.Tensor:
    if channels_last:
        o, i, kh, kw = shape
        return rows.reshape(o, kh, kw, i).permute(0, 3, 1, 2)
    return rows.reshape(shape)


#: dtypes for which the ``timm``/``bit`` conventions run as one native batch-norm kernel
_BN_DTYPES = (torch.float32, torch.float64)


def _standardize_batch_norm(
    weight: torch.Tensor,
    fan_in: int,
    eps: float,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
) -> torch.Tensor:
    """Biased variance, eps inside the sqrt (``timm``/``bit``), optionally ``gamma * W_hat + beta``.

    The filters are the channels of a ``(1, num_filters, fan_in)`` batch, so this is training-mode
    batch norm without running statistics, exactly what timm's ``StdConv2d`` computes. Why not our
    own ops: ``native_batch_norm`` and its backward are each ONE fused kernel (statistics and
    normalisation in two sweeps over the weights, the affine folded in, gamma/beta gradients
    included), where separate ``var_mean``/``sub``/``div``/``addcmul`` ops cost a kernel launch,
    a full-size temporary and a pass over memory each. On a 2-core CPU that halves the
    standardization's share of a training step. Numerically it is the same formula evaluated as
    ``W * a + b`` with ``a = gamma / sqrt(var + eps)``, ``b = beta - mean * a``: results agree
    with ``(W - mean) / sqrt(var + eps)`` to float rounding (the tests bound it).
    """
    cudnn = torch.backends.cudnn.enabled
    if weight.is_contiguous():  # the common case, with as few ops (and Python) as possible
        return torch.batch_norm(weight.view(1, -1, fan_in), gamma, beta, None, None, True, 0.0, eps, cudnn).view(
            weight.shape
        )
    cl = _is_channels_last(weight)
    out = torch.batch_norm(_to_rows(weight, fan_in, cl).unsqueeze(0), gamma, beta, None, None, True, 0.0, eps, cudnn)
    return _from_rows(out.squeeze(0), weight.shape, cl)


def _closed_form_forward(ctx, weight: torch.Tensor, fan_in: int, unbiased: bool, eps_in_sqrt: bool, eps: float):
    cl = _is_channels_last(weight)
    w = _to_rows(weight, fan_in, cl)
    compute = w.float() if w.dtype in (torch.float16, torch.bfloat16) else w
    var, mean = torch.var_mean(compute, dim=1, correction=1 if unbiased else 0, keepdim=True)
    if eps_in_sqrt:
        scale = torch.sqrt(var + eps)
        ratio = None
    else:
        sigma = torch.sqrt(var)
        scale = sigma + eps
        ratio = torch.where(sigma > 0, scale / sigma, torch.zeros_like(sigma))
    w_hat = torch.sub(compute, mean).div_(scale)
    # the input too (no copy: it is the caller's tensor), for a second derivative (see backward)
    ctx.save_for_backward(w_hat, scale, ratio, weight)
    ctx.fan_in = fan_in
    ctx.convention = (unbiased, eps_in_sqrt, eps)
    ctx.shape = weight.shape
    ctx.in_dtype = weight.dtype
    ctx.channels_last = cl
    return _from_rows(w_hat.to(weight.dtype), weight.shape, cl)


def _closed_form_backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
    w_hat, scale, ratio, weight = ctx.saved_tensors
    if torch.is_grad_enabled():
        # backward(create_graph=True): the closed form below treats W_hat and s as constants, so its
        # own gradient would miss every term through W (a silently wrong Hessian). Differentiate the
        # plain formula instead, in float32 or wider as the forward computed it.
        unbiased, eps_in_sqrt, eps = ctx.convention
        conv = WSConvention("", unbiased, eps_in_sqrt, eps)
        compute = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
        out = standardize_weight_reference(compute, ctx.fan_in, conv).to(weight.dtype)
        return torch.autograd.grad(out, weight, grad_out, create_graph=True)[0]
    device = grad_out.device.type
    # inside an autocast region (a backward called under autocast), bmm would run in half precision
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
        g = _to_rows(grad_out, ctx.fan_in, ctx.channels_last).to(w_hat.dtype)
        # per-filter dot product without a full-size (g * W_hat) temporary
        denom = ctx.fan_in - 1 if ctx.convention[0] else ctx.fan_in
        proj = torch.bmm(g.unsqueeze(1), w_hat.unsqueeze(2)).squeeze(2) / denom
        if ratio is not None:
            proj = proj * ratio
        inv = scale.reciprocal()
        grad = torch.addcmul(g.mean(dim=1, keepdim=True).mul_(inv).neg_(), g, inv)
        grad.addcmul_(w_hat, proj.mul_(inv).neg_())
    return _from_rows(grad.to(ctx.in_dtype), ctx.shape, ctx.channels_last)


def _closed_form(weight: torch.Tensor, fan_in: int, unbiased: bool, eps_in_sqrt: bool, eps: float) -> torch.Tensor:
    """Standardization with a closed-form backward (every convention; used where batch norm cannot be).

    Autograd through ``var_mean``/``sqrt``/``div`` saves several intermediates and runs
    about six kernels backward; the closed form needs ``W_hat`` and ``s`` only. With
    ``g`` the incoming gradient, ``D = n`` (biased) or ``n - 1`` (unbiased), and ``c = 1``
    (eps inside the sqrt) or ``s / sigma`` (eps added to the std)::

        dL/dW = (g - mean(g) - W_hat * sum(g * W_hat) * c / D) / s

    evaluated as two fused multiply-adds into one output buffer (no full-size temporaries).
    ``c`` is taken as 0 for a zero-variance filter, whose ``W_hat`` is 0 anyway (autograd
    would return NaN there). The forward computes ``(W - mean) / s`` with one output
    allocation (subtract, then divide in place): bit-identical to the plain expression.
    A second derivative (``create_graph=True``) differentiates the plain formula instead.

    Each convention has its own autograd.Function (:func:`_closed_form_class`), the convention a
    constant inside it rather than an argument. Why: when ``torch.compile`` meets a second model
    whose eps differs (a ``timm`` then a ``paper`` model in one process), dynamo turns the eps
    argument of an autograd.Function into a dynamic float and then fails on it
    (``lift_tracked_freevar_to_input should not be called on root SubgraphTracer``, torch 2.14).
    The class exists before any trace (:class:`WSConvention` makes it), so a compiled caller only
    looks it up.
    """
    return _closed_form_class(unbiased, eps_in_sqrt, eps).apply(weight, fan_in)


def _standardize_impl(
    weight: torch.Tensor,
    fan_in: int,
    unbiased: bool,
    eps_in_sqrt: bool,
    eps: float,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick the kernel: one native batch-norm op where the convention allows, else the closed form.

    Takes the convention as plain values so that :func:`torch.compile` can specialise on them.
    """
    if (
        eps_in_sqrt
        and not unbiased
        and weight.dtype in _BN_DTYPES
        and (gamma is None or (gamma.dtype == weight.dtype and beta.dtype == weight.dtype))
    ):
        return _standardize_batch_norm(weight, fan_in, eps, gamma, beta)
    w_hat = _closed_form(weight, fan_in, unbiased, eps_in_sqrt, eps)
    if gamma is None:
        return w_hat
    return _affine(w_hat, fan_in, gamma, beta)


def _affine(w_hat: torch.Tensor, fan_in: int, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``gamma * W_hat + beta`` per filter, in ``W_hat``'s layout."""
    cl = _is_channels_last(w_hat)
    filters = _to_rows(w_hat, fan_in, cl)
    g = gamma.to(filters.dtype).unsqueeze(1)
    b = beta.to(filters.dtype).unsqueeze(1)
    return _from_rows(torch.addcmul(b, filters, g), w_hat.shape, cl)


def _check_fan_in(fan_in: int, convention: WSConvention) -> None:
    if fan_in < 2 and convention.unbiased:
        raise ConfigError("the 'paper' convention needs at least 2 entries per filter (unbiased std)")


def standardize_weight(weight: torch.Tensor, fan_in: int, convention: WSConvention | str = "timm") -> torch.Tensor:
    """Standardize every filter of ``weight`` (fused forward and backward).

    ``timm``/``bit`` (biased variance, eps inside the sqrt) on float32/float64 weights run as
    one native batch-norm kernel each way, as timm's ``StdConv2d`` does; other conventions and
    half precision use a custom autograd function with a closed-form backward.

    Args:
        weight: any tensor whose elements are ``num_filters * fan_in`` filter entries in
            filter-major order (a conv weight ``(out, in/groups, kh, kw)``, contiguous or
            ``channels_last``, or a CondConv expert bank ``(experts, out * in/groups * kh * kw)``).
        fan_in: entries per filter.
        convention: the formula for ``s``: a :class:`WSConvention` or a name in :data:`CONVENTIONS`.

    Returns:
        ``W_hat`` with the shape, dtype and memory format of ``weight``.

    Raises:
        ConfigError: an unknown convention, or ``paper`` with fewer than 2 entries per filter.
    """
    convention = as_convention(convention)
    _check_fan_in(fan_in, convention)
    return _standardize_impl(weight, fan_in, convention.unbiased, convention.eps_in_sqrt, convention.eps)


def standardize_weight_reference(weight: torch.Tensor, fan_in: int,
                                 convention: WSConvention | str = "timm") -> torch.Tensor:
    """The same function written naively with autograd; the tests compare against it."""
    convention = as_convention(convention)
    w = _as_filters(weight, fan_in)
    mean = w.mean(dim=1, keepdim=True)
    centered = w - mean
    denom = fan_in - 1 if convention.unbiased else fan_in
    var = (centered * centered).sum(dim=1, keepdim=True) / denom
    scale = torch.sqrt(var + convention.eps) if convention.eps_in_sqrt else torch.sqrt(var) + convention.eps
    return (centered / scale).reshape(weight.shape)


class WeightStandardization(nn.Module):
    """Parametrization ``W -> W_hat`` (mode ``ws``).

    Register it with ``torch.nn.utils.parametrize.register_parametrization(conv, "weight", p)``;
    ``remove_parametrizations(conv, "weight", leave_parametrized=True)`` folds it.

    Args:
        fan_in: entries per filter (``in/groups * kh * kw`` for a conv).
        convention: the formula for ``s`` (see :data:`CONVENTIONS`).
    """

    mode = "ws"

    def __init__(self, fan_in: int, convention: WSConvention | str = "timm"):
        super().__init__()
        self.fan_in = int(fan_in)
        self.convention = as_convention(convention)
        # Set by :func:`wsurgery.accumulate.standardize_once`: a leaf holding W_hat that
        # collects gradients across micro-batches. None in ordinary use.
        self._frozen: torch.Tensor | None = None
        # Set by :func:`wsurgery.accumulate.compile_standardization`: a torch.compile'd
        # ``_standardize_impl``. None: the eager kernels.
        self._kernel: Callable[..., torch.Tensor] | None = None

    def __getstate__(self) -> dict:
        # a copy made inside ``standardize_once`` (an EMA, a teacher) must not stay frozen at this W_hat
        state = dict(super().__getstate__())
        state["_frozen"] = None
        return state

    def _run(self, weight: torch.Tensor, gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None):
        c = self.convention
        _check_fan_in(self.fan_in, c)
        kernel = self._kernel or _standardize_impl
        return kernel(weight, self.fan_in, c.unbiased, c.eps_in_sqrt, c.eps, gamma, beta)

    def standardized(self, weight: torch.Tensor) -> torch.Tensor:
        return self._run(weight)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self._frozen is not None:
            return self._frozen
        return self.standardized(weight)

    def extra_repr(self) -> str:
        c = self.convention
        return f"fan_in={self.fan_in}, convention={c.name}, eps={c.eps:g}"


class AdaptiveWeightStandardization(WeightStandardization):
    """Parametrization ``V -> gamma * W_hat(V) + beta`` (mode ``aws``), per output channel.

    ``gamma`` and ``beta`` start at ``s`` and the mean of the pretrained filter, so the conv
    computes exactly what it did before conversion.

    Why ``gamma`` and ``beta`` are stored scaled: ``dL/dbeta`` sums the gradient over every
    entry of a filter (``n`` of them), and ``dL/dgamma`` sums ``g * W_hat``. Stored plainly,
    one SGD learning rate moves the filter mean ``n`` times faster than a plain conv would
    and training collapses. We store ``gain = gamma * sqrt(n)`` and ``shift = beta * sqrt(n)``
    and use ``gamma = gain / sqrt(n)``; then one SGD step moves the filter's mean and its
    scale exactly as far as the same step on a plain conv (to first order), while ``V`` moves
    the rest. Adaptive WS therefore trains like the plain model it came from.

    Args:
        fan_in: entries per filter.
        convention: the formula for ``s``.
        num_filters: output channels (times experts for a CondConv bank).
    """

    mode = "aws"

    def __init__(self, fan_in: int, convention: WSConvention | str, num_filters: int):
        super().__init__(fan_in, convention)
        self.num_filters = int(num_filters)
        self.coef = self.fan_in ** -0.5
        self.gain = nn.Parameter(torch.ones(self.num_filters))
        self.shift = nn.Parameter(torch.zeros(self.num_filters))

    @property
    def gamma(self) -> torch.Tensor:
        return self.gain * self.coef

    @property
    def beta(self) -> torch.Tensor:
        return self.shift * self.coef

    @torch.no_grad()
    def init_from_weight(self, weight: torch.Tensor) -> None:
        """Set ``gamma, beta`` to the ``s`` and mean of ``weight`` (so the output is unchanged)."""
        mean, scale = filter_stats(weight, self.fan_in, self.convention)
        self.gain.copy_(scale / self.coef)
        self.shift.copy_(mean / self.coef)

    def affine(self, w_hat: torch.Tensor) -> torch.Tensor:
        """``gamma * w_hat + beta`` per output filter."""
        return _affine(w_hat, self.fan_in, self.gamma, self.beta)

    def standardized(self, weight: torch.Tensor) -> torch.Tensor:
        # one fused kernel (batch norm with gamma/beta as its affine) where the convention allows
        return self._run(weight, self.gamma, self.beta)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_filters={self.num_filters}"
