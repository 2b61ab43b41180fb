"""The optimizer every stage trains with (DMD's critic has a second one of its own)."""
import jax
import optax


def make_optimizer(ocfg, total_steps, frozen=()):
  """AdamW with warmup + cosine decay and global-norm clipping; the top-level parts named in
  `frozen` (e.g. a pretrained umT5) get no update and no optimizer state."""
  sched = optax.warmup_cosine_decay_schedule(0.0, ocfg.lr, ocfg.warmup_steps,
                                             max(total_steps, ocfg.warmup_steps + 1), ocfg.end_lr)
  tx = optax.chain(optax.clip_by_global_norm(ocfg.clip),
                   optax.adamw(sched, ocfg.b1, ocfg.b2, weight_decay=ocfg.weight_decay))
  if not frozen:
    return tx
  part = lambda path: jax.tree_util.keystr(path[:1], simple=True, separator="/")
  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if part(path) in frozen else "train", params)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def apply_gradients(tx, grads, opt_state, params):
  """One optimizer step -> (new params, new optimizer state)."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state
