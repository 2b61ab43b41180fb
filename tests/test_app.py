"""The web app as its users meet it: a whole session through the API, bad input answered with one
line while other sessions go on, and a person's session in headless Chromium (upload, three
edits, undo, a branch, download). Runs over the shipped toy student."""
import argparse
import json
import os
import shutil
import socket
import threading
import zipfile

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from anchoredit_jax import app as webapp
from anchoredit_jax.data import shapes
from anchoredit_jax.inference import load_edit_run
from anchoredit_jax.session import EditTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(ROOT, "checkpoints", "toy", "distill")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
  port = _free_port()
  args = argparse.Namespace(checkpoint=CHECKPOINT, host="127.0.0.1", port=port, buckets="1,2",
                            max_upload_mb=5.0)
  app, page = webapp.serve(args, block=False)
  yield app, f"http://127.0.0.1:{port}/"
  page.close()
  app.close()


@pytest.fixture(scope="module")
def client(served):
  return Client(served[1], verbose=False)


def _unzip(path, into):
  with zipfile.ZipFile(path) as z:
    z.extractall(into)
  return os.path.join(into, "session")


def test_the_api_drives_a_whole_session(client, tmp_path):
  seq = shapes.make_sequence(3, webapp.SCENE_TURNS, 32, split="heldout")
  sid, image, strip, tree, status, drift = client.predict(3, api_name="/new_scene")
  assert seq["instructions"][0] in status and "turn 1" in drift
  for k in (1, 2):  # the scene's own script: the drift readout has ground truth
    sid, image, strip, tree, status, drift = client.predict(sid, seq["instructions"][k - 1], api_name="/edit")
    assert status.startswith(f"Turn {k} (node #{k})") and drift.startswith(f"Drift at turn {k}")
  assert "dB" in drift and Image.open(strip).size == (3 * 128, 142)
  _, _, _, tree, status, _ = client.predict(sid, api_name="/undo")
  assert status.startswith("Node #1 (turn 1)") and tree["value"] == "1"
  _, _, _, tree, status, drift = client.predict(sid, "1", "make the shape yellow", api_name="/branch")
  assert status.startswith("Turn 2 (node #3)") and "left the scene's script at turn 2" in drift
  assert [v for _, v in tree["choices"]] == ["0", "1", "2", "3"]  # depth first: 2 and 3 under 1
  _, _, _, _, status, _ = client.predict(sid, "2", api_name="/goto")
  assert status.startswith("Node #2")
  _, _, _, _, status, _ = client.predict(sid, api_name="/redo")
  assert "nothing to redo" in status  # node 2 has no child
  zipped, said = client.predict(sid, api_name="/download")
  folder = _unzip(zipped, tmp_path)
  assert "4 nodes" in said and os.path.exists(os.path.join(folder, "strip.png"))
  back = EditTree.load(folder, *load_edit_run(CHECKPOINT))
  assert back.path() == [0, 1, 2] and back.node(3).instruction == "make the shape yellow"
  assert back.node(2).instruction == seq["instructions"][1]


def test_bad_input_is_one_line_and_no_other_session_is_touched(served, client, tmp_path):
  app = served[0]
  other = client.predict(0, api_name="/new_scene")[0]
  text = tmp_path / "notes.png"
  text.write_text("not an image")
  huge = tmp_path / "huge.png"
  Image.new("L", (5000, 5000)).save(huge)  # 25 megapixels in a file of a few KB
  answers = [
      client.predict(handle_file(str(text)), api_name="/new_upload")[4],
      client.predict(handle_file(str(huge)), api_name="/new_upload")[4],
      client.predict(other, "   ", api_name="/edit")[4],
      client.predict("nosuchsession", "make it red", api_name="/edit")[4],
      client.predict(other, "99", api_name="/goto")[4],
      client.predict(other, api_name="/undo")[4],
      client.predict(-1, api_name="/new_scene")[4],
  ]
  for a, want in zip(answers, ["notes.png could not be read as an image", "more than the", "instruction is empty",
                               "no session 'nosuchsession'", "no node 99", "nothing to undo", "scene -1"]):
    assert a.startswith("⚠") and want in a and "\n" not in a and "Traceback" not in a, a
  # two tabs on one session, four edits at once: all land on that tree, and the other is intact
  sid = client.predict(1, api_name="/new_scene")[0]
  out = []
  threads = [threading.Thread(target=lambda i=i: out.append(Client(served[1], verbose=False).predict(
      sid, f"make the red circle blue {i}", api_name="/edit")[4])) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  # (each edit goes on from the node current when it was asked for: edits asked at once branch)
  assert len(out) == 4 and all(o.startswith("Turn ") for o in out), out
  assert sorted(int(o.split("(node #")[1].split(")")[0]) for o in out) == [1, 2, 3, 4], out
  assert len(app.sessions.get(sid).nodes) == 5 and len(app.sessions.get(other).nodes) == 1


def test_a_person_edits_undoes_branches_and_downloads_in_chromium(served, tmp_path):
  from playwright.sync_api import expect, sync_playwright  # the browser test's own dependency
  assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)"
  source, seq = tmp_path / "source.png", shapes.make_sequence(5, 4, 32, split="heldout")
  Image.fromarray(seq["images"][0]).save(source)
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1280, "height": 1100}, accept_downloads=True)
    page.goto(served[1])
    status = page.locator("#status")
    page.locator("input[type=file]").first.set_input_files(str(source))
    expect(status).to_contain_text("Image loaded", timeout=60_000)
    box = page.locator("#instruction textarea")
    page.locator("#edit").click()  # nothing typed yet
    expect(status).to_contain_text("the instruction is empty")
    for k, said in enumerate(seq["instructions"][:3], start=1):
      box.fill(said)
      page.locator("#edit").click()
      expect(status).to_contain_text(f"Turn {k} (node #{k})", timeout=60_000)
    page.locator("#undo").click()
    expect(status).to_contain_text("Node #2 (turn 2) is current")
    page.locator("#tree").get_by_text("#1 turn 1").click()
    expect(status).to_contain_text("Node #1 (turn 1) is current")
    box.fill(seq["instructions"][3])
    page.locator("#branch").click()
    expect(status).to_contain_text("Turn 2 (node #4)", timeout=60_000)
    expect(page.locator("#tree")).to_contain_text(f"#4 turn 2: {seq['instructions'][3]}")
    page.locator("#download").click()
    link = page.locator("#zip a").first
    expect(link).to_be_visible(timeout=60_000)
    with page.expect_download() as dl:
      link.click()
    saved = tmp_path / "session.zip"
    dl.value.save_as(saved)
    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    browser.close()
  folder = _unzip(saved, tmp_path / "unzipped")
  meta = json.loads(open(os.path.join(folder, "tree.json")).read())
  assert len(os.listdir(os.path.join(folder, "images"))) == 5
  assert meta["current"] == 4 and [n["parent"] for n in meta["nodes"]] == [None, 0, 1, 2, 1]
  assert [n["instruction"] for n in meta["nodes"]] == ["", *seq["instructions"][:3], seq["instructions"][3]]
  picture = np.asarray(Image.open(shot))
  assert picture.shape[0] > 600 and picture.std() > 10  # a rendered page, not a blank one
  if os.environ.get("ANCHOREDIT_APP_SCREENSHOT"):  # make screenshot: the README's picture
    shutil.copy(shot, os.path.join(ROOT, os.environ["ANCHOREDIT_APP_SCREENSHOT"]))
