"""Triton kernels for the compact scale splice on CUDA GPUs.

The splice's sparse work is two operations over each token's active latents ``(values, indices)``:

* :func:`weighted_row_sum`: ``out[t] = sum_j w[t, j] * rows[i[t, j]]`` (the decode of ``s * z`` in the forward pass
  and the input gradient through the encoder rows in the backward pass);
* :func:`active_dots`: ``out[t, j] = grad[t] . rows[i[t, j]]`` (the gradient of each active latent).

PyTorch has the first as ``embedding_bag`` and the second only as a gather of rows followed by a batched product;
both read every slot of the ``width`` a selector keeps, padding included, and the gather writes the gathered rows to
memory first. These kernels read each active row once, skip padding slots (weight or value 0) without touching
memory, and accumulate in float32 whatever the SAE's dtype. They run where Triton is installed and the tensors are
on a CUDA device; everywhere else :mod:`peft_isaerft.components` uses the PyTorch operations. ``ENABLED = False``
turns them off. The tests run them on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1`` before Triton
is imported, and ``ON_CPU = True``).
"""

from __future__ import annotations

import functools

import torch

ENABLED = True
"""Use the Triton kernels where they can run (CUDA tensors, Triton installed)."""
ON_CPU = False
"""Also run them on CPU tensors: only meaningful under Triton's interpreter, for tests."""


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def usable(tensor: torch.Tensor) -> bool:
    """Whether the kernels run for ``tensor``: enabled, Triton present, and a CUDA tensor."""
    return ENABLED and (tensor.is_cuda or ON_CPU) and _triton_available()


@functools.cache
def _kernels():  # compiled lazily: importing this module must not need Triton
    # `width` (the selector's static bound) and `d` (the SAE's d_in) are compile-time constants: they change rarely,
    # and constant loop bounds let Triton unroll the loops
    import triton
    import triton.language as tl

    @triton.jit
    def weighted_row_sum_kernel(idx_ptr, w_ptr, rows_ptr, out_ptr, stride_row, width: tl.constexpr,
                                d: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
        token = tl.program_id(0)
        columns = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        column_mask = columns < d
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, width, BLOCK_J):
            slots = start + tl.arange(0, BLOCK_J)
            slot_mask = slots < width
            weights = tl.load(w_ptr + token * width + slots, mask=slot_mask, other=0.0).to(tl.float32)
            live = slot_mask & (weights != 0)
            if tl.max(live.to(tl.int32), axis=0) > 0:  # blocks of padding slots cost one small load
                rows = tl.load(idx_ptr + token * width + slots, mask=live, other=0)
                tile = tl.load(rows_ptr + rows[:, None] * stride_row + columns[None, :],
                               mask=live[:, None] & column_mask[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(tile * weights[:, None], axis=0)
        tl.store(out_ptr + token * d + columns, acc.to(out_ptr.dtype.element_ty), mask=column_mask)

    @triton.jit
    def active_dots_kernel(grad_ptr, idx_ptr, val_ptr, rows_ptr, out_ptr, stride_row, width: tl.constexpr,
                           d: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
        token = tl.program_id(0)
        slots = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        slot_mask = slots < width
        values = tl.load(val_ptr + token * width + slots, mask=slot_mask, other=0.0)
        live = slot_mask & (values != 0)
        rows = tl.load(idx_ptr + token * width + slots, mask=live, other=0)
        acc = tl.zeros([BLOCK_J], dtype=tl.float32)
        if tl.max(live.to(tl.int32), axis=0) > 0:  # a block of padding slots reads nothing more
            for start in range(0, d, BLOCK_D):
                columns = start + tl.arange(0, BLOCK_D)
                column_mask = columns < d
                grad = tl.load(grad_ptr + token * d + columns, mask=column_mask, other=0.0).to(tl.float32)
                tile = tl.load(rows_ptr + rows[:, None] * stride_row + columns[None, :],
                               mask=live[:, None] & column_mask[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(tile * grad[None, :], axis=1)
        tl.store(out_ptr + token * width + slots, acc.to(out_ptr.dtype.element_ty), mask=slot_mask)

    @triton.jit
    def threshold_compact_kernel(pre_ptr, threshold_ptr, val_ptr, idx_ptr, count_ptr, d_sae: tl.constexpr,
                                 width: tl.constexpr, BLOCK: tl.constexpr):
        token = tl.program_id(0)
        found = tl.zeros([], dtype=tl.int32)
        for start in range(0, d_sae, BLOCK):
            columns = start + tl.arange(0, BLOCK)
            column_mask = columns < d_sae
            pre = tl.load(pre_ptr + token * d_sae + columns, mask=column_mask, other=0.0)
            threshold = tl.load(threshold_ptr + columns, mask=column_mask, other=0.0)
            live = column_mask & (pre > threshold)
            slots = found + tl.cumsum(live.to(tl.int32), axis=0) - 1
            keep = live & (slots < width)
            tl.store(val_ptr + token * width + slots, pre, mask=keep)
            tl.store(idx_ptr + token * width + slots, columns.to(tl.int64), mask=keep)
            found += tl.sum(live.to(tl.int32), axis=0)
        tl.store(count_ptr + token, found)

    return weighted_row_sum_kernel, active_dots_kernel, threshold_compact_kernel


def weighted_row_sum(indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * rows[indices[t, j]]`` (``tokens x d``, in ``rows``' dtype); slots of weight 0
    are skipped."""
    kernel, _, _ = _kernels()
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    tokens, width = indices.shape
    d = rows.shape[-1]
    out = torch.empty(tokens, d, dtype=rows.dtype, device=rows.device)
    if tokens == 0:
        return out
    block_d = 256
    kernel[(tokens, -(-d // block_d))](indices.contiguous(), weights.contiguous(), rows, out, rows.stride(0),
                                       width=width, d=d, BLOCK_J=16, BLOCK_D=block_d)
    return out


def active_dots(grad: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[t, j] = grad[t] . rows[indices[t, j]]`` (``tokens x width``, in ``grad``'s dtype), 0 where
    ``values[t, j] == 0`` (padding slots are never read)."""
    _, kernel, _ = _kernels()
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    tokens, width = indices.shape
    d = rows.shape[-1]
    out = torch.empty(tokens, width, dtype=grad.dtype, device=grad.device)
    if tokens == 0:
        return out
    block_j = 16
    kernel[(tokens, -(-width // block_j))](grad.contiguous(), indices.contiguous(), values.contiguous(), rows, out,
                                           rows.stride(0), width=width, d=d, BLOCK_J=block_j, BLOCK_D=256)
    return out


def threshold_compact(pre: torch.Tensor, threshold: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                        torch.Tensor]:
    """The entries of ``pre`` (``tokens x d_sae``) above ``threshold`` (``d_sae``, >= 0), written compactly: returns
    ``values`` and ``indices`` (``tokens x width``, in column order, padded with value 0) and each token's count of live
    entries, which exceeds ``width`` where some were left out. One read of ``pre``; no dense output."""
    _, _, kernel = _kernels()
    tokens, d_sae = pre.shape
    values = torch.zeros(tokens, width, dtype=pre.dtype, device=pre.device)
    # padding slots point at distinct latents (their values are 0): scattering their zero gradients into one latent
    # would serialise millions of atomic adds on one address
    indices = torch.arange(width, device=pre.device).remainder_(d_sae).expand(tokens, width).contiguous()
    counts = torch.empty(tokens, dtype=torch.int32, device=pre.device)
    if tokens:
        kernel[(tokens,)](pre.contiguous(), threshold.contiguous(), values, indices, counts, d_sae=d_sae,
                          width=width, BLOCK=1024)
    return values, indices, counts
