"""Pallas (Triton backend) kernels of the chunked PRISM recurrence on GPU.

Arrays keep the caller's layout ([B, T, H, ...]); a BlockSpec with squeezed batch and head axes
gives each program one head's rows. All kernels take T a multiple of the chunk C and K, V
powers of two ≥ 16 (the public wrapper pads). Eight kernels, as in the chunked Gated DeltaNet:

  inverse        (B·H, N): (I + A)⁻¹ of every chunk in 16 × 16 blocks, float32 products
  apply_inverse  (B·H, N, V/BV): U = (I + A)⁻¹ R; Wk = (I + A)⁻¹ Bk in value block 0
  state_forward  (B, H, V/BV): sequential over chunks, state [K, BV] float32 in registers;
                 saves the state entering every chunk and the new values X = U − Wk S
  output         (B·H, N, V/BV): O from Q, the saved state and X
  local_dy       (B·H, N, V/BV): P^lᵀ dO of every write (dY^l less its state term)
  state_backward (B, H, V/BV): reverse pass for the state cotangents; saves the cotangent of
                 the state leaving every chunk and dX, returns dS₀
  state_grads    (B·H, N, K/BK): dQ, the output/state terms of dK^l, dX Sᵀ (value blocks
                 summed inside)
  wy_grads       (B·H, N): the cotangents through (I + A)⁻¹ (columns in blocks inside)

`inverse`, `apply_inverse`, `state_forward`, `output` make the forward; `local_dy`,
`state_backward`, `state_grads`, `wy_grads` the backward (gpu/prism.py chains them under one
custom_vjp, each stage on this Triton kernel or its Mosaic GPU version in gpu/mosaic.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from prism_jax.ops import chunk_math as cm


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the GPU kernels. chunk: positions per chunk (C); block_v: value columns per
  step of the gradient kernels' loops over value blocks; chunk_block_v: value columns per
  program of the chunk-parallel kernels (apply_inverse, output, local_dy; on the H200, B4 T4096
  H16 K=V=128: 128 columns 0.11 / 0.14 / 0.10 ms against 0.13 / 0.16 / 0.15 with 64);
  block_k: key columns per program of the state-side gradient kernel; num_warps /
  num_stages: Triton launch parameters (num_stages pipelines the loads of the loops over chunks
  and over column blocks); seq_num_warps: warps of the two sequential passes over chunks;
  grads_num_warps: warps of the two gradient kernels;
  inverse_num_warps: warps of the (I + A)⁻¹ kernel; seq_block_v: value columns per program of
  the two passes over chunks, halved (and run with seq_narrow_warps) when fewer than
  seq_min_programs programs would share the GPU (`seq_tiling`); kernel_warps: ((kernel name,
  warps), ...) overriding the above (tuning runs); kernel_stages: the same for num_stages
  (`fitted` sets it); mosaic: stages to run on the Mosaic GPU versions of gpu/mosaic.py where
  those take the shapes (a pass over chunks at 32-column blocks, where `seq_tiling` narrows
  them, only with mosaic_narrow): every stage but apply_inverse, each measured at least as
  fast as its Triton kernel on the H200 (2026-12-05, ms, Mosaic against Triton, B4 T4096 H16
  K=V=128 L = 1: state_grads 0.454 / 0.552 (L = 2: 0.641 / 1.280), wy_grads 0.261 / 0.389,
  output 0.112 / 0.138, state_forward 0.149 / 0.161, state_backward 0.218 / 0.227, local_dy
  0.100 / 0.101; at B1 T16384 with 32-column passes state_backward 0.487 / 0.521 and
  state_forward 0.323 / 0.325) or, the later ones, on an H100 (B4 T4096: wy_further_grads
  0.351 / 0.677 at L = 2 and 1.146 / 2.071 at L = 3, state_grads at L = 3 1.147 / 2.457);
  apply_inverse stays on Triton (0.152 against 0.114).
  wy_pass: at L = 1, where the state pass runs on Mosaic GPU at full width, it forms U and Wk
  itself (`mosaic.wy_state_forward`) in place of apply_inverse: 0.223 ms with the backward's U
  and Wk stored, 0.172 without, against 0.263 for apply_inverse then the state pass (H200); its
  compiled test (`test_compiled_mosaic_stages_match_naive[L1-wy-pass]`) passed on an H100.
  further_num_warps: warps of the Triton `wy_further_grads`, the WY-side gradients of the
  writes after the first (L ≥ 2, where its Mosaic version does not run; H100, B4 T4096 H16
  K=V=128: 8 warps 0.686 / 2.108 ms at L = 2 / 3 against 0.907 / 2.537 with 4, where it spills
  more registers).
  inverse_diag: how the inverse kernel inverts its diagonal 16 × 16 blocks, "rows" (forward
  substitution, elementwise) or "doubling" (`cm.unit_lower_inverse`); inverse_block_k: key
  columns per step of its K¹K¹ᵀ products (0: the whole key width at once; 64 columns took
  0.134 ms against 0.151, 32 columns 0.145, at 2 warps; 1 and 4 warps were slower at every
  width). The defaults are the fastest measured on the H200 (RESULTS.md)."""
  chunk: int = 64
  block_v: int = 64
  num_warps: int = 4
  num_stages: int = 3
  block_k: int = 64
  grads_num_warps: int = 4
  seq_block_v: int = 64
  seq_num_warps: int = 8
  inverse_num_warps: int = 2
  seq_min_programs: int = 100
  seq_narrow_warps: int = 4
  chunk_block_v: int = 128
  kernel_warps: tuple = ()
  kernel_stages: tuple = ()
  mosaic: tuple = ("state_forward", "output", "local_dy", "state_backward", "state_grads",
                   "wy_grads", "wy_further_grads")
  mosaic_narrow: bool = True
  wy_pass: bool = True
  inverse_diag: str = "rows"
  inverse_block_k: int = 64
  further_num_warps: int = 8

  FIELDS = ("block_v", "num_warps", "num_stages", "block_k", "grads_num_warps", "seq_block_v",
            "seq_num_warps", "inverse_num_warps", "seq_min_programs", "seq_narrow_warps",
            "chunk_block_v", "inverse_block_k", "further_num_warps")

  @classmethod
  def parse(cls, spec: str, chunk: int = 64) -> "BlockSizes":
    """From "block_v,num_warps,num_stages[,block_k[,...]]", the integer fields in the order of
    FIELDS (omitted fields keep their defaults)."""
    try:
      fields = [int(x) for x in spec.split(",")]
      if not 3 <= len(fields) <= len(cls.FIELDS):
        raise ValueError
    except ValueError as err:
      raise ValueError(f'GPU tiling must be 3 to {len(cls.FIELDS)} integers '
                       f'"{",".join(cls.FIELDS)}", got {spec!r}') from err
    return cls(chunk=chunk, **dict(zip(cls.FIELDS, fields)))

  def fitted(self, dtype, L: int) -> "BlockSizes":
    """These sizes with two pipeline stages wherever three were not shown to fit Hopper's
    227 KB of shared memory per block (`benchmarks/kernels.py --compile-check`): every kernel
    with float32 inputs, and the state pass at L ≥ 3 (bf16, K = V = 128: 288 KB at L = 3)."""
    if self.num_stages <= 2:
      return self
    if jnp.dtype(dtype) == jnp.float32:
      return dataclasses.replace(self, num_stages=2)
    if L >= 3:
      return dataclasses.replace(self, kernel_stages=(("prism_state_forward", 2),)
                                 + self.kernel_stages)
    return self

  def __post_init__(self):
    if self.inverse_diag not in ("doubling", "rows"):
      raise ValueError(f'BlockSizes.inverse_diag must be "doubling" or "rows", '
                       f"got {self.inverse_diag!r}")
    for name in ("chunk", "block_v", "block_k", "seq_block_v", "chunk_block_v",
                 "inverse_block_k"):
      n = getattr(self, name)
      if name == "inverse_block_k" and n == 0:
        continue
      if n < 16 or n & (n - 1):
        raise ValueError(f"BlockSizes.{name} must be a power of two >= 16, got {n}")


# The BlockSizes field that sets each kernel's warps (num_warps for the others).
WARPS_FIELD = {"prism_state_forward": "seq_num_warps", "prism_state_backward": "seq_num_warps",
               "prism_state_grads": "grads_num_warps", "prism_wy_grads": "grads_num_warps",
               "prism_wy_further_grads": "further_num_warps", "prism_inverse": "inverse_num_warps"}


def warps(bs: BlockSizes, name: str) -> int:
  return dict(bs.kernel_warps).get(name, getattr(bs, WARPS_FIELD.get(name, "num_warps")))


def _launch(name: str, bs: BlockSizes, interpret: bool) -> dict:
  """pallas_call keywords of kernel `name`: its Triton launch parameters and the name."""
  params = plgpu.CompilerParams(num_warps=warps(bs, name),
                                num_stages=dict(bs.kernel_stages).get(name, bs.num_stages))
  return dict(compiler_params=params, interpret=interpret, name=name)


def _col(x):
  return x.astype(jnp.float32)[:, None]


def _gates(G_ref, seq_ref, prev_ref, sl=slice(None)):
  G = G_ref[sl].astype(jnp.float32)
  seq = seq_ref[sl]
  return cm.chunk_gates(G[:, None], G[None, :], seq[:, None], seq[None, :], prev_ref[sl][:, None])


def _pass_gates(gamma_ref, to_end_ref, n, C):
  """γ, e and γ_C of chunk n for the passes over chunks, loaded from `pass_gates`' arrays (no
  reduction on the serial chain); the C × C decay and masks are None."""
  gamma = gamma_ref[pl.ds(n * C, C)][:, None]
  gamma_last = gamma_ref[pl.ds(n * C + C - 1, 1)][:, None]
  return cm.ChunkGates(None, None, None, gamma, to_end_ref[pl.ds(n * C, C)][:, None],
                       gamma_last, None)


def pass_gates(G, seq, prev, C):
  """γ_i (the incoming state's decay at i, 0 after a sequence start in the chunk) and
  e_i = exp(G_C − G_i) (0 outside the chunk's last sequence), [B, T, H] float32: `cm.end_gates`
  on whole arrays, in XLA, for the two passes over chunks."""
  B, T, H = G.shape
  chunks = lambda x: x.reshape(B, T // C, C, -1)
  gamma, to_end, _, _ = cm.end_gates(chunks(G), chunks(seq), chunks(prev))
  return gamma.reshape(B, T, H), to_end.reshape(B, T, H)


# Kernel bodies.

SUB = 16  # rows of the sub-blocks the prepare kernel solves in (Triton's smallest dot)


def _inverse_kernel(k1_ref, beta1_ref, G_ref, seq_ref, inv_ref, *, precision, solve, diag,
                    block_k):
  """(I + A)⁻¹ of one chunk, in SUB × SUB blocks.

  A whole C × C inverse by block doubling spends log₂ C levels of C³ products on blocks that
  are mostly zero; here the diagonal blocks are inverted alone (`cm.unit_lower_inverse` on
  SUB × SUB) and the others follow by block forward substitution,
  X_ij = −X_ii Σ_{j≤m<i} A_im X_mj, every product SUB × SUB × SUB. The key products K¹K¹ᵀ
  are summed over key columns in blocks of block_k (all at once when it is the key width), so
  only one block of keys is live at a time.
  """
  n = G_ref.shape[0] // SUB
  K = k1_ref.shape[-1]
  rows = lambda i: pl.ds(i * SUB, SUB)
  f32 = lambda ref, i: ref[rows(i)].astype(jnp.float32)
  pairs = [(i, j) for i in range(n) for j in range(i + 1)]

  def key_products(c, acc):  # K¹K¹ᵀ blocks of key columns c: input dtype, exact bf16 products
    k = [k1_ref[rows(i), pl.ds(c * block_k, block_k)] for i in range(n)]
    return tuple(s + cm.mm(k[i], k[j], precision, tb=True) for s, (i, j) in zip(acc, pairs))

  zeros = tuple(jnp.zeros((SUB, SUB), jnp.float32) for _ in pairs)
  kk = (key_products(0, zeros) if block_k >= K
        else jax.lax.fori_loop(0, K // block_k, key_products, zeros))
  G = [f32(G_ref, i) for i in range(n)]
  seq = [f32(seq_ref, i) for i in range(n)]
  below = (jax.lax.broadcasted_iota(jnp.int32, (SUB, SUB), 0)
           > jax.lax.broadcasted_iota(jnp.int32, (SUB, SUB), 1))
  b1 = [f32(beta1_ref, i)[:, None] for i in range(n)]

  def a(i, j, kk_ij):
    """Block (i, j) of A = strict(β¹ K¹K¹ᵀ ⊙ D)."""
    mask = seq[i][:, None] == seq[j][None, :]
    if i == j:
      mask = mask & below
    decay = jnp.exp(jnp.where(mask, G[i][:, None] - G[j][None, :], -jnp.inf))
    return b1[i] * kk_ij * decay

  blocks = {(i, j): a(i, j, s) for s, (i, j) in zip(kk, pairs)}
  inv = {}
  for i in range(n):
    inv[i, i] = (cm.unit_lower_inverse_rows(blocks[i, i]) if diag == "rows"
                 else cm.unit_lower_inverse(blocks[i, i], solve))
    for j in range(i - 1, -1, -1):
      acc = sum(cm.mm(blocks[i, m], inv[m, j], solve) for m in range(j, i))
      inv[i, j] = -cm.mm(inv[i, i], acc, solve)
  zero = jnp.zeros((SUB, SUB), jnp.float32)
  for i in range(n):
    for j in range(n):
      inv_ref[rows(i), pl.ds(j * SUB, SUB)] = (inv[i, j] if j <= i else zero).astype(
          inv_ref.dtype)


def _apply_kernel(*refs, L, precision, solve):
  """U = (I + A)⁻¹ R of one chunk and value block; Wk = (I + A)⁻¹ Bk in value block 0."""
  k_refs, v_refs, beta_refs, (G_ref, seq_ref, prev_ref, inv_ref, u_ref, wk_ref) = (
      cm.split_refs(refs, (L, L, L, 6)))
  gates = _gates(G_ref, seq_ref, prev_ref)
  b1 = _col(beta_refs[0][...])
  # Keys in the input dtype (K K^lᵀ stays a bf16 product for bf16); at L = 1 R does not read
  # them, so only the program that forms Wk loads K¹.
  k = [r[...] for r in k_refs] if L > 1 else [None]
  w = [_col(b[...]) * r[...].astype(jnp.float32) for b, r in zip(beta_refs, v_refs)]
  inv = inv_ref[...]
  u_ref[...] = cm.mm(inv, cm.value_right_hand_side(k, w, b1, gates, precision), solve)

  @pl.when(pl.program_id(2) == 0)  # Wk does not depend on the value block
  def _():
    bk = cm.key_right_hand_side(k_refs[0][...], b1, gates)
    wk_ref[...] = cm.mm(inv, bk, solve).astype(wk_ref.dtype)


def _state_forward_kernel(*refs, L, C, precision):
  (k_refs, v_refs, beta_refs,
   (gamma_ref, to_end_ref, u_ref, wk_ref, h0_ref, h_ref, x_ref, hT_ref)) = cm.split_refs(
       refs, (L, L, L, 8))
  K = k_refs[0].shape[-1]
  N = u_ref.shape[0] // C

  def body(n, state):
    sl = pl.ds(n * C, C)
    gates = _pass_gates(gamma_ref, to_end_ref, n, C)
    k = [r[sl, :] for r in k_refs]
    w = [None] + [_col(b[sl]) * r[sl, :].astype(jnp.float32)  # W¹ is not read: X takes its place
                  for b, r in zip(beta_refs[1:], v_refs[1:])]
    h_ref[pl.ds(n * K, K), :] = state.astype(h_ref.dtype)
    x = u_ref[sl, :] - cm.mm(wk_ref[sl, :], state, precision)
    x_ref[sl, :] = x.astype(x_ref.dtype)
    return cm.next_state(state, x, k, w, gates, precision)

  hT_ref[...] = jax.lax.fori_loop(0, N, body, h0_ref[...])


def _output_kernel(*refs, L, scale, precision):
  ((q_ref,), k_refs, v_refs, beta_refs,
   (G_ref, seq_ref, prev_ref, x_ref, h_ref, o_ref)) = cm.split_refs(refs, (1, L, L, L, 6))
  gates = _gates(G_ref, seq_ref, prev_ref)
  k = [r[...] for r in k_refs]  # input dtype: K K^lᵀ and Q K^lᵀ stay bf16 products for bf16
  w = [None] + [_col(b[...]) * r[...].astype(jnp.float32)  # Y¹ = X: W¹ is not read
                for b, r in zip(beta_refs[1:], v_refs[1:])]
  # O is linear in Q: scaling the result, not q, keeps q exact as a bf16 operand.
  o = cm.chunk_output(q_ref[...], h_ref[...], x_ref[...], k, w, gates, precision)
  o_ref[...] = (o * scale).astype(o_ref.dtype)


def _local_dy_kernel(*refs, L, scale, precision):
  """P^lᵀ dO of one chunk and value block for every write l (dY^l less its state term)."""
  ((q_ref,), k_refs, (G_ref, seq_ref, prev_ref, do_ref), out_refs) = cm.split_refs(
      refs, (1, L, 4, L))
  gates = _gates(G_ref, seq_ref, prev_ref)
  q, do = q_ref[...], do_ref[...]  # P^lᵀ dO is linear in Q: scaled after, q stays exact
  for k_ref, out_ref in zip(k_refs, out_refs):
    out_ref[...] = cm.local_dy(q, do, k_ref[...], gates, precision) * scale


def _state_backward_kernel(q_ref, k1_ref, gamma_ref, to_end_ref, wk_ref, do_ref, local_ref,
                           dhT_ref, dh_ref, dx_ref, dh0_ref, *, C, scale, precision):
  K = k1_ref.shape[-1]
  N = wk_ref.shape[0] // C

  def body(i, dstate):
    n = N - 1 - i
    sl = pl.ds(n * C, C)
    gates = _pass_gates(gamma_ref, to_end_ref, n, C)
    dh_ref[pl.ds(n * K, K), :] = dstate.astype(dh_ref.dtype)
    # q and k¹ go to the products as loaded: (scale γ ⊙ q)ᵀ dO = qᵀ (scale γ ⊙ dO).
    dstate, dx = cm.state_cotangent_from_local(
        dstate, q_ref[sl, :], do_ref[sl, :].astype(jnp.float32), wk_ref[sl, :], k1_ref[sl, :],
        local_ref[sl, :], gates.gamma * scale, gates.to_end, gates.gamma_last, precision)
    dx_ref[sl, :] = dx
    return dstate

  dh0_ref[...] = jax.lax.fori_loop(0, N, body, dhT_ref[...])


def _state_grads_kernel(*refs, L, BV, scale, precision):
  """dQ, the state-side dK^l, dX Sᵀ and that part of dG for one chunk and key block. One write
  after another (`cm.write_sums` summed over value blocks of BV, then `cm.write_grads`), so only
  one write's sums are live at a time; the state terms ride along with the first write."""
  ((q_ref,), k_refs, v_refs, beta_refs,
   (x_ref, dx_ref, G_ref, seq_ref, prev_ref, h_ref, dh_ref, do_ref, dq_ref),
   dk_refs, (dxs_ref, dG_ref)) = cm.split_refs(refs, (1, L, L - 1, L - 1, 9, L, 2))
  # The gates and q are loaded again after each write's loop rather than kept live through it
  # (offline ptxas, bf16 K = V = 128, spills per thread against all writes' sums at once:
  # L = 1 136 → 104 B, L = 2 1348 → 912, L = 3 2660 → 1812; reordering the last few statements
  # moved them by up to 2× either way, so only a timing decides).
  gates = lambda: _gates(G_ref, seq_ref, prev_ref)
  q = lambda: q_ref[...].astype(jnp.float32) * scale
  state_sums = None
  for l in range(L):
    sums = None
    for j in range(do_ref.shape[-1] // BV):
      cols = (slice(None), pl.ds(j * BV, BV))
      do = do_ref[cols].astype(jnp.float32)
      if l == 0:
        y = x_ref[cols]
        state_sums = cm.state_sums(dx_ref[cols], h_ref[cols], dh_ref[cols], do, precision,
                                   state_sums)
      else:
        y = _col(beta_refs[l - 1][...]) * v_refs[l - 1][cols].astype(jnp.float32)
      sums = cm.write_sums(y, dh_ref[cols], do, precision, sums)
    dq_l, dk_l, psi_l, de_l = cm.write_grads(sums, q(), k_refs[l][...], gates(), precision)
    dq, psi, de = (dq_l, psi_l, de_l) if l == 0 else (dq + dq_l, psi + psi_l, de + de_l)
    dk_refs[l][...] = dk_l
  last_gates = gates()
  dq_state, dG = cm.state_terms(state_sums, q(), last_gates)
  dq, dG = dq + dq_state, dG + cm.gate_grads(psi, de, state_sums.sds, last_gates)
  dxs_ref[...] = state_sums.dxs
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
  dG_ref[...] = dG.reshape(-1)


def _wy_helpers(k_refs, local_refs, dh_ref, dk_ref, dv_ref, gates, precision):
  """dy(i, cols) and store(name, l, cols, x) of `cm.wy_grads` for the WY kernels."""
  def dy(i, c):  # dY^l = P^lᵀ dO + e ⊙ (K^l dS'), l = i + 2 (keys go to the product as loaded)
    return local_refs[i][:, c] + gates.to_end * cm.mm(k_refs[i + 1][...], dh_ref[:, c],
                                                      precision)

  def store(name, l, cols, x):  # write l's slot of dk or dv
    r = dk_ref if name == "dk" else dv_ref
    r[:, l, cols] = x.astype(r.dtype)
  return dy, store


def _column_blocks(k_ref, v_ref, BK, BV):
  blocks = lambda n, b: [pl.ds(i * b, b) for i in range(n // b)]
  return blocks(k_ref.shape[-1], BK), blocks(v_ref.shape[-1], BV)


def _wy_grads_kernel(*refs, L, BK, BV, precision, solve):
  """The remaining cotangents of one chunk through (I + A)⁻¹ (`cm.wy_grads`), reading and
  writing key and value columns in blocks of BK and BV, one write after another, each output
  block stored as soon as it is final (offline ptxas, bf16 K = V = 128, spills per thread
  against every write at once with the outputs stored at the end: L = 1 864 → 376 B, L = 2
  2304 → 2280, L = 3 5284 → 3484; not timed yet)."""
  (k_refs, v_refs, beta_refs, (G_ref, seq_ref, prev_ref, inv_ref, u_ref, wk_ref, dx_ref, dxs_ref,
   dh_ref), local_refs, dks_refs, (dk_ref, dv_ref, dbeta_ref, dG_ref)) = cm.split_refs(
       refs, (L, L, L, 9, L - 1, L, 4))
  gates = _gates(G_ref, seq_ref, prev_ref)
  k_blocks, v_blocks = _column_blocks(k_refs[0], v_refs[0], BK, BV)
  dy, store = _wy_helpers(k_refs, local_refs, dh_ref, dk_ref, dv_ref, gates, precision)
  dbeta, dG = cm.wy_grads(
      k_refs, v_refs, [_col(r[...]) for r in beta_refs], inv_ref[...], u_ref, wk_ref, dx_ref,
      dxs_ref, dy, dks_refs, gates, precision, store, solve, v_blocks=v_blocks,
      k_blocks=k_blocks)
  for l, x in enumerate(dbeta):
    dbeta_ref[:, l] = x.reshape(-1).astype(dbeta_ref.dtype)
  dG_ref[...] = dG.reshape(-1)


def _wy_further_kernel(*refs, L, BK, BV, precision, solve):
  """The writes l ≥ 2 of one chunk's WY side (`cm.further_write_grads`), beside a kernel that
  does the erase write alone: their dk^l, dδ^l and dβ^l, the erase write's dK¹ accumulator
  started from the state side's, and their terms of dβ¹ and dG."""
  (k_refs, v_refs, beta_refs, (G_ref, seq_ref, prev_ref, inv_ref, dx_ref, dh_ref), local_refs,
   dks_refs, (dk_ref, dv_ref, dbeta_ref, dk1_ref, dbeta1_ref, dG_ref)) = cm.split_refs(
       refs, (L, L, L, 6, L - 1, L, 6))
  gates = _gates(G_ref, seq_ref, prev_ref)
  k_blocks, v_blocks = _column_blocks(k_refs[0], v_refs[0], BK, BV)
  dy, store = _wy_helpers(k_refs, local_refs, dh_ref, dk_ref, dv_ref, gates, precision)
  dk1 = [dks_refs[0][:, c] for c in k_blocks]
  dbeta, dbeta1, psi, dk1 = cm.further_write_grads(
      k_refs, v_refs, [_col(r[...]) for r in beta_refs], inv_ref[...], dx_ref, dy, dks_refs,
      gates, precision, store, solve, v_blocks, k_blocks, dk1)
  for c, x in zip(k_blocks, dk1):
    dk1_ref[:, c] = x
  for l, x in enumerate(dbeta, start=1):
    dbeta_ref[:, l] = x.reshape(-1).astype(dbeta_ref.dtype)
  dbeta1_ref[...] = dbeta1.reshape(-1)
  dG_ref[...] = cm.row_minus_column_sums(psi).reshape(-1)


# pallas_calls. Shapes: q [B,T,H,K], k [B,T,H,L,K], v [B,T,H,L,V], beta [B,T,H,L],
# G [B,T,H] float32, seq / prev [B,T] float32, states [B,H,K,V] float32. The chunk-parallel
# kernels run on the grid (B·H, N[, V/BV or K/BK]) (Triton grids have at most three axes).

def _rows_spec(H, C, width, axis_of_block, write=None):
  """BlockSpec of one chunk's rows [C, width] of a [B, T, H, W] array (or of write `write` of a
  [B, T, H, L, W] array) on a grid (B·H, N, ...): columns block `axis_of_block` of the grid
  (2), or all columns (None)."""
  def index(bh, n, *rest):
    col = rest[0] if axis_of_block == 2 else 0
    return (bh // H, n, bh % H) + ((col,) if write is None else (write, col))
  return pl.BlockSpec((None, C, None, width) if write is None else (None, C, None, None, width),
                      index)


def _gate_specs(L, C, H):
  """BlockSpecs of one chunk of the L gates β^l, of G and of seq / prev, for any grid
  (B·H, N, ...)."""
  at = lambda f: (lambda bh, n, *_: f(bh // H, bh % H, n))
  return dict(
      beta=[pl.BlockSpec((None, C, None, None), at(lambda b, h, n, l=l: (b, n, h, l)))
            for l in range(L)],
      G=pl.BlockSpec((None, C, None), at(lambda b, h, n: (b, n, h))),
      seq=pl.BlockSpec((None, C), at(lambda b, h, n: (b, n))),
  )


def _chunk_specs(bs: BlockSizes, k, V):
  """The grid (B·H, N, V/BV) of a kernel per chunk and value block (k: the keys [B,T,H,L,K]),
  and its BlockSpecs for q, the L keys, values and gates, G, seq, rows of width K, BV and C,
  and the [K, BV] block of the state entering the chunk."""
  B, T, H, L, K = k.shape
  C, BV = bs.chunk, min(bs.chunk_block_v, V)
  return (B * H, T // C, V // BV), dict(
      q=_rows_spec(H, C, K, None),
      k=[_rows_spec(H, C, K, None, l) for l in range(L)],
      v=[_rows_spec(H, C, BV, 2, l) for l in range(L)],
      **_gate_specs(L, C, H),
      rows_k=_rows_spec(H, C, K, None),
      rows_v=_rows_spec(H, C, BV, 2),
      rows_c=_rows_spec(H, C, C, None),
      h=pl.BlockSpec((None, None, K, BV), lambda bh, n, j: (bh // H, bh % H, n, j)),
  )


def seq_tiling(bs: BlockSizes, B: int, H: int, V: int) -> tuple[int, BlockSizes]:
  """Value columns per program of the two passes over chunks, and the BlockSizes to launch them
  with. A pass runs B·H·V/BV programs, each a serial chain over the chunks: when they are too
  few to fill the GPU, narrower blocks double them (on the H200, B1 T16384 H16 K=V=128, 32
  programs of 64 columns: state pass 0.44 ms, cotangent pass 0.91; 64 programs of 32 columns
  with 4 warps: 0.33 and 0.50; at B4 T4096, 128 programs, 64 columns stay faster)."""
  BV = min(bs.seq_block_v, V)
  if B * H * (V // BV) < bs.seq_min_programs and BV >= 32:
    return BV // 2, dataclasses.replace(bs, seq_num_warps=bs.seq_narrow_warps)
  return BV, bs


def _block_v(bs: BlockSizes, V: int) -> int:
  return min(bs.block_v, V)


def inverse(k, beta, G, seq, *, bs: BlockSizes, precision, interpret, solve=cm.HIGHEST,
            store_dtype=jnp.float32):
  """(I + A)⁻¹ of every chunk, once per chunk (grid (B·H, N)): rows [B,T,H,C], computed in
  float32 and stored in store_dtype."""
  B, T, H, L, K = k.shape
  C = bs.chunk
  at = lambda f: (lambda bh, n: f(bh // H, bh % H, n))
  return pl.pallas_call(
      functools.partial(_inverse_kernel, precision=precision, solve=solve,
                        diag=bs.inverse_diag, block_k=min(bs.inverse_block_k or K, K)),
      grid=(B * H, T // C),
      in_specs=[pl.BlockSpec((None, C, None, None, K), at(lambda b, h, n: (b, n, h, 0, 0))),
                pl.BlockSpec((None, C, None, None), at(lambda b, h, n: (b, n, h, 0))),
                pl.BlockSpec((None, C, None), at(lambda b, h, n: (b, n, h))),
                pl.BlockSpec((None, C), at(lambda b, h, n: (b, n)))],
      out_specs=pl.BlockSpec((None, C, None, C), at(lambda b, h, n: (b, n, h, 0))),
      out_shape=jax.ShapeDtypeStruct((B, T, H, C), store_dtype),
      **_launch("prism_inverse", bs, interpret),
  )(k, beta, G, seq)


def apply_inverse(k, v, beta, G, seq, prev, inv, *, bs: BlockSizes, precision, interpret,
                  solve=cm.HIGHEST, store_dtype=jnp.float32):
  """U = (I + A)⁻¹ R per chunk and value block, and Wk = (I + A)⁻¹ Bk in the first value
  block of each chunk."""
  B, T, H, L, K = k.shape
  V = v.shape[-1]
  grid, s = _chunk_specs(bs, k, V)
  return pl.pallas_call(
      functools.partial(_apply_kernel, L=L, precision=precision, solve=solve),
      grid=grid,
      in_specs=[*s["k"], *s["v"], *s["beta"], s["G"], s["seq"], s["seq"], s["rows_c"]],
      out_specs=[s["rows_v"], s["rows_k"]],
      out_shape=[jax.ShapeDtypeStruct((B, T, H, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, T, H, K), store_dtype)],
      **_launch("prism_apply_inverse", bs, interpret),
  )(*([k] * L), *([v] * L), *([beta] * L), G, seq, prev, inv)


def _seq_specs(L, T, K, BV):
  """Whole-sequence BlockSpecs for the sequential passes (grid (B, H, V/BV))."""
  ks = [pl.BlockSpec((None, T, None, None, K), lambda b, h, j, l=l: (b, 0, h, l, 0))
        for l in range(L)]
  vs = [pl.BlockSpec((None, T, None, None, BV), lambda b, h, j, l=l: (b, 0, h, l, j))
        for l in range(L)]
  betas = [pl.BlockSpec((None, T, None, None), lambda b, h, j, l=l: (b, 0, h, l))
           for l in range(L)]
  G = pl.BlockSpec((None, T, None), lambda b, h, j: (b, 0, h))
  seq = pl.BlockSpec((None, T), lambda b, h, j: (b, 0))
  rows_k = pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h, 0))
  rows_v = pl.BlockSpec((None, T, None, BV), lambda b, h, j: (b, 0, h, j))
  return ks, vs, betas, G, seq, rows_k, rows_v


def state_forward(k, v, beta, G, seq, prev, u, wk, h0, *, bs: BlockSizes, precision, interpret,
                  store_dtype=jnp.float32):
  """States entering each chunk h [B,H,N·K,V] and new values X [B,T,H,V] (store_dtype: the
  later kernels read them only as product operands), final state [B,H,K,V] float32."""
  B, T, H, L, K = k.shape
  V, C = v.shape[-1], bs.chunk
  BV, bs = seq_tiling(bs, B, H, V)
  ks, vs, betas, G_spec, _, rows_k, rows_v = _seq_specs(L, T, K, BV)
  state_spec = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
  h_spec = pl.BlockSpec((None, None, T // C * K, BV), lambda b, h, j: (b, h, 0, j))
  return pl.pallas_call(
      functools.partial(_state_forward_kernel, L=L, C=C, precision=precision),
      grid=(B, H, V // BV),
      in_specs=[*ks, *vs, *betas, G_spec, G_spec, rows_v, rows_k, state_spec],
      out_specs=[h_spec, rows_v, state_spec],
      out_shape=[jax.ShapeDtypeStruct((B, H, T // C * K, V), store_dtype),
                 jax.ShapeDtypeStruct((B, T, H, V), store_dtype),
                 jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)],
      **_launch("prism_state_forward", bs, interpret),
  )(*([k] * L), *([v] * L), *([beta] * L), *pass_gates(G, seq, prev, C), u, wk, h0)


def output(q, k, v, beta, G, seq, prev, x, h, *, scale, bs: BlockSizes, precision, interpret):
  """O [B,T,H,V] in q's dtype."""
  B, T, H, L, K = k.shape
  V = v.shape[-1]
  grid, s = _chunk_specs(bs, k, V)
  return pl.pallas_call(
      functools.partial(_output_kernel, L=L, scale=scale, precision=precision),
      grid=grid,
      in_specs=[s["q"], *s["k"], *s["v"], *s["beta"], s["G"], s["seq"], s["seq"], s["rows_v"],
                s["h"]],
      out_specs=s["rows_v"],
      out_shape=jax.ShapeDtypeStruct((B, T, H, V), q.dtype),
      **_launch("prism_output", bs, interpret),
  )(q, *([k] * L), *([v] * L), *([beta] * L), G, seq, prev, x, h)


def local_dy(q, k, G, seq, prev, do, *, scale, bs: BlockSizes, precision, interpret):
  """P^lᵀ dO of every write l, L arrays [B,T,H,V] float32 (parallel over chunks): the
  state-independent part of dY^l, taken out of the reverse pass."""
  B, T, H, L, K = k.shape
  V = do.shape[-1]
  grid, s = _chunk_specs(bs, k, V)
  return pl.pallas_call(
      functools.partial(_local_dy_kernel, L=L, scale=scale, precision=precision),
      grid=grid,
      in_specs=[s["q"], *s["k"], s["G"], s["seq"], s["seq"], s["rows_v"]],
      out_specs=[s["rows_v"]] * L,
      out_shape=[jax.ShapeDtypeStruct((B, T, H, V), jnp.float32)] * L,
      **_launch("prism_local_dy", bs, interpret),
  )(q, *([k] * L), G, seq, prev, do)


def state_backward(q, k, G, seq, prev, wk, do, local1, dhT, *, scale, bs: BlockSizes,
                   precision, interpret, store_dtype=jnp.float32):
  """Reverse pass over chunks: cotangents of the states leaving each chunk dh [B,H,N·K,V]
  (store_dtype), dX [B,T,H,V] float32 and the initial-state cotangent [B,H,K,V]. local1: P¹ᵀ dO
  (`local_dy`)."""
  B, T, H, L, K = k.shape
  V, C = do.shape[-1], bs.chunk
  BV, bs = seq_tiling(bs, B, H, V)
  ks, _, _, G_spec, _, rows_k, rows_v = _seq_specs(1, T, K, BV)
  state_spec = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
  h_spec = pl.BlockSpec((None, None, T // C * K, BV), lambda b, h, j: (b, h, 0, j))
  return pl.pallas_call(
      functools.partial(_state_backward_kernel, C=C, scale=scale, precision=precision),
      grid=(B, H, V // BV),
      in_specs=[rows_k, ks[0], G_spec, G_spec, rows_k, rows_v, rows_v, state_spec],
      out_specs=[h_spec, rows_v, state_spec],
      out_shape=[jax.ShapeDtypeStruct((B, H, T // C * K, V), store_dtype),
                 jax.ShapeDtypeStruct((B, T, H, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)],
      **_launch("prism_state_backward", bs, interpret),
  )(q, k, *pass_gates(G, seq, prev, C), wk, do, local1, dhT)


def _grad_specs(L, C, K, V, BK, H):
  """BlockSpecs of the two gradient kernels: grid (B·H, N, K/BK) for the state side, whose
  key-width blocks are BK columns, and (B·H, N) for the WY side, whose blocks are whole rows."""
  nK = K // BK
  at = lambda f: (lambda bh, n, *r: f(bh // H, bh % H, n, *r))
  return dict(
      key=lambda width: _rows_spec(H, C, width, 2),
      rows=lambda width: _rows_spec(H, C, width, None),
      k_blk=[_rows_spec(H, C, BK, 2, l) for l in range(L)],
      k_all=[_rows_spec(H, C, K, None, l) for l in range(L)],
      v_all=[_rows_spec(H, C, V, None, l) for l in range(L)],
      **_gate_specs(L, C, H),
      h_blk=pl.BlockSpec((None, None, BK, V), at(lambda b, h, n, i: (b, h, n * nK + i, 0))),
      h_all=pl.BlockSpec((None, None, K, V), at(lambda b, h, n: (b, h, n, 0))),
      part=pl.BlockSpec((None, None, C, None), at(lambda b, h, n, i: (i, b, n, h))),
  )


def state_grads(q, k, v, beta, G, seq, prev, x, h, dh, dx, do, *, scale, bs: BlockSizes,
                precision, interpret):
  """The state side (grid B·H × N × K/BK, value blocks summed inside): dq in q's dtype, the
  output/state terms of dK^l (L × [B,T,H,K] float32), dX Sᵀ [B,T,H,K] float32 and that part of
  dG [B,T,H]."""
  B, T, H, L, K = k.shape
  V, C = v.shape[-1], bs.chunk
  BK = min(bs.block_k, K)
  s = _grad_specs(L, C, K, V, BK, H)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  dq, *rest = pl.pallas_call(
      functools.partial(_state_grads_kernel, L=L, BV=_block_v(bs, V), scale=scale,
                        precision=precision),
      grid=(B * H, T // C, K // BK),
      in_specs=[s["key"](BK), *s["k_blk"], *s["v_all"][1:], *s["beta"][1:], s["rows"](V),
                s["rows"](V), s["G"], s["seq"], s["seq"], s["h_blk"], s["h_blk"], s["rows"](V)],
      out_specs=[s["key"](BK)] * (L + 2) + [s["part"]],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] + [f32(B, T, H, K)] * (L + 1)
      + [f32(K // BK, B, T, H)],
      **_launch("prism_state_grads", bs, interpret),
  )(q, *([k] * L), *([v] * (L - 1)), *([beta] * (L - 1)), x, dx, G, seq, prev, h, dh, do)
  return dq, rest[:L], rest[L], rest[L + 1].sum(axis=0)


def _wy_slots(k, v, beta, bs: BlockSizes):
  """BlockSpecs and shapes of the WY kernels' per-write outputs dk, dv, dβ: each write goes to
  its own slot of the one array the custom_vjp returns (L rounded up to a power of two, Lp,
  for the block), not to L arrays stacked in XLA (at B4 T4096 L = 2 that stacking was a 319 µs
  copy)."""
  B, T, H, L, K = k.shape
  V, C, Lp = v.shape[-1], bs.chunk, 1 << (L - 1).bit_length()
  at = lambda f: (lambda bh, n: f(bh // H, bh % H, n))
  slots = lambda width: pl.BlockSpec((None, C, None, Lp, width),
                                     at(lambda b, h, n: (b, n, h, 0, 0)))
  specs = [slots(K), slots(V), pl.BlockSpec((None, C, None, Lp), at(lambda b, h, n: (b, n, h, 0)))]
  shapes = [jax.ShapeDtypeStruct((B, T, H, Lp, K), k.dtype),
            jax.ShapeDtypeStruct((B, T, H, Lp, V), v.dtype),
            jax.ShapeDtypeStruct((B, T, H, Lp), beta.dtype)]
  return specs, shapes


def _unpadded_slots(L, dk, dv, dbeta):
  if dk.shape[3] != L:  # the unwritten slots go
    dk, dv, dbeta = dk[:, :, :, :L], dv[:, :, :, :L], dbeta[..., :L]
  return dk, dv, dbeta


def wy_grads(k, v, beta, G, seq, prev, inv, u, wk, dx, dxs, dh, local, dk_state, *,
             bs: BlockSizes, precision, interpret, solve=cm.HIGHEST):
  """The WY side (grid B·H × N, columns in blocks inside): dk [B,T,H,L,K] (k's dtype,
  dk_state added), dv [B,T,H,L,V] (v's dtype), dβ [B,T,H,L] (β's dtype) and the rest of dG
  [B,T,H] float32."""
  B, T, H, L, K = k.shape
  V, C = v.shape[-1], bs.chunk
  s = _grad_specs(L, C, K, V, min(bs.block_k, K), H)
  rows = s["rows"]
  slot_specs, slot_shapes = _wy_slots(k, v, beta, bs)
  dk, dv, dbeta, dG = pl.pallas_call(
      functools.partial(_wy_grads_kernel, L=L, BK=min(bs.block_k, K), BV=_block_v(bs, V),
                        precision=precision, solve=solve),
      grid=(B * H, T // C),
      in_specs=[*s["k_all"], *s["v_all"], *s["beta"], s["G"], s["seq"], s["seq"], rows(C),
                rows(V), rows(K), rows(V), rows(K), s["h_all"], *[rows(V)] * (L - 1),
                *[rows(K)] * L],
      out_specs=[*slot_specs, s["G"]],
      out_shape=[*slot_shapes, jax.ShapeDtypeStruct((B, T, H), jnp.float32)],
      **_launch("prism_wy_grads", bs, interpret),
  )(*([k] * L), *([v] * L), *([beta] * L), G, seq, prev, inv, u, wk, dx, dxs, dh, *local[1:],
    *dk_state)
  return (*_unpadded_slots(L, dk, dv, dbeta), dG)


def wy_further_grads(k, v, beta, G, seq, prev, inv, dx, dh, local, dk_state, *,
                     bs: BlockSizes, precision, interpret, solve=cm.HIGHEST):
  """The writes l ≥ 2 of the WY side (grid B·H × N; L ≥ 2), beside a kernel that does the
  erase write alone (`mosaic.wy_grads`), which then writes the first slots: dk [B,T,H,Lp,K],
  dv [B,T,H,Lp,V] and dβ [B,T,H,Lp] with every slot but the first written (Lp: L rounded up
  to a power of two), the erase write's dK¹ so far [B,T,H,K] float32 (the state side's
  dk_state[0] plus these writes' terms), and these writes' terms of dβ¹ and of dG [B,T,H]
  float32."""
  B, T, H, L, K = k.shape
  V, C = v.shape[-1], bs.chunk
  if L < 2:
    raise ValueError(f"wy_further_grads: L = {L}; only the erase write is left at L = 1")
  s = _grad_specs(L, C, K, V, min(bs.block_k, K), H)
  rows = s["rows"]
  slot_specs, slot_shapes = _wy_slots(k, v, beta, bs)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  return pl.pallas_call(
      functools.partial(_wy_further_kernel, L=L, BK=min(bs.block_k, K), BV=_block_v(bs, V),
                        precision=precision, solve=solve),
      grid=(B * H, T // C),
      in_specs=[*s["k_all"], *s["v_all"], *s["beta"], s["G"], s["seq"], s["seq"], rows(C),
                rows(V), s["h_all"], *[rows(V)] * (L - 1), *[rows(K)] * L],
      out_specs=[*slot_specs, rows(K), s["G"], s["G"]],
      out_shape=[*slot_shapes, f32(B, T, H, K), f32(B, T, H), f32(B, T, H)],
      **_launch("prism_wy_further_grads", bs, interpret),
  )(*([k] * L), *([v] * L), *([beta] * L), G, seq, prev, inv, dx, dh, *local[1:], *dk_state)
