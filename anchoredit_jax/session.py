"""An edit tree: multi-turn editing with undo, redo and branches.

  tree = EditTree.from_run("checkpoints/toy/distill", source_uint8)
  a = tree.edit("make the red circle blue")       # node 1, now current
  b = tree.edit("move the blue circle left")      # node 2, child of 1
  tree.undo()                                     # node 1 is current again
  c = tree.edit("make the blue circle large")     # node 3: a second child of 1 (a branch)
  tree.branch(0, "remove the green square")       # node 4: from the source itself
  tree.path(b)                                    # [0, 1, 2]
  tree.save("tree/")  ;  tree = EditTree.load("tree/", *checkpoint.load_params(...)[:3])

Every node keeps its image, its instruction, how long its turn took and the AnchorMemory after it.
Memories are immutable pytrees of constant size, so a branch costs one memory (about 1.2 MB on the
toy), never a copy of the history. A turn's noise is `fold_in(key(seed), node id)`: editing along
one path without undo gives exactly the turns of `inference.EditSession`, and a tree saved and
loaded continues on every branch bit for bit. `request` and `complete` are `edit`'s two halves
apart, for a server that runs the turns of many trees in one batch (`serve.py`).

On disk a tree is a folder: tree.json (nodes, sampler, seed, model fields), images/<id>.png and
memories.safetensors (one memory per node; no pickle).
"""
import dataclasses
import json
import os
import shutil
import threading
import time

import jax
import numpy as np
from PIL import Image
from safetensors.numpy import save_file

from anchoredit_jax.checkpoint import check_config_fields, config_fields
from anchoredit_jax.convert.tensors import Tensors
from anchoredit_jax.errors import short
from anchoredit_jax.inference import (Sampler, check_source, default_sampler, edit_turn_kept,
                                      instruction_tokens, load_edit_run, memory_from_leaves,
                                      source_memory, to_uint8)

FORMAT = 1


@dataclasses.dataclass
class Node:
  id: int
  parent: int | None
  instruction: str
  image: np.ndarray          # uint8 [R,R,3]
  memory: object             # AnchorMemory (batch 1) after this turn
  seconds: float = 0.0       # wall time of this turn's edit (0 for the source)
  children: list = dataclasses.field(default_factory=list)
  redo: int | None = None    # the child `redo` returns to: the one made or visited last


@dataclasses.dataclass(frozen=True)
class Pending:
  """An edit asked for and not yet run: its node id (reserved), parent, tokens [1,l] and noise key."""
  tree: "EditTree"
  id: int
  parent: int
  instruction: str
  tokens: jax.Array
  rng: jax.Array


class EditTree:
  """A tree of editing turns over one source image (node 0); `current` is where `edit` goes on."""

  def __init__(self, cfg, graphdef, params, source, *, sampler=None, seed=0, window=None):
    source = check_source(cfg, source)
    self.cfg, self.graphdef, self.params = cfg, graphdef, params
    self.sampler, self.seed = sampler or default_sampler(cfg), seed
    self.window = window or cfg.causal.window
    root = Node(0, None, "", source, source_memory(cfg, graphdef, params, source, self.window))
    self.nodes, self.current, self.next_id = {0: root}, 0, 1
    self.lock = threading.RLock()  # for callers that share a tree between threads (serve.py)

  @classmethod
  def from_run(cls, workdir, source, **kw):
    return cls(*load_edit_run(workdir), source, **kw)

  # -- reading ------------------------------------------------------------------------------------
  def node(self, node_id) -> Node:
    if isinstance(node_id, bool) or not isinstance(node_id, (int, np.integer)) or node_id not in self.nodes:
      raise ValueError(f"no node {node_id!r} in this tree (it has {len(self.nodes)} nodes, ids "
                       f"{min(self.nodes)}-{max(self.nodes)}; a pruned node is gone)")
    return self.nodes[int(node_id)]

  def path(self, node_id=None) -> list:
    """Node ids from the source (0) to `node_id` (default: the current node)."""
    out, n = [], self.node(self.current if node_id is None else node_id)
    while n is not None:
      out.append(n.id)
      n = None if n.parent is None else self.nodes[n.parent]
    return out[::-1]

  def turn(self, node_id=None) -> int:
    """How many edits lead from the source to the node."""
    return len(self.path(node_id)) - 1

  # -- editing ------------------------------------------------------------------------------------
  def request(self, instruction, node=None) -> Pending:
    """Check an edit of `node` (default: current) and reserve its node id; nothing runs yet."""
    parent = self.node(self.current if node is None else node).id
    tokens = instruction_tokens(self.cfg, instruction)
    nid, self.next_id = self.next_id, self.next_id + 1
    return Pending(self, nid, parent, instruction, tokens, jax.random.fold_in(jax.random.key(self.seed), nid))

  def complete(self, pending: Pending, image, memory, seconds: float) -> int:
    """Store a run edit (image float [R,R,3] in [0,1], the memory after it) as the new current node."""
    if pending.tree is not self or pending.id in self.nodes:
      raise ValueError(f"edit {pending.id} does not belong to this tree or was completed already")
    if pending.parent not in self.nodes:  # pruned while the edit ran: the result has no place
      raise ValueError(f"node {pending.parent} was pruned while its edit ran")
    self.nodes[pending.id] = Node(pending.id, pending.parent, pending.instruction, to_uint8(image),
                                  memory, seconds)
    parent = self.nodes[pending.parent]
    parent.children.append(pending.id)
    parent.redo, self.current = pending.id, pending.id
    return pending.id

  def edit(self, instruction, node=None) -> int:
    """Edit `node` (default: the current node) by one instruction; the new node becomes current."""
    p = self.request(instruction, node)
    t0 = time.perf_counter()
    mem = jax.device_put(self.nodes[p.parent].memory)  # host memories (an idle tree's) come back
    image, mem = edit_turn_kept(self.params, self.graphdef, mem, p.tokens, p.rng, sampler=self.sampler)
    image = np.asarray(image[0])
    return self.complete(p, image, mem, time.perf_counter() - t0)

  def branch(self, node, instruction) -> int:
    """A new child of an earlier node (the same as edit(instruction, node))."""
    return self.edit(instruction, node)

  def goto(self, node_id) -> int:
    n = self.node(node_id)
    if n.parent is not None:
      self.nodes[n.parent].redo = n.id
    self.current = n.id
    return n.id

  def undo(self) -> int:
    parent = self.nodes[self.current].parent
    if parent is None:
      raise ValueError("nothing to undo: the current node is the source image")
    self.nodes[parent].redo, self.current = self.current, parent
    return parent

  def redo(self) -> int:
    nxt = self.nodes[self.current].redo
    if nxt is None:
      raise ValueError(f"nothing to redo: node {self.current} has no edit after it")
    self.current = nxt
    return nxt

  def prune(self, node_id) -> list:
    """Remove a node and everything after it; the ids removed. The current node moves to the
    pruned node's parent if it was among them. The source cannot be pruned."""
    n = self.node(node_id)
    if n.parent is None:
      raise ValueError("the source image (node 0) cannot be pruned; start a new tree instead")
    gone, todo = [], [n.id]
    while todo:
      i = todo.pop()
      gone.append(i)
      todo.extend(self.nodes[i].children)
    parent = self.nodes[n.parent]
    parent.children.remove(n.id)
    if parent.redo == n.id:
      parent.redo = parent.children[-1] if parent.children else None
    if self.current in gone:
      self.current = parent.id
    for i in gone:
      del self.nodes[i]
    return sorted(gone)

  def offload(self):
    """Move every memory to host memory (numpy): an idle tree then holds no device memory; the
    next edit brings back the one memory it needs."""
    for n in self.nodes.values():
      n.memory = jax.device_get(n.memory)

  @property
  def offloaded(self) -> bool:
    """Whether no memory of this tree is on a device."""
    return all(isinstance(a, np.ndarray) for n in self.nodes.values() for a in jax.tree.leaves(n.memory))

  # -- saving ---------------------------------------------------------------------------------------
  def meta(self) -> dict:
    return {"format": FORMAT, "seed": self.seed, "sampler": dataclasses.asdict(self.sampler),
            "window": self.window, "stage": self.cfg.get("stage"), "config_fields": config_fields(self.cfg),
            "current": self.current, "next_id": self.next_id,
            "nodes": [{"id": n.id, "parent": n.parent, "instruction": n.instruction,
                       "seconds": round(n.seconds, 6), "children": n.children, "redo": n.redo,
                       "image": f"images/{n.id}.png"} for n in self.nodes.values()]}

  def save(self, path, *, overwrite=False):
    """Write the tree to the folder `path` (written beside it, then renamed into place)."""
    path = os.fspath(path).rstrip("/")
    if os.path.exists(path) and not overwrite:
      raise ValueError(f"{path} exists; pass overwrite=True or choose another folder")
    if os.path.exists(path) and not os.path.isfile(os.path.join(path, "tree.json")):
      raise ValueError(f"{path} exists and is not a saved edit tree; it is left as it is")
    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
      os.makedirs(os.path.join(tmp, "images"))
      for n in self.nodes.values():
        Image.fromarray(n.image).save(os.path.join(tmp, "images", f"{n.id}.png"))
      save_file({f"{n.id}/{i}": np.asarray(a) for n in self.nodes.values()
                 for i, a in enumerate(jax.tree.leaves(n.memory))},
                os.path.join(tmp, "memories.safetensors"))
      with open(os.path.join(tmp, "tree.json"), "w") as f:
        json.dump(self.meta(), f, indent=1)
      if os.path.exists(path):
        old = path + ".old"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
      else:
        os.replace(tmp, path)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)

  @classmethod
  def load(cls, path, cfg, graphdef, params):
    """A saved tree, to go on editing with the same run's weights."""
    path = os.fspath(path)
    try:
      with open(os.path.join(path, "tree.json")) as f:
        meta = json.load(f)
      mems = Tensors([os.path.join(path, "memories.safetensors")])
      images = {m["id"]: np.asarray(Image.open(os.path.join(path, m["image"])).convert("RGB"))
                for m in meta["nodes"]}
    except (OSError, ValueError, KeyError, TypeError) as e:  # missing, cut short, not a tree
      raise ValueError(f"{path} is not a readable saved edit tree ({short(e, 100)})") from e
    if meta.get("format") != FORMAT:
      raise ValueError(f"{path} is an edit tree of format {meta.get('format')}; this code reads {FORMAT}")
    if meta["stage"] != cfg.get("stage"):
      raise ValueError(f"{path} was saved by a {meta['stage']} model; load it with that model's "
                       f"weights, not a {cfg.get('stage')} model's")
    check_config_fields(f"the edit tree {path}", cfg, meta["config_fields"], only="model.",
                        against="this model", fix="load it with the model it was made with")
    self = cls.__new__(cls)
    self.cfg, self.graphdef, self.params = cfg, graphdef, params
    self.sampler, self.seed, self.window = Sampler(**meta["sampler"]), meta["seed"], meta["window"]
    self.current, self.next_id, self.nodes = meta["current"], meta["next_id"], {}
    self.lock = threading.RLock()
    keys = {}  # node id -> its memory's keys, in leaf order
    for k in sorted(mems.keys(), key=lambda k: tuple(int(p) for p in k.split("/"))):
      keys.setdefault(int(k.split("/")[0]), []).append(k)
    for m in meta["nodes"]:
      leaves = [mems[k] for k in keys.get(m["id"], [])]
      self.nodes[m["id"]] = Node(m["id"], m["parent"], m["instruction"], images[m["id"]],
                                 memory_from_leaves(cfg, self.window, leaves, path), m["seconds"],
                                 list(m["children"]), m["redo"])
    return self
