"""Speed switches: bfloat16 compute, the attention kernel switch, hand-written backward passes,
the larger presets and the prepared GPU script. Timing itself lives in benchmark/speed.py, not here."""
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from anchoredit_jax.models import layers
from anchoredit_jax.models.attention import attend, attend_cpu, pad_even
from anchoredit_jax.models.model import abstract_split, build
from configs import common
from tests.helpers import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _forward(m, params=None):
  graphdef, p = nnx.split(build(m, nnx.Rngs(0)))
  params = p if params is None else params
  x = jax.random.normal(jax.random.key(2), (2, 1, 32, 32, 3))
  args = (x, jnp.full((2, 1), 0.5), jnp.ones((2, 1, m.text_len), jnp.int32), jnp.ones((2, 1), jnp.int32))
  f = jax.jit(lambda p: nnx.merge(graphdef, p)(*args, cond=jnp.zeros((2, 1, 32, 32, 4))))
  return f, params


def test_bfloat16_compute_keeps_float32_params_and_output():
  m = common.model_config("smoke")
  f32, params = _forward(m)
  params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), params)
  m.dtype = "bfloat16"
  bf16, _ = _forward(m)
  (v32, _), (v16, kv16) = f32(params), bf16(params)
  assert v16.dtype == jnp.float32 and kv16[0].dtype == jnp.bfloat16
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
  assert "bf16" in bf16.lower(params).as_text() and "bf16" not in f32.lower(params).as_text()
  assert 1e-4 < rel_err(v16, v32) < 3e-2  # rounding shows, but only rounding


PLAIN = {  # the formulas as autodiff would differentiate them
    "softmax": lambda x, s, t: jax.nn.softmax(x, axis=-1),
    "normalize": lambda x, s, t: (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6),
    "rms_normalize": lambda x, s, t: x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6),
    "modulate": lambda x, s, t: x * (1 + s) + t,
    "gated": lambda x, s, t: t + x * s,
}
HAND = {"softmax": lambda x, s, t: layers.softmax(x), "normalize": lambda x, s, t: layers.normalize(x, 1e-6),
        "rms_normalize": lambda x, s, t: layers.rms_normalize(x, 1e-6),
        "modulate": layers.modulate, "gated": lambda x, s, t: layers.gated(t, x, s)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", sorted(PLAIN))
def test_hand_written_backward_passes_match_autodiff(name, dtype):
  k = jax.random.split(jax.random.key(0), 4)
  x = (3 * jax.random.normal(k[0], (2, 3, 16, 24)) + 1).astype(dtype)
  s, t = (jax.random.normal(r, (2, 3, 1, 24)).astype(dtype) for r in k[1:3])
  t = t if name != "gated" else x[::-1]  # the residual input is full size
  w = jax.random.normal(k[3], x.shape)  # a cotangent that is not all ones
  loss = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w), argnums=(0, 1, 2)))
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  assert rel_err(HAND[name](x, s, t), PLAIN[name](x, s, t)) < tol
  for hand, plain in zip(loss(HAND[name])(x, s, t), loss(PLAIN[name])(x, s, t)):
    assert hand.dtype == plain.dtype and hand.shape == plain.shape
    assert rel_err(hand, plain) < tol


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_attention_matches_jax_attention_and_its_gradients(dtype):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(r, (2, 24, 3, 16)).astype(dtype) for r in (k1, k2, k3))
  mask = jax.random.bernoulli(k4, 0.6, (2, 24, 24)).at[0, 5].set(False)  # one query sees nothing
  ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
  w = jax.random.normal(k4, q.shape)
  grads = lambda f: jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w), argnums=(0, 1, 2))(q, k, v)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  assert rel_err(attend_cpu(q, k, v, mask), ref(q, k, v)) < tol
  for mine, theirs in zip(grads(lambda *a: attend_cpu(*a, mask)), grads(ref)):
    assert mine.dtype == theirs.dtype and rel_err(mine, theirs) < tol


def test_dot_sum_is_a_contraction_for_a_cpu_only(monkeypatch):
  """The point of dot_sum: XLA:CPU sees a dot_general, not a multiply feeding a reduce. Compiling
  for another platform (sharding.platform: the default backend, or an AOT target's) keeps the sum."""
  a = jnp.ones((4, 8, 16))
  forms = {}
  for target in ("cpu", "gpu"):
    monkeypatch.setattr(layers.sh, "platform", lambda: target)
    forms[target] = str(jax.make_jaxpr(lambda a, b: layers.dot_sum(a, b, (1,)))(a, a))
    np.testing.assert_allclose(layers.dot_sum(a, 2 * a, (1,)), np.full((4, 1, 16), 16.0))
  assert "dot_general" in forms["cpu"] and "reduce_sum" not in forms["cpu"]
  assert "reduce_sum" in forms["gpu"] and "dot_general" not in forms["gpu"]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_attention_matches_xla():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(r, (2, 128, 4, 64), jnp.bfloat16) for r in (k1, k2, k3))
  mask = jnp.tril(jnp.ones((128, 128), bool))[None].repeat(2, 0)
  np.testing.assert_allclose(np.asarray(attend(q, k, v, mask, "cudnn"), np.float32),
                             np.asarray(attend(q, k, v, mask, "xla"), np.float32), atol=2e-2)
  # the shapes AnchorMemory makes: more keys than queries, a key count that is no power of two,
  # and a padded mask (empty memory slots, text padding); every query keeps at least one key
  # odd counts too (a Wan turn at 624x624 is 1521 tokens; cuDNN takes only even ones in training)
  for s, m in ((96, 250), (97, 251)):
    q = jax.random.normal(k1, (2, s, 4, 128), jnp.bfloat16)
    k, v = (jax.random.normal(r, (2, m, 4, 128), jnp.bfloat16) for r in (k2, k3))
    mask = (jax.random.uniform(k1, (2, s, m)) < 0.6).at[:, :, -1].set(True)
    np.testing.assert_allclose(np.asarray(attend(q, k, v, mask, "cudnn"), np.float32),
                               np.asarray(attend(q, k, v, mask, "xla"), np.float32), atol=2e-2)
    loss = lambda kernel: lambda q: jnp.sum(attend(q, k, v, mask, kernel).astype(jnp.float32) ** 2)
    np.testing.assert_allclose(np.asarray(jax.grad(loss("cudnn"))(q), np.float32),
                               np.asarray(jax.grad(loss("xla"))(q), np.float32), atol=5e-2)


def test_even_padding_for_cudnn_changes_nothing():
  # what cuDNN gets after padding, run through the XLA path, equals the unpadded attention
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(k1, (2, 7, 2, 8))
  k, v = jax.random.normal(k2, (2, 9, 2, 8)), jax.random.normal(k3, (2, 9, 2, 8))
  mask = (jax.random.uniform(k1, (2, 7, 9)) < 0.6).at[:, :, 0].set(True)
  qp, kp, vp, mp = pad_even(q, k, v, mask)
  assert qp.shape[1] == 8 and kp.shape[1] == 10 and mp.shape == (2, 8, 10)
  np.testing.assert_allclose(attend(qp, kp, vp, mp)[:, :7], attend(q, k, v, mask), rtol=1e-6, atol=1e-6)


def test_unknown_attention_kernel_is_named():
  q = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="attention kernel 'flash' unknown"):
    attend(q, q, q, jnp.ones((1, 4, 4), bool), "flash")


def test_small_and_wan_sized_timing_configs_without_memory():
  from benchmark.speed import stage_config
  count = lambda m: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract_split(m)[1]["dit"]))
  small = stage_config("pretrain", "small")
  assert small.model.dtype == "bfloat16" and (small.data.res // small.model.patch) ** 2 == 1024
  assert 80e6 < count(small.model) < 150e6
  wan = stage_config("pretrain", "wan1.3b")
  n = (wan.data.res // wan.model.ae_factor // wan.model.patch) ** 2
  assert n == 1521 and wan.model.dim == 1536 and wan.model.layers == 30
  assert wan.model.dtype == "bfloat16" and 1.2e9 < count(wan.model) < 1.5e9  # the DiT: Wan2.1-1.3B's


def test_gpu_script_parses():
  subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmark", "gpu.sh")], check=True)


def test_projection_ceiling_counts_the_blocks_matmuls():
  """The matmuls timed alone are the blocks' projections and FFN: their FLOPs are the part of
  flops.dit_forward that is neither attention scores nor embeddings, times 3 (fwd + 2 grads)."""
  from benchmark.speed import projection_ceiling, stage_config
  cfg = stage_config("pretrain", "smoke")
  m, b = cfg.model, 2
  n = (cfg.data.res // m.ae_factor // m.patch) ** 2
  d, f, l = m.dim, m.ffn_dim, m.text_len
  per_example = m.layers * (2 * n * d * 6 * d + 2 * l * d * 2 * d + 2 * 2 * n * d * f)
  flops, seconds = projection_ceiling(cfg, b, reps=1)
  assert flops == 3 * b * per_example
  assert seconds > 0


def test_op_profile_sums_the_compiled_programs_ops(tmp_path):
  """The profile keeps only the compiled program's own instructions, counts a loop's body and not
  the loop around it, and its shares add up to the whole."""
  from benchmark import opprofile

  def f(a, w):
    return jax.lax.fori_loop(0, 3, lambda i, x: jnp.tanh(x @ w), a).sum()

  a, w = jnp.ones((256, 256)), jnp.eye(256) * 0.5
  compiled = jax.jit(f).lower(a, w).compile()
  rows = opprofile.profile(lambda: compiled(a, w), compiled.as_text(), calls=2, out=str(tmp_path))
  kinds = {r["kind"] for r in rows}
  assert rows and "while" not in kinds
  assert abs(sum(r["share"] for r in rows) - 1.0) < 1e-6
  known = opprofile.instructions(compiled.as_text())
  assert all(r["top_op"] in known for r in rows)
  assert any("dot" in r["top_op_name"] or "dot" in r["kind"] for r in rows)  # the matmul is seen
  assert "| op kind |" in opprofile.table(rows)


def test_variant_overrides_are_applied_and_typos_refused(capsys):
  from benchmark import variants
  from benchmark.speed import stage_config
  cfg = variants.apply(stage_config("causal", "smoke"), "model.remat=dots, causal.window=3,model.abs_pos=True")
  assert (cfg.model.remat, cfg.causal.window, cfg.model.abs_pos) == ("dots", 3, True)
  with pytest.raises(ValueError, match="unknown config field 'model.rematt'"):
    variants.apply(stage_config("pretrain", "smoke"), "model.rematt=dots")
  assert variants.main(["--preset", "smoke", "model.remat"]) == 2  # nothing compiled, one line
  assert capsys.readouterr().err.strip().startswith("error: variant item 'model.remat'")


def test_reductions_benchmark_prints_both_forms_and_their_ratio(capsys):
  from benchmark import reductions
  reductions.main(["--reps", "2"])
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if line.startswith("| ") and line.endswith("x |")]
  assert out.startswith("machine: ") and "command: python -m benchmark.reductions --reps 2" in out
  assert len(rows) == len(reductions.CASES)
  for row in rows:
    plain, mine, ratio = (float(c.strip().rstrip("x")) for c in row.split("|")[3:6])
    assert plain > 0 and mine > 0 and ratio == pytest.approx(plain / mine, rel=0.1, abs=0.1)
