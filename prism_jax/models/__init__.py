"""Models built from `prism_jax.layers`: `CausalLM`, `SequentialRecommender`, `generate`.

    cfg = tiny_lm_config()                         # or ModelConfig(...), lm_130m_config()
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens)                          # [B, T] int32 → [B, T, vocab] float32
    out = generate(model, prompt, 32, temperature=0.0)

Sharding. Every parameter carries logical axis names in its `out_sharding` metadata:
"vocab" and "embed" on the embedding, ("embed", "heads") on projections into head space,
("heads", "embed") on output projections, ("embed", "mlp") / ("mlp", "embed") in the SwiGLU,
"kv" on per-head norms, and None on axes that are never sharded (conv taps, low-rank inner
dimensions, router outputs). Read them without allocating anything:

    abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    logical = nnx.get_partition_spec(nnx.state(abstract))   # State of PartitionSpec of names
    specs = jax.tree.map(lambda v: v.get_value(), logical,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))

then map names to mesh axes with rules such as
`flax.linen.logical_to_mesh_axes(spec, (("embed", "fsdp"), ("heads", "tensor"), ...))`.
Modules are built with eager sharding off, so construction never needs a mesh.
"""

from prism_jax.models.blocks import Block, make_mixer
from prism_jax.models.config import (LM_130M_PARAMS, MIXERS, TINY_LM_PARAMS, ModelConfig,
                                     lm_130m_config, tiny_lm_config)
from prism_jax.models.lm import Backbone, CausalLM, count_parameters, generate
from prism_jax.models.recommender import SequentialRecommender

__all__ = [
    "LM_130M_PARAMS", "MIXERS", "TINY_LM_PARAMS", "Backbone", "Block", "CausalLM",
    "ModelConfig", "SequentialRecommender", "count_parameters", "generate", "lm_130m_config",
    "make_mixer", "tiny_lm_config",
]
