"""The web app: edit an image turn by turn in the browser, with undo, redo and branches, on one
batched engine that every open tab shares.

  python -m anchoredit_jax.app --checkpoint checkpoints/toy/distill      # or: make demo

Start from an uploaded image or a held-out ShapesEdit scene (whose ground truth gives a drift
readout), type an instruction, and every edit becomes a node of the session's tree: click any
node to make it current, undo and redo move along the tree, "Branch from here" edits the chosen
node into a new branch, and the whole tree downloads as a zip (PNGs, tree.json, memories). A
tab's session id can be opened in another tab. Every action is also an API endpoint (gradio's
client: `gradio_client.Client(url).predict(..., api_name="/edit")`). Bad input gets a one-line
message in the page; no request can stop the server or touch another session.
"""
import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves this machine

import gradio as gr  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from anchoredit_jax import cli  # noqa: E402
from anchoredit_jax.data import shapes  # noqa: E402
from anchoredit_jax.edit import load_image, strip  # noqa: E402
from anchoredit_jax.errors import short  # noqa: E402
from anchoredit_jax.eval.metrics import turn_metrics  # noqa: E402
from anchoredit_jax.inference import load_edit_run  # noqa: E402
from anchoredit_jax.serve import Busy, Engine, Sessions  # noqa: E402
from anchoredit_jax.session import EditTree  # noqa: E402

CSS = "#tree .wrap {flex-direction: column; align-items: flex-start} #tree label {white-space: pre}"
VIEW = 256            # pixels the current image is shown at (nearest-neighbour upscaling)
SCENE_TURNS = 16      # turns of ground truth a ShapesEdit scene brings
MAX_PIXELS = 4096 * 4096  # larger uploads are refused before they are decoded in full


class App:
  """The state behind the page: one engine, the sessions by id, each scene's ground truth."""

  def __init__(self, cfg, graphdef, params, *, buckets=(1, 2, 4, 8), max_wait_s=0.015, idle_s=600.0,
               timeout_s=120.0):
    self.cfg, self.graphdef, self.params = cfg, graphdef, params
    self.engine = Engine(cfg, graphdef, params, buckets=buckets, max_wait_s=max_wait_s)
    self.sessions, self.scenes, self.timeout_s = Sessions(idle_s), {}, timeout_s
    self.files = tempfile.mkdtemp(prefix="anchoredit_app_")
    self._lock = threading.Lock()

  @property
  def res(self):
    return self.cfg.data.res

  def close(self):
    self.engine.close()
    shutil.rmtree(self.files, ignore_errors=True)

  # -- what every action returns: (session id, current image, path strip, tree, status, drift) --
  def view(self, sid, status=""):
    tree = self.sessions.get(sid)
    with tree.lock:
      cur = tree.node(tree.current)
      path = [tree.node(i) for i in tree.path()]
      big = np.asarray(Image.fromarray(cur.image).resize((VIEW, VIEW), Image.NEAREST))
      row = np.asarray(strip([n.image for n in path], ["source"] + [n.instruction for n in path[1:]]))
      choices = [(self._label(tree, i), str(i)) for i in self._order(tree)]
      drift = self._drift(sid, tree, path)
    return sid, big, row, gr.Radio(choices=choices, value=str(cur.id)), status, drift

  @staticmethod
  def _order(tree):
    """Node ids depth first from the source, children in the order they were made."""
    out, todo = [], [0]
    while todo:
      n = tree.node(todo.pop())
      out.append(n.id)
      todo.extend(reversed(n.children))
    return out

  @staticmethod
  def _label(tree, i):
    n = tree.node(i)
    depth = tree.turn(i)
    what = "source" if i == 0 else f"{n.instruction} ({n.seconds * 1000:.0f} ms)"
    return f"{'  ' * depth}{'└ ' if depth else ''}#{i} turn {depth}: {what}"

  def _drift(self, sid, tree, path):
    """Against the scene's ground truth while the path follows its script; else why not."""
    seq = self.scenes.get(sid)
    if seq is None:
      return "Drift: no ground truth for an uploaded image (pick a ShapesEdit scene for one)."
    k = len(path) - 1
    said = [n.instruction for n in path[1:]]
    if said != seq["instructions"][:k]:
      first = next(i for i, (a, b) in enumerate(zip(said, seq["instructions"])) if a != b) + 1
      return f"Drift: the path left the scene's script at turn {first}; no ground truth from there."
    if k == 0:
      return f"Drift: the scene's turn 1 is \"{seq['instructions'][0]}\"."
    f = lambda a: jnp.asarray(a[None], jnp.float32) / 255.0
    m = turn_metrics(f(path[-1].image), f(seq["images"][k]), f(seq["images"][0]),
                     jnp.asarray(seq["edit_masks"][k - 1][None]), jnp.asarray(seq["identity_masks"][k - 1][None]))
    nxt = (f" Next in the script: \"{seq['instructions'][k]}\"." if k < len(seq["instructions"]) else "")
    return (f"Drift at turn {k} against the ground truth: edit {'correct' if m['success'][0] else 'wrong'}, "
            f"identity {float(m['identity_psnr'][0]):.1f} dB (never-edited pixels against the "
            f"source), preserved {float(m['preserved_psnr'][0]):.1f} dB.{nxt}")

  # -- actions ------------------------------------------------------------------------------------
  def new_scene(self, seed):
    try:
      seed = int(seed)
      seq = shapes.make_sequence(seed, SCENE_TURNS, self.res, split="heldout")
    except (TypeError, ValueError) as e:
      return self._fail(None, f"scene {seed!r}: {short(e, 120)}; give a whole number >= 0")
    sid = self.sessions.add(EditTree(self.cfg, self.graphdef, self.params, seq["images"][0], seed=seed))
    self.scenes[sid] = seq
    return self.view(sid, f"Held-out scene {seed} loaded; its first instruction: \"{seq['instructions'][0]}\".")

  def new_upload(self, path):
    if not path:
      return self._fail(None, "no file came with the upload; choose a PNG or JPEG")
    name = os.path.basename(path)
    try:
      with Image.open(path) as img:  # the header only: a huge image is refused before decoding
        w, h = img.size
      if w * h > MAX_PIXELS:
        return self._fail(None, f"{name} is {w}x{h} pixels, more than the {MAX_PIXELS:,} accepted; "
                                "upload a smaller image")
      source, notices = load_image(path, self.res)
    except Exception as e:  # noqa: BLE001  (PIL raises many kinds on files that are not images)
      return self._fail(None, f"{name} could not be read as an image ({type(e).__name__}); upload a PNG or JPEG")
    sid = self.sessions.add(EditTree(self.cfg, self.graphdef, self.params, source))
    return self.view(sid, "Image loaded" + (f" ({'; '.join(notices)})" if notices else "") + ".")

  def edit(self, sid, instruction, node=None):
    instruction = (instruction or "").strip()
    if not instruction:
      return self._fail(sid, "the instruction is empty; type what to change, e.g. \"make the red circle blue\"")
    try:
      tree = self.sessions.get(sid)
      start = time.perf_counter()
      nid = self.engine.edit(tree, instruction, None if node is None else int(node), timeout=self.timeout_s)
    except Busy:
      return self._fail(sid, "the server is busy with other sessions; try again in a moment")
    except TimeoutError:
      return self._fail(sid, f"the edit took longer than {self.timeout_s:.0f} s and was dropped; try again")
    except (KeyError, ValueError) as e:
      return self._fail(sid, short(e, 200).strip("'\""))
    took = time.perf_counter() - start
    return self.view(sid, f"Turn {tree.turn(nid)} (node #{nid}) in {took * 1000:.0f} ms: \"{instruction}\".")

  def branch(self, sid, node, instruction):
    if node in (None, ""):
      return self._fail(sid, "choose the node to branch from in the tree first")
    return self.edit(sid, instruction, node)

  def move(self, sid, how, node=None):
    try:
      tree = self.sessions.get(sid)
      with tree.lock:
        nid = {"undo": tree.undo, "redo": tree.redo}[how]() if how != "goto" else tree.goto(int(node))
    except (KeyError, ValueError, TypeError) as e:
      return self._fail(sid, short(e, 200).strip("'\""))
    return self.view(sid, f"Node #{nid} (turn {tree.turn(nid)}) is current.")

  def open(self, sid):
    sid = (sid or "").strip()
    try:
      self.sessions.get(sid)
    except KeyError as e:
      return self._fail(None, short(e, 200).strip("'\""))
    return self.view(sid, f"Session {sid} opened.")

  def download(self, sid):
    """The tree as a zip (tree.json, images/, memories.safetensors, strip.png) -> its path."""
    try:
      tree = self.sessions.get(sid)
    except KeyError as e:
      return None, short(e, 200).strip("'\"")
    folder = tempfile.mkdtemp(dir=self.files)
    with tree.lock:
      tree.save(os.path.join(folder, "session"))
      path = [tree.node(i) for i in tree.path()]
    strip([n.image for n in path], ["source"] + [n.instruction for n in path[1:]]).save(
        os.path.join(folder, "session", "strip.png"))
    out = shutil.make_archive(os.path.join(folder, f"anchoredit_{sid}"), "zip", folder, "session")
    return out, f"Session {sid}: {len(tree.nodes)} nodes in the zip."

  def _fail(self, sid, message):
    """A one-line message; the page keeps showing the session as it is (if there is one)."""
    try:
      if sid:
        return self.view(sid, f"⚠ {message}")
    except KeyError:
      pass
    return sid, None, None, gr.Radio(choices=[], value=None), f"⚠ {message}", ""


def build_page(app: App) -> gr.Blocks:
  with gr.Blocks(title="AnchorEdit") as page:
    gr.Markdown("## AnchorEdit — multi-turn editing with an anchor memory")
    with gr.Row():
      with gr.Column(scale=1):
        upload = gr.File(label="Upload an image (PNG or JPEG)", type="filepath")
        with gr.Row():
          seed = gr.Number(label="or a held-out ShapesEdit scene", value=0, precision=0)
          scene = gr.Button("Load scene")
        sid = gr.Textbox(label="Session id (paste one to open it here)", elem_id="sid")
        reopen = gr.Button("Open session")
      with gr.Column(scale=2):
        image = gr.Image(label="Current turn", type="numpy", interactive=False, height=VIEW + 40)
        status = gr.Markdown(elem_id="status")
        instruction = gr.Textbox(label="Instruction", placeholder="make the red circle blue", elem_id="instruction")
        with gr.Row():
          edit = gr.Button("Edit", variant="primary", elem_id="edit")
          undo = gr.Button("Undo", elem_id="undo")
          redo = gr.Button("Redo", elem_id="redo")
          branch = gr.Button("Branch from here", elem_id="branch")
    path = gr.Image(label="This path, source first", type="numpy", interactive=False)
    drift = gr.Markdown(elem_id="drift")
    with gr.Row():
      tree = gr.Radio(label="Session tree (click a node to make it current)", elem_id="tree")
      with gr.Column():
        save = gr.Button("Download session", elem_id="download")
        zipped = gr.File(label="Session zip", interactive=False, elem_id="zip")
    outs = [sid, image, path, tree, status, drift]
    scene.click(app.new_scene, [seed], outs, api_name="new_scene")
    upload.upload(app.new_upload, [upload], outs, api_name="new_upload")
    reopen.click(app.open, [sid], outs, api_name="open")
    edit.click(app.edit, [sid, instruction], outs, api_name="edit")
    instruction.submit(app.edit, [sid, instruction], outs, api_name=False)
    undo.click(lambda s: app.move(s, "undo"), [sid], outs, api_name="undo")
    redo.click(lambda s: app.move(s, "redo"), [sid], outs, api_name="redo")
    tree.input(lambda s, n: app.move(s, "goto", n), [sid, tree], outs, api_name=False)
    branch.click(app.branch, [sid, tree, instruction], outs, api_name=False)
    # the API's goto and branch name a node by id (the tree's choices are the last view's)
    node = gr.Textbox(visible=False)
    api_goto, api_branch = gr.Button(visible=False), gr.Button(visible=False)
    api_goto.click(lambda s, n: app.move(s, "goto", n), [sid, node], outs, api_name="goto")
    api_branch.click(app.branch, [sid, node, instruction], outs, api_name="branch")
    save.click(app.download, [sid], [zipped, status], api_name="download")
  return page


def parse(argv):
  ap = argparse.ArgumentParser(description=cli.description(__doc__))
  ap.add_argument("--checkpoint", default="checkpoints/toy/distill",
                  help="a stage-2 or 3 run or reference checkpoint (default: the shipped toy student)")
  ap.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
  ap.add_argument("--port", type=int, default=7860)
  ap.add_argument("--buckets", default="1,2,4,8", help="batch sizes the engine compiles at start")
  ap.add_argument("--max-upload-mb", type=float, default=20.0, help="larger uploads are refused")
  return cli.parse_args(ap, argv)


def serve(args, *, block=True):
  """Load the model, compile the engine's batch sizes, serve the page -> (app, page)."""
  try:
    buckets = tuple(int(b) for b in args.buckets.split(","))
  except ValueError:
    raise ValueError(f"--buckets={args.buckets!r}: give batch sizes like 1,2,4,8") from None
  app = App(*load_edit_run(args.checkpoint), buckets=buckets)
  print(f"compiling batch sizes {buckets} ...", flush=True)
  app.engine.warmup()
  page = build_page(app)
  page.queue(default_concurrency_limit=8, max_size=256)
  page.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=not block,
              max_file_size=int(args.max_upload_mb * 1024 * 1024), ssr_mode=False, quiet=not block,
              footer_links=[], css=CSS)
  return app, page


def main(argv=None):
  args = parse(argv)
  try:
    serve(args)
  except (FileNotFoundError, ValueError, OSError) as e:
    print(f"error: {short(e, 300)}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
