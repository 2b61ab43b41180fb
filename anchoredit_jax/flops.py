"""Model FLOPs counted from the architecture (multiply-adds x 2), to check XLA's cost_analysis
and to put a FLOP floor beside measured times. Attention is counted dense, as XLA computes it
(block-causal masks do not remove work). These are model FLOPs: the forward a remat'd backward
computes again is not counted (XLA's count of a toy step with remat "full" is 1.2-1.3x this).

Letters: n tokens per turn, T turns computed, m memory tokens attended to, l text tokens.
"""
from anchoredit_jax.models.dit import input_channels
from anchoredit_jax.models.model import frozen_parts, latent_channels


def text_forward(cfg, sequences: int) -> float:
  """Text encoder (byte-level, or umT5 with a gated FFN) over `sequences` instructions of
  cfg.text_len tokens."""
  d, l = cfg.text_dim, cfg.text_len
  if cfg.text_encoder == "umt5":
    u = cfg.umt5
    inner = u.num_heads * u.d_kv
    per_layer = 2 * l * d * 4 * inner + 2 * 2 * l * l * inner + 2 * l * d * 3 * u.d_ff
    return float(sequences * u.num_layers * per_layer)
  per_layer = 2 * l * d * (3 * d + d + 2 * 4 * d) + 2 * 2 * l * l * d
  return float(sequences * cfg.text_layers * per_layer)


def _text_backward(cfg, sequences: int) -> int:
  """Forward-equivalents a backward pass adds to `sequences` encodings: 2 each if the encoder
  trains, none if it is frozen (umT5: no gradient is computed)."""
  return 0 if "text" in frozen_parts(cfg) else 2 * sequences


def dit_forward(cfg, *, n: int, turns: int = 1, memory: int = 0, latent_channels: int = 3) -> float:
  """One CausalDiT forward pass over `turns` turns of n tokens each (one batch element)."""
  d, f, l, p = cfg.dim, cfg.ffn_dim, cfg.text_len, cfg.patch
  N = turns * n
  in_ch = input_channels(cfg, latent_channels)
  self_attn = 2 * N * d * 4 * d + 2 * 2 * N * (N + memory) * d
  cross = 2 * N * d * 2 * d + 2 * turns * l * d * 2 * d + 2 * 2 * N * l * d
  ffn = 2 * 2 * N * d * f
  blocks = cfg.layers * (self_attn + cross + ffn)
  io = 2 * N * d * p * p * (in_ch + latent_channels)          # patch embedding + head
  text_proj = 2 * turns * l * (cfg.text_dim * d + d * d)     # text_embed MLP
  time = 2 * turns * (cfg.freq_dim * d + d * d + d * 6 * d)  # time MLP + shared adaLN projection
  return float(blocks + io + text_proj + time)


def pretrain_step(cfg, batch: int, res: int) -> float:
  """Stage-1 train step (forward + backward = 3 forwards) of `batch` single-turn examples; the
  VAE's encoding of the images is not counted."""
  n = (res // cfg.ae_factor // cfg.patch) ** 2
  turns = 2 if cfg.source_context else 1
  dit = dit_forward(cfg, n=n, turns=turns, latent_channels=latent_channels(cfg))
  return float(batch * (3 * dit + text_forward(cfg, turns + _text_backward(cfg, turns))))


def turn_forward(cfg, res: int, window: int) -> float:
  """One DiT call on one new turn reading an AnchorMemory of (window + 1) turns (computed dense,
  valid or not). The instruction is encoded once per turn and counted apart (text_forward)."""
  n = (res // cfg.ae_factor // cfg.patch) ** 2
  return dit_forward(cfg, n=n, memory=(window + 1) * n, latent_channels=latent_channels(cfg))


def edit_turn(cfg, res: int, window: int, steps: int) -> float:
  """One inference turn of the few-step student: `steps` sampler passes and the memory write,
  the instruction encoded once."""
  return (steps + 1) * turn_forward(cfg, res, window) + text_forward(cfg, 1)


def causal_step(cfg, batch: int) -> float:
  """Stage-2 step: per sequence a source write, then per edit turn the self-rollout sampler
  (no gradient), the loss forward + backward (3 forwards) and a memory write. Text: the empty
  instruction once, each turn's instruction once (forward + backward)."""
  c, K = cfg.causal, cfg.data.num_turns
  window = K + 1 if c.full_cache else c.window
  f = turn_forward(cfg.model, cfg.data.res, window)
  gen = c.rollout_steps * (2 if c.rollout_guidance != 1.0 else 1) if c.self_rollout else 0
  text = text_forward(cfg.model, 1 + K + _text_backward(cfg.model, K))
  return float(batch * (f * (1 + K * (gen + 3 + 1)) + text))


def distill_step(cfg, batch: int) -> float:
  """Stage-3 step: three source writes (student, EMA, teacher), then per edit turn the student's
  few-step rollout, the teacher's guided step (2 in one batched call), the EMA target, the
  student forward + backward and three memory writes. Text: each model encodes the empty
  instruction once and each turn's once (the student's with its backward)."""
  c, K = cfg.causal, cfg.data.num_turns
  window = K + 1 if c.full_cache else c.window
  f = turn_forward(cfg.model, cfg.data.res, window)
  gen = cfg.distill.student_steps if c.self_rollout else 0
  text = text_forward(cfg.model, 3 + 3 * K + _text_backward(cfg.model, K))
  return float(batch * (f * (3 + K * (gen + 2 + 1 + 3 + 3)) + text))


def dmd_parts(cfg, generator: bool = True) -> dict:
  """Stage 3b's step in parts: name -> (count, forward passes f, text encodings). The networks
  that take part ("roles": generator, real score, critic; the generator alone for the regression
  warm-up) each read their own memory, so every write is made once per role:

  - source: each role writes the source under the empty instruction;
  - rollout_turn: a turn before the target k, counted (K-1)/2 times in expectation over k: the
    generator's S sampler passes and one write per role, its instruction encoded per role;
  - simulation: backward simulation's passes, (S-1)/2 in expectation over s (none for the
    regression warm-up, which noises the ground truth instead);
  - target: the generator's step with its backward (3), the critic's forward + backward (3) and,
    on generator steps, the real score's guided pass (2) and the critic's read (1); on critic
    steps the generator's step without gradient (1). Text: the target's instruction once per role
    read, the real score's empty instruction, and the backward of each trained encoding."""
  d, K, S = cfg.dmd, cfg.data.num_turns, cfg.dmd.student_steps
  m = cfg.model
  if d.objective == "regression":
    roles, target = 1, (3, 1 + _text_backward(m, 1))
  elif generator:
    roles, target = 3, (3 + 3 + 3, 3 + 1 + _text_backward(m, 2))
  else:  # the real score is not read
    roles, target = 3, (1 + 3, 2 + _text_backward(m, 1))
  return {"source": (1, roles, roles),
          "rollout_turn": ((K - 1) / 2, S + roles, roles),
          "simulation": (0 if d.objective == "regression" else (S - 1) / 2, 1, 0),
          "target": (1, *target)}


def dmd_step(cfg, batch: int, generator: bool | None = None) -> float:
  """Stage-3b step (dmd_parts), in expectation over the target turn k and the sampler step s.
  `generator` None: the mean over a run, one step in dmd.generator_every moving the generator
  (regression: every step, the generator alone)."""
  if generator is None and cfg.dmd.objective == "dmd":
    r = cfg.dmd.generator_every
    return (dmd_step(cfg, batch, True) + (r - 1) * dmd_step(cfg, batch, False)) / r
  f = turn_forward(cfg.model, cfg.data.res, cfg.data.num_turns + 1 if cfg.causal.full_cache else cfg.causal.window)
  parts = dmd_parts(cfg, generator is not False)
  return float(batch * sum(n * (u * f + text_forward(cfg.model, l)) for n, u, l in parts.values()))
