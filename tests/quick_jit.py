"""jax.jit for the programs of op checks, compiled for a quick build rather than fast code.

An op check compiles each program once and runs it once on small arrays, so on the CPU the
compile is most of its time, and XLA's LLVM code generation at its default optimisation level
is most of the compile: assoc at T = 200 builds in 6.7 s, or 1.3 s unoptimised. The HLO and
XLA's passes over it are the same either way; only the machine code is less optimised (XLA's
CPU code does not use fast-math at either level, so results agree to float32 roundoff).
Programs whose speed matters, such as a training run, keep jax.jit's default, and so does
every program on an accelerator.
"""

import functools

import jax

QUICK_BUILD = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# The same options as XLA_FLAGS, for the tests that run a program in a subprocess.
QUICK_BUILD_FLAGS = " ".join(f"--{name}={str(value).lower()}"
                             for name, value in QUICK_BUILD.items())


def quick_jit(fun=None, **kwargs):
  """jax.jit(fun, **kwargs), built with QUICK_BUILD on the CPU; usable as a decorator with
  arguments."""
  if fun is None:
    return functools.partial(quick_jit, **kwargs)
  options = QUICK_BUILD if jax.default_backend() == "cpu" else None
  return jax.jit(fun, compiler_options=options, **kwargs)


def quick_init(make, seed=0):
  """make(nnx.Rngs(seed)) (a module), its variables drawn in one quick_jit program: eager, every
  initialiser compiles on its own (5 s for a PrismMixer, 2 s as one program)."""
  from flax import nnx
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(seed))))
  state = quick_jit(lambda: nnx.split(make(nnx.Rngs(seed)))[1])()
  return nnx.merge(graphdef, state)
