"""Each token's active SAE latents, found once per encoder pass, as ``(values, indices)`` pairs.

A scale adapter only needs the latents that fire: ``(s * z) @ D`` and its gradients touch ``L0`` latents per token,
not ``d_sae``. How to find them without a second search over ``d_sae`` and without asking the GPU for a
data-dependent size (a host-device synchronisation) depends on the SAE architecture, so each architecture family
has one small selector class, registered by sae-lens's ``architecture()`` name:

==================  ==================================================================================
selector            how it finds the active set
==================  ==================================================================================
``TopKSelector``    the encoder's own top-k: pre-activations, ``topk(k)``, ReLU; the dense latents are
                    never built (``k`` is static, so nothing waits on the GPU). On CPUs with bfloat16
                    matrix instructions and for wide SAEs the search runs on a bfloat16 product and the
                    best ``k + 16`` candidates are rescored in float32 (:data:`SCREEN_CANDIDATES`)
``ThresholdSelector``  ReLU and JumpReLU: the pre-activations above each latent's threshold, compacted by one
                    kernel on CUDA (no dense latents); elsewhere the ``width`` largest entries of the encoder's
                    output; ``width`` a static bound on L0 measured once and widened when a token exceeds it
==================  ==================================================================================

TopK SAEs with ``rescale_acts_by_decoder_norm`` (each latent multiplied by its decoder row's norm ``n_i`` before the
top-k) are selected the same way on ``n * pre``; their latents' derivative is ``n_i W_enc[:, i]``, which the compact
backward gets from :meth:`LatentSelector.encoder_gain`. Gated SAEs have none: their latents' derivative is not an
encoder row, so the splice uses plain autograd over dense latents for them.

Example:
    >>> selector = selector_for(sae)  # doctest: +SKIP
    >>> values, indices = selector(hidden.reshape(-1, sae.cfg.d_in))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import ClassVar

import torch
from sae_lens import SAE, JumpReLUSAE, StandardSAE, TopKSAE

from . import kernels
from .components import active_dots

logger = logging.getLogger(__name__)

__all__ = ["SCREEN_CANDIDATES", "SCREEN_MIN_LATENTS_PER_CANDIDATE", "SELECTORS", "SPLIT_ENCODER_DEVICES",
           "LatentSelector", "ThresholdSelector", "TopKSelector", "bf16_screen_available", "selector_for",
           "split_bf16", "tf32_matmuls"]


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """Allow TF32 float32 matmuls on CUDA inside the block only (a host-side flag: no synchronisation).

    Example:
        >>> with tf32_matmuls(True):  # doctest: +SKIP
        ...     latents = sae.encode(hidden)
    """
    if not enabled:
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


SPLIT_ENCODER_DEVICES = {"cuda"}
"""Device types on which a float32 encoder reading bfloat16 hidden states runs as one bfloat16 matrix product against
the encoder split into three bfloat16 parts (:func:`split_bf16`), accumulated in float32 (``ISaeRFTConfig.
sae_split_encoder``, on by default). The parts hold all 24 bits of each weight and every product of bfloat16 values is
exact in float32, so only the accumulation differs from the float32 product: measured on an H200, the splice changes
by 0.6% (a float32 product summed in another order: 0.02%; TF32: 2.2%) and a trained adapter by 1.3%, against
0.8 to 1.0% between two float32 runs; the encoder pass is 3.9x faster. Elsewhere (CPUs have no bfloat16 x bfloat16 ->
float32 product) the float32 product."""


def split_bf16(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (float32) as three bfloat16 parts side by side, ``[hi | mid | lo]``, with ``hi + mid + lo == rows``
    to float32 precision: ``x @ rows.T == [x | x | x] @ split_bf16(rows).T`` for bfloat16 ``x``.

    Example:
        >>> rows = torch.randn(4, 3)
        >>> parts = split_bf16(rows).float()
        >>> bool(((parts[:, :3] + parts[:, 3:6] + parts[:, 6:]) - rows).abs().max() < 1e-6)
        True
    """
    high = rows.to(torch.bfloat16)
    rest = rows - high.float()
    middle = rest.to(torch.bfloat16)
    low = (rest - middle.float()).to(torch.bfloat16)
    return torch.cat([high, middle, low], dim=-1)


_MM_OUT_DTYPE: dict[str, bool] = {}


def _bf16_product_in_fp32(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ right`` of bfloat16 matrices, accumulated and returned in float32."""
    if left.is_cuda:
        return torch.mm(left, right, out_dtype=torch.float32)
    return left.float() @ right.float()  # exact emulation: bfloat16 products are exact in float32


def _fp32_output_supported(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    if device.type not in _MM_OUT_DTYPE:
        try:
            probe = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
            _MM_OUT_DTYPE[device.type] = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError) as error:
            logger.info("No bfloat16 x bfloat16 -> float32 product here (%s); the encoder stays float32.", error)
            _MM_OUT_DTYPE[device.type] = False
    return _MM_OUT_DTYPE[device.type]


SCREEN_MIN_LATENTS_PER_CANDIDATE = 200
"""The screen runs only for SAEs with at least this many latents per rescored candidate (``d_sae >= 200 * (k +
16)``): it saves part of an encoder product that grows with ``d_sae`` but pays a gather of ``k + 16`` encoder rows per
token that does not. Measured on 2 AVX512-BF16 cores (``benchmarks/screen_check.py``, selector time against the float32
search, 2048 tokens): 2.09x at 51 latents per candidate (d_sae 4096, k 64), 1.34x at 102, 0.99x at 192 (d_sae 9216,
k 32), 0.89x at 205 (d_sae 16384, k 64), 0.65x at 410."""

SCREEN_CANDIDATES = 16
"""Candidates beyond ``k`` that the bfloat16 screen of :class:`TopKSelector` rescores in float32. A latent of the
float32 top-k is lost only if the screen's rounding (relative 2^-8 per input) pushes it below ``k + 16`` others.
With 16, no token's set changed in 2048 tokens of the CPU benchmark (random SAE, k 64) and 4096 tokens of SmolLM2
text (the demo's SAE, k 32, attention-sink tokens included; ``benchmarks/screen_check.py``). A first measurement,
of the top-k of plain pre-activations, found 4 extra candidates already enough on these and on a second trained
SAE."""


@functools.cache
def bf16_screen_available() -> bool:
    """Whether this CPU multiplies bfloat16 matrices faster than float32 ones (AVX512-BF16 or AMX, through oneDNN):
    there the bfloat16 screen of :class:`TopKSelector` pays (2.5x faster encoder products on a 2-core AVX512-BF16
    CPU); elsewhere bfloat16 products are emulated and slower than float32, so the selector does not screen.

    Example:
        >>> isinstance(bf16_screen_available(), bool)
        True
    """
    capabilities = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return torch.backends.mkldnn.is_available() and any(
            getattr(torch.cpu, name, lambda: False)() for name in capabilities)
    except RuntimeError:  # pragma: no cover - a build without these probes
        return False


CHUNK_ELEMENTS = {"cpu": 1 << 23}
"""Largest ``tokens x d_sae`` block of pre-activations a selector builds at once, per device type (default
:data:`DEFAULT_CHUNK_ELEMENTS`): a 2-core CPU gains nothing from larger blocks, and the process's peak memory stays
within a few tens of MB of a bias adapter's."""
DEFAULT_CHUNK_ELEMENTS = 1 << 26


class LatentSelector:
    """Finds each token's active latents of one SAE; one subclass per family of encoder architectures.

    Every selector's latents are exact (equal to ``sae.encode``'s non-zeros) and have ``dz_i/dh = W_enc[:, i]``
    on active latents, which is what the compact backward (``components.SparseLatentScale``) relies on. Tokens are
    encoded in blocks (:data:`CHUNK_ELEMENTS`), so the dense pre-activations never exist for the whole batch at once.

    Example:
        >>> selector = selector_for(sae)  # doctest: +SKIP
        >>> values, indices = selector(hidden)  # each tokens x width  # doctest: +SKIP
    """

    encoder_classes: ClassVar[tuple[type[SAE], ...]] = ()
    """sae-lens classes whose own ``encode`` this selector reproduces (subclasses that override it are refused)."""
    rescales_by_decoder_norm: ClassVar[bool] = False
    """Whether it reproduces ``rescale_acts_by_decoder_norm`` too (latents times their decoder row's norm)."""

    def __init__(self, sae: SAE, tf32: bool = False, split: bool = True, screen: bool = True) -> None:
        self.sae = sae
        self.tf32 = tf32
        self.split = split
        """Use the split bfloat16 encoder product where it applies (:data:`SPLIT_ENCODER_DEVICES`)."""
        self.screen = screen
        """Search a TopK SAE's top-k on a bfloat16 product where that is faster (:func:`bf16_screen_available`)."""
        self._split: tuple[tuple[int, ...], torch.Tensor, torch.Tensor] | None = None
        self._gain: tuple[tuple[int, ...], torch.Tensor] | None = None

    @classmethod
    def accepts(cls, sae: SAE) -> bool:
        encode = type(sae).encode
        return (
            any(encode is klass.encode for klass in cls.encoder_classes)
            and (cls.rescales_by_decoder_norm or not getattr(sae.cfg, "rescale_acts_by_decoder_norm", False))
        )

    def encoder_gain(self) -> torch.Tensor | None:
        """Per latent, the factor sae-lens multiplies its pre-activation by before the activation function (the
        decoder row's norm, for ``rescale_acts_by_decoder_norm``), or None where there is none: the derivative of an
        active latent is ``gain_i * W_enc[:, i]``. Computed once per decoder version."""
        sae = self.sae
        if not getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
            return None
        key = (sae.W_dec.data_ptr(), sae.W_dec._version)
        if self._gain is None or self._gain[0] != key:
            with torch.no_grad():
                self._gain = (key, sae.W_dec.detach().norm(dim=-1))
        return self._gain[1]

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)`` of ``hidden``'s (``tokens x d_in``) active latents, each ``tokens x width``;
        padding slots hold value 0."""
        budget = CHUNK_ELEMENTS.get(hidden.device.type, DEFAULT_CHUNK_ELEMENTS)
        step = max(1, budget // self.sae.cfg.d_sae)
        if hidden.shape[0] <= step:
            return self.select(hidden)
        parts = [self.select(hidden[start:start + step]) for start in range(0, hidden.shape[0], step)]
        width = max(values.shape[-1] for values, _ in parts)
        values = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[-1])) for v, _ in parts])
        indices = torch.cat([torch.nn.functional.pad(i, (0, width - i.shape[-1])) for _, i in parts])
        return values, indices

    def select(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The active latents of one block of tokens."""
        raise NotImplementedError

    def pre_activations(self, hidden: torch.Tensor) -> torch.Tensor:
        """The encoder's pre-activations, through sae-lens's own input processing and hook (bias fused into the
        matrix product); for bfloat16 hidden states on :data:`SPLIT_ENCODER_DEVICES`, one bfloat16 product against
        the split encoder instead (the same float32 numbers, several times faster)."""
        sae = self.sae
        split = self._split_encoder(hidden)
        if split is not None:
            weight, bias = split
            stacked = torch.cat([hidden, hidden, hidden], dim=-1)
            return sae.hook_sae_acts_pre(_bf16_product_in_fp32(stacked, weight.T).add_(bias))
        with tf32_matmuls(self.tf32):
            return sae.hook_sae_acts_pre(torch.addmm(sae.b_enc, sae.process_sae_in(hidden), sae.W_enc))

    def _split_encoder(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The split encoder rows and the bias, where the split product applies (else None); built once per encoder
        version and kept (1.5x the encoder's float32 bytes)."""
        sae = self.sae
        if (not self.split or hidden.dtype != torch.bfloat16 or hidden.device.type not in SPLIT_ENCODER_DEVICES
                or self.tf32
                or sae.W_enc.dtype != torch.float32 or getattr(sae, "hook_z_reshaping_mode", False)
                or getattr(sae.cfg, "normalize_activations", "none") not in ("none", None)
                or not _fp32_output_supported(hidden.device)):
            return None
        key = (sae.W_enc.data_ptr(), sae.W_enc._version, sae.b_enc._version, sae.b_dec._version)
        if self._split is None or self._split[0] != key:
            with torch.no_grad():
                rows = sae.W_enc.detach().T
                bias = sae.b_enc.detach().float()
                if sae.cfg.apply_b_dec_to_input:  # (x - b_dec) @ W = x @ W - b_dec @ W
                    bias = bias - sae.b_dec.detach().float() @ sae.W_enc.detach()
                self._split = (key, split_bf16(rows), bias)
        return self._split[1], self._split[2]


class TopKSelector(LatentSelector):
    """TopK SAEs: the indices of the encoder's own top-k, without scattering them into dense latents.

    On a CPU with bfloat16 matrix instructions (:func:`bf16_screen_available`), for SAEs wide enough for it to pay
    (:data:`SCREEN_MIN_LATENTS_PER_CANDIDATE`), the top-k is searched in a bfloat16
    product of the encoder (2.5x faster than float32 there) and its best ``k +`` :data:`SCREEN_CANDIDATES` entries
    are rescored in float32 from the encoder rows: the values are the float32 pre-activations, and the set is the
    float32 top-k's wherever the screen's rounding does not push a latent below ``k + 16`` others (in every token
    measured). ``screen=False`` (``ISaeRFTConfig.sae_bf16_screen``) searches the float32 product.

    Example:
        >>> values, indices = TopKSelector(topk_sae)(hidden)  # tokens x k each  # doctest: +SKIP
    """

    encoder_classes = (TopKSAE,)
    rescales_by_decoder_norm = True

    def __init__(self, sae: SAE, tf32: bool = False, split: bool = True, screen: bool = True) -> None:
        super().__init__(sae, tf32, split, screen)
        self._screen: tuple[tuple[int, ...], torch.Tensor, torch.Tensor] | None = None

    def select(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.sae.cfg.k
        gain = self.encoder_gain()
        screen = self._screen_encoder(hidden)
        if screen is None:
            pre = self.pre_activations(hidden)
            values, indices = (pre if gain is None else pre.mul_(gain)).topk(k, dim=-1, sorted=False)
            return values.relu_(), indices
        weight, bias = screen
        sae_in = self.sae.process_sae_in(hidden)
        width = min(self.sae.cfg.d_sae, k + SCREEN_CANDIDATES)
        approximate = torch.addmm(bias, sae_in.to(torch.bfloat16), weight)
        if gain is not None:
            approximate.mul_(gain.to(torch.bfloat16))
        candidates = approximate.topk(width, dim=-1, sorted=False).indices
        exact = active_dots(sae_in, candidates, self.sae.W_enc.detach().T).add_(self.sae.b_enc.detach()[candidates])
        if gain is not None:
            exact.mul_(gain[candidates])
        values, position = exact.topk(k, dim=-1, sorted=False)
        return values.relu_(), candidates.gather(1, position)

    def _screen_encoder(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The bfloat16 encoder and bias for the screen, where it applies (else None); made once per encoder
        version and kept (half the encoder's float32 bytes)."""
        sae = self.sae
        if (not self.screen or hidden.device.type != "cpu" or sae.W_enc.dtype != torch.float32
                or sae.cfg.d_sae < SCREEN_MIN_LATENTS_PER_CANDIDATE * (sae.cfg.k + SCREEN_CANDIDATES)
                or sae.hook_sae_acts_pre._forward_hooks or not bf16_screen_available()
                or self._split_encoder(hidden) is not None):  # the split product is float32 already
            return None
        key = (sae.W_enc.data_ptr(), sae.W_enc._version, sae.b_enc._version)
        if self._screen is None or self._screen[0] != key:
            with torch.no_grad():
                self._screen = (key, sae.W_enc.detach().to(torch.bfloat16, memory_format=torch.contiguous_format),
                                sae.b_enc.detach().to(torch.bfloat16))
        return self._screen[1], self._screen[2]


class ThresholdSelector(LatentSelector):
    """ReLU and JumpReLU SAEs: a latent is active where its pre-activation exceeds its threshold (0 for ReLU).

    On a CUDA GPU with Triton, one kernel reads the pre-activations and writes the active ones compactly
    (:func:`peft_isaerft.kernels.threshold_compact`): the dense latents are never built. Elsewhere the encoder's dense
    output is built and its ``width`` largest entries kept.

    ``width`` is a static bound on the number of active latents per token, so finding them never waits on the
    GPU. It is measured on the first block (the largest L0 seen, with headroom). A token may have more active latents
    than ``width``: on a CPU the block is redone at once with the exact width; on a GPU the count is read one call
    later, without waiting, and the width is doubled with a warning naming the count, since finding the exact width
    would synchronise every step.

    Example:
        >>> selector = ThresholdSelector(jumprelu_sae)  # doctest: +SKIP
        >>> values, indices = selector(hidden)  # doctest: +SKIP
        >>> selector.width  # the static bound, measured on the first call  # doctest: +SKIP
    """

    encoder_classes = (StandardSAE, JumpReLUSAE)
    headroom = 1.5
    granule = 32

    def __init__(self, sae: SAE, tf32: bool = False, split: bool = True, screen: bool = True) -> None:
        super().__init__(sae, tf32, split, screen)
        self.width: int | None = None
        self._pending: list[tuple[torch.Tensor, torch.cuda.Event | None, int]] = []
        self._host: torch.Tensor | None = None  # a ring of pinned slots the GPU writes its counts into
        self._slot = 0

    def _bounded(self, active: int) -> int:
        granules = -(-int(active * self.headroom) // self.granule)
        return max(1, min(self.sae.cfg.d_sae, max(granules, 1) * self.granule))

    def threshold(self) -> torch.Tensor:
        """Per latent, the value its pre-activation must exceed (JumpReLU's threshold and ReLU's 0, whichever is
        larger)."""
        threshold = getattr(self.sae, "threshold", None)
        if threshold is None:
            return torch.zeros_like(self.sae.b_enc)
        return threshold.detach().clamp_min(0)

    def select(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if kernels.usable(hidden):
            return self._select_compact(hidden)
        with tf32_matmuls(self.tf32):
            latents = self.sae.encode(hidden)
        self._read_pending()
        if self.width is None:  # one synchronisation, on the first block only
            self.width = self._bounded(int((latents != 0).sum(-1).max()))
        values, indices = latents.topk(self.width, dim=-1, sorted=False)
        if self.width >= latents.shape[-1]:
            return values, indices
        saturated = (values.amin(-1) > 0).sum()
        if latents.device.type == "cpu":  # reading it costs nothing here: stay exact
            if int(saturated):
                self.width = self._bounded(int((latents != 0).sum(-1).max()))
                values, indices = latents.topk(self.width, dim=-1, sorted=False)
        else:
            self._watch(saturated)
        return values, indices

    def _select_compact(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = self.pre_activations(hidden)
        threshold = self.threshold()
        self._read_pending()
        if self.width is None:  # one synchronisation, on the first block only
            self.width = self._bounded(int((pre > threshold).sum(-1).max()))
        values, indices, counts = kernels.threshold_compact(pre, threshold, self.width)
        self._watch((counts > self.width).sum())
        return values, indices

    def _watch(self, saturated: torch.Tensor) -> None:
        if self._host is None:
            self._host = torch.zeros(256, dtype=saturated.dtype, pin_memory=torch.cuda.is_available())
        host = self._host[self._slot % self._host.numel()]
        self._slot += 1
        host.copy_(saturated, non_blocking=True)
        event = torch.cuda.Event() if saturated.is_cuda else None
        if event is not None:
            event.record()
        self._pending.append((host, event, self.width or 0))

    def _read_pending(self) -> None:
        while self._pending and (self._pending[0][1] is None or self._pending[0][1].query()):
            host, _event, width = self._pending.pop(0)
            count = int(host)
            if count and self.width is not None and self.width <= width:
                self.width = min(self.sae.cfg.d_sae, 2 * width)
                logger.warning(
                    "%d token(s) of an earlier batch had %d or more active latents in SAE %s, the bound the splice "
                    "keeps; their smallest activations beyond it were not scaled in that batch. The bound is now %d.",
                    count, width, getattr(self.sae.cfg.metadata, "hook_name", "?"), self.width,
                )


SELECTORS: dict[str, type[LatentSelector]] = {
    "topk": TopKSelector,
    "standard": ThresholdSelector,
    "jumprelu": ThresholdSelector,
}
"""sae-lens ``architecture()`` name -> the selector for it; architectures not listed use dense autograd."""


def selector_for(sae: SAE, tf32: bool = False, split: bool = True, screen: bool = True) -> LatentSelector | None:
    """The active-latent selector for ``sae``, or None where the splice must use dense autograd.

    Example:
        >>> type(selector_for(topk_sae)).__name__  # doctest: +SKIP
        'TopKSelector'
    """
    selector = SELECTORS.get(sae.cfg.architecture())
    return selector(sae, tf32, split, screen) if selector is not None and selector.accepts(sae) else None
