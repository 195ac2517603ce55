"""CausalLM: decoding == the parallel form, generate == greedy argmax of full forwards,
packed sequences, logical axis names, tied and untied heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prism_jax.layers import CausalSelfAttention, GatedDeltaNet, PrismMixer
from prism_jax.models import CausalLM, ModelConfig, generate
from prism_jax.models.lm import _sample
from host_random import normal
from prism_jax.testing import assert_close
from quick_jit import quick_jit

VOCAB, B, T = 61, 2, 16
CFG = ModelConfig(vocab_size=VOCAB, d_model=32, num_layers=3, num_heads=2, head_dim=16,
                  mixer_pattern=("prism", "attention", "gdn"), chunk_size=16, max_seq_len=T,
                  mlp_hidden=48)


@pytest.fixture(scope="module")
def lm():
  model = CausalLM(CFG, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  forward = quick_jit(lambda st, tokens, seg: nnx.merge(graphdef, st)(tokens, seg))
  return model, lambda tokens, seg=None: forward(
      state, tokens, jnp.zeros(tokens.shape, jnp.int32) if seg is None else seg)


def tokens(seed, length=T):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (B, length), np.int32))


def test_layers_follow_the_mixer_pattern(lm):
  model, _ = lm
  kinds = [type(b.mixer) for b in model.blocks]
  assert kinds == [PrismMixer, CausalSelfAttention, GatedDeltaNet]
  hybrid = ModelConfig(num_layers=8, mixer_pattern=("prism",) * 3 + ("attention",))
  assert [hybrid.mixer_of_layer(i) for i in range(8)] == ["prism"] * 3 + ["attention"] + \
      ["prism"] * 3 + ["attention"]


def test_decode_steps_equal_the_parallel_form(lm):
  """prefill(first 5 tokens) then decode_step token by token gives the logits of one
  forward pass, for a hybrid of PRISM, attention and GDN layers."""
  model, forward = lm
  x = tokens(1)
  logits = forward(x)
  assert logits.shape == (B, T, VOCAB) and logits.dtype == jnp.float32
  graphdef, state = nnx.split(model)

  @quick_jit
  def decode(state, x):
    m = nnx.merge(graphdef, state)
    first, cache = m.prefill(x[:, :5], m.init_cache(B, T))
    def body(cache, tok):
      out, cache = m.decode_step(tok, cache)
      return cache, out
    _, rest = jax.lax.scan(body, cache, x[:, 5:].T)
    return jnp.concatenate([first, jnp.moveaxis(rest, 0, 1)], axis=1)

  assert_close("decode vs forward logits", logits, decode(state, x), tol=1e-5)


def test_generate_equals_greedy_argmax_of_full_forwards(lm):
  """Each generated token is the argmax of a full forward over everything before it. The
  reference runs fixed-length forwards padded at the end (causality makes padding inert)."""
  model, forward = lm
  prompt, new = tokens(2, 5), 9
  out = generate(model, prompt, new, temperature=0.0)
  assert out.shape == (B, 5 + new) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out[:, :5], prompt)
  seq = jnp.zeros((B, T), jnp.int32).at[:, :5].set(prompt)
  for t in range(5, 5 + new):
    nxt = jnp.argmax(forward(seq)[:, t - 1], axis=-1)
    seq = seq.at[:, t].set(nxt)
  np.testing.assert_array_equal(out, seq[:, :5 + new])


def test_sampling_respects_temperature_and_top_k():
  """top_k = 1 is greedy at any temperature; top_k = 3 only ever draws the three largest
  logits; temperature → small concentrates the draws on the argmax."""
  logits = 2.0 * np.asarray(normal(8, (4, VOCAB)))
  greedy = jnp.argmax(logits, -1)
  sample = quick_jit(_sample, static_argnums=(2, 3))
  keys = jax.random.split(jax.random.key(9), 200)
  np.testing.assert_array_equal(sample(logits, keys[0], 0.0, None), greedy)
  np.testing.assert_array_equal(sample(logits, keys[0], 1.5, 1), greedy)
  draws = np.asarray(quick_jit(jax.vmap(lambda k: _sample(logits, k, 1.0, 3)))(keys))  # [200, 4]
  top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
  assert all(set(draws[:, b]) <= set(top3[b]) for b in range(4))
  assert all(len(set(draws[:, b])) > 1 for b in range(4))  # it does sample
  cold = np.asarray(quick_jit(jax.vmap(lambda k: _sample(logits, k, 1e-3, None)))(keys))
  np.testing.assert_array_equal(cold, np.broadcast_to(greedy, cold.shape))


def test_generate_validates_its_arguments(lm):
  model, _ = lm
  prompt = tokens(4, 3)
  with pytest.raises(ValueError, match="needs an rng key"):
    generate(model, prompt, 2, temperature=1.0)
  with pytest.raises(ValueError, match=r"prompt must be an integer array \[B, T0\]"):
    generate(model, prompt[0], 2, temperature=0.0)
  with pytest.raises(ValueError, match="top_k must be None or in"):
    generate(model, prompt, 2, temperature=1.0, top_k=0, rng=jax.random.key(0))
  np.testing.assert_array_equal(generate(model, prompt, 0), prompt)


def test_packed_sequences_match_separate_runs(lm):
  """segment_ids reach every layer: a packed row gives each sequence's own logits."""
  _, forward = lm
  x = tokens(5)
  seg = jnp.asarray(np.tile(np.repeat([0, 1], [7, 9]), (B, 1)), jnp.int32)
  packed = forward(x, seg)
  first = forward(x)  # the first sequence does not see what follows it
  second = forward(jnp.roll(x, -7, axis=1))  # the second one moved to the front
  assert_close("first sequence", first[:, :7], packed[:, :7], tol=1e-5)
  assert_close("second sequence", second[:, :9], packed[:, 7:], tol=1e-5)


def test_every_parameter_has_logical_axes(lm):
  """Gradients of every layer's parameters are checked per mixer in tests/layers; here the
  whole model's state is annotated, readable without allocating (eval_shape)."""
  abstract = nnx.eval_shape(lambda: CausalLM(CFG, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  values = dict(nnx.to_flat_state(params))
  assert len(values) == len(nnx.to_flat_state(nnx.state(lm[0], nnx.Param)))
  for path, spec in nnx.to_flat_state(nnx.get_partition_spec(params)):
    names = tuple(spec.get_value())
    assert len(names) == values[path].get_value().ndim, (path, names)
  assert tuple(nnx.get_partition_spec(params)["embed"]["embedding"].get_value()) == (
      "vocab", "embed")


def test_untied_head_adds_a_vocab_projection():
  tied = CausalLM(CFG, rngs=nnx.Rngs(0))
  untied = CausalLM(ModelConfig(**{**CFG.__dict__, "tie_embeddings": False}), rngs=nnx.Rngs(0))
  count = lambda m: sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert count(untied) - count(tied) == CFG.d_model * VOCAB
  h = normal(7, (3, CFG.d_model))
  assert_close("tied head", h @ tied.embed.embedding[...].T, tied.logits(h))
  assert_close("untied head", h @ untied.head.kernel[...], untied.logits(h))


def test_bad_tokens_are_named(lm):
  model, _ = lm
  with pytest.raises(ValueError, match=r"tokens must be an integer array \[B, T\]"):
    model(jnp.ones((B, 4)))
  with pytest.raises(ValueError, match=r"tokens must be an integer array \[B\]"):
    model.decode_step(jnp.ones((B, 1), jnp.int32), model.init_cache(B))


def test_kernel_impl_trains_like_the_chunked_form():
  """impl="pallas" (the kernels; Pallas interpret mode on this CPU) inside the model, under
  jit and grad with packed sequences: loss and every parameter gradient equal impl="chunk"'s."""
  import dataclasses
  import optax

  x = tokens(7, 40)
  seg = jnp.asarray((np.arange(40) >= 23).astype(np.int32))[None].repeat(B, 0)

  def loss_and_grads(impl):
    cfg = dataclasses.replace(CFG, mixer_pattern=("prism", "gdn"), num_layers=2, max_seq_len=40,
                              impl=impl)
    graphdef, state = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(3)))

    def loss(state):
      logits = nnx.merge(graphdef, state)(x, seg)
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], x[:, 1:]).mean()
    return quick_jit(jax.value_and_grad(loss))(state)

  loss_c, grads_c = loss_and_grads("chunk")
  loss_p, grads_p = loss_and_grads("pallas")
  assert_close("loss", loss_c, loss_p)
  flat_c, flat_p = jax.tree.leaves(grads_c), jax.tree.leaves(grads_p)
  assert len(flat_c) == len(flat_p) > 10
  for ref, got in zip(flat_c, flat_p):
    assert_close("grad", ref, got)
