"""glmq's node pack in a real ComfyUI server, driven through its HTTP API.

Starts upstream ComfyUI (``../shared/ComfyUI`` beside the repository, or ``$GLMQ_COMFYUI_DIR``) from a
temporary copy, in a virtualenv of its own (see ``comfy_env.py``; cached between runs), with
``comfyui_glmq/`` linked into ``custom_nodes/`` and the tiny GLM-Image in ``models/glm_image/``. Then it
queues the example workflow on ``/prompt``, waits on ``/history``, fetches the image from ``/view`` and
checks sizes, seeds, batches, node errors, unloading, progress and cancel. Skips where no ComfyUI tree is
present (a user's machine). Cold (virtualenv built from nothing) about 5-10 minutes; warm about 2.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
COMFY_SRC = Path(os.environ.get("GLMQ_COMFYUI_DIR", REPO.parent / "shared" / "ComfyUI"))
NODE_PACK = REPO / "comfyui_glmq"
UI_WORKFLOW = NODE_PACK / "example_workflows" / "glm_image_text_to_image.json"
API_WORKFLOW = NODE_PACK / "api_workflows" / "glm_image_text_to_image_api.json"
TINY = "glm-image-tiny"
GGUF = "glm-image-tiny-gguf"  # `glmq export gguf` of the tiny model
BROKEN = "glm-image-broken"  # a tiny folder without its DiT: listed (its model_index.json is fine), fails on load
START_TIMEOUT_S = 240

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (COMFY_SRC / "main.py").is_file(),
                       reason=f"no ComfyUI source tree at {COMFY_SRC} (set GLMQ_COMFYUI_DIR to one)"),
]


def _load_comfy_env():
    # This folder is not a package (pytest runs with --import-mode=importlib): load the helper by path.
    import importlib.util

    spec = importlib.util.spec_from_file_location("glmq_comfy_env", Path(__file__).with_name("comfy_env.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Server:
    def __init__(self, url: str, root: Path, log: Path, proc: subprocess.Popen, python: Path):
        self.url, self.root, self.log, self.proc, self.python = url, root, log, proc, python

    def request(self, method: str, path: str, body=None, timeout: float = 30):
        """(status, parsed JSON or raw bytes) of one HTTP request; HTTP errors are returned, not raised."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw

    def queue(self, workflow: dict, client_id: str | None = None):
        return self.request("POST", "/prompt", {"prompt": workflow, "client_id": client_id or uuid.uuid4().hex})

    def run(self, workflow: dict, timeout: float = 240, client_id: str | None = None) -> dict:
        status, body = self.queue(workflow, client_id)
        assert status == 200, f"/prompt refused the workflow: {body}"
        return self.wait(body["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"ComfyUI exited:\n{self.log_tail()}"
            status, body = self.request("GET", f"/history/{prompt_id}")
            if status == 200 and prompt_id in body and body[prompt_id].get("status", {}).get("completed") is not None:
                return body[prompt_id]
            time.sleep(0.2)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_tail()}")

    def images(self, entry: dict, node: str = "3") -> list[np.ndarray]:
        """The PNGs a finished prompt saved, fetched through /view, as uint8 arrays [H, W, 3]."""
        from PIL import Image

        assert entry["status"]["status_str"] == "success", f"prompt failed: {entry['status']}\n{self.log_tail()}"
        out = []
        for img in entry["outputs"][node]["images"]:
            query = urllib.parse.urlencode({k: img[k] for k in ("filename", "subfolder", "type")})
            status, raw = self.request("GET", f"/view?{query}")
            assert status == 200 and isinstance(raw, bytes), f"/view failed: {status}"
            out.append(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))
        return out

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir):
    env_mod = _load_comfy_env()
    work = tmp_path_factory.mktemp("comfyui")
    build_log = work / "venv-build.log"
    with open(build_log, "w") as log:
        try:
            python = env_mod.ensure_env(COMFY_SRC, log=log)
        except subprocess.CalledProcessError:
            pytest.fail(f"building the ComfyUI virtualenv failed:\n{build_log.read_text()[-4000:]}")
    broken = work / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "transformer")
    gguf = work / "gguf"
    subprocess.run([sys.executable, "-m", "glmq", "export", "gguf", str(tiny_dir), "--out", str(gguf)], check=True,
                   stdout=subprocess.DEVNULL)
    root = env_mod.prepare_tree(COMFY_SRC, work, {TINY: tiny_dir, BROKEN: broken, GGUF: gguf})
    log_path = work / "server.log"
    try:
        proc, url = env_mod.start_server(python, root, log_path, timeout=START_TIMEOUT_S)
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield Server(url, root, log_path, proc, python)
    finally:
        env_mod.stop_server(proc)


def example(size=(96, 64), steps=2, seed=7, batch=1, model=TINY) -> dict:
    """The repository's example API workflow, pointed at the tiny model and made small."""
    wf = json.loads(API_WORKFLOW.read_text())
    wf["1"]["inputs"]["model"] = model
    gen = wf["2"]["inputs"]
    gen.update(width=size[0], height=size[1], steps=steps, seed=seed, batch_size=batch)
    return wf


def test_nodes_are_registered(server):
    status, info = server.request("GET", "/object_info")
    assert status == 200
    assert info["GlmqImageLoader"]["display_name"] == "GLM-Image Loader (glmq)"
    assert info["GlmqImageGenerate"]["display_name"] == "GLM-Image Generate (glmq)"
    models = info["GlmqImageLoader"]["input"]["required"]["model"][0]
    assert {TINY, GGUF, BROKEN} <= set(models), models
    assert info["GlmqImageGenerate"]["output"] == ["IMAGE"]


SEED7 = {}  # the example workflow's seed-7 image, for the tests after the first to compare against


def seed7_image(server) -> np.ndarray:
    if "image" not in SEED7:
        SEED7["image"] = server.images(server.run(example(seed=7)))[0]
    return SEED7["image"]


def test_example_workflow_seed_batch_and_reload(server):
    first = server.images(server.run(example(seed=7)))
    assert len(first) == 1 and first[0].shape == (64, 96, 3)  # height x width: the sides are not swapped
    assert first[0].std() > 0  # an image, not a constant fill
    SEED7["image"] = first[0]

    # Batch of two: image i uses seed + i, so the first is the seed-7 image again and the second differs.
    batch = server.images(server.run(example(seed=7, batch=2)))
    assert len(batch) == 2
    assert np.array_equal(batch[0], first[0])
    assert not np.array_equal(batch[1], batch[0]), "seeds 7 and 8 gave the same pixels"

    # "Unload models" + "Free node cache": ComfyUI unloads the pipeline through our model entry; the same
    # workflow then reloads it and must give the same pixels again.
    loads = server.log_text().count("glmq: loading")
    status, _ = server.request("POST", "/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    deadline = time.monotonic() + 30
    while "glmq: unloaded" not in server.log_text():
        assert time.monotonic() < deadline, f"the pipeline was not unloaded:\n{server.log_tail()}"
        time.sleep(0.2)
    again = server.images(server.run(example(seed=7)))[0]
    assert server.log_text().count("glmq: loading") == loads + 1
    assert np.array_equal(again, first[0]), "same seed, different pixels after a reload"
    assert "Traceback" not in server.log_text(), server.log_tail()


def test_missing_model_is_a_node_error(server):
    status, body = server.queue(example(model="no-such-checkpoint"))
    assert status == 400, body
    errors = body["node_errors"]["1"]["errors"]
    assert any(e["type"] == "value_not_in_list" for e in errors), errors
    assert server.request("GET", "/system_stats")[0] == 200


def test_wrong_size_is_a_node_error(server):
    status, body = server.queue(example(size=(100, 64)))
    assert status == 400, body
    messages = " ".join(e.get("details", "") + e.get("message", "") for e in body["node_errors"]["2"]["errors"])
    assert "multiples of 32" in messages and "100x64" in messages, body


def test_broken_checkpoint_fails_on_its_node_and_server_keeps_running(server):
    entry = server.run(example(model=BROKEN))
    assert entry["status"]["status_str"] == "error"
    errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    assert len(errors) == 1, entry["status"]
    assert errors[0]["node_id"] == "1" and errors[0]["node_type"] == "GlmqImageLoader"
    assert "transformer" in errors[0]["exception_message"], errors[0]
    # The server answers, and its prompt worker still runs workflows.
    assert server.request("GET", "/system_stats")[0] == 200
    assert server.images(server.run(example(seed=11)))[0].shape == (64, 96, 3)


def test_gguf_folder_generates(server):
    image = server.images(server.run(example(model=GGUF, seed=7)))[0]
    assert image.shape == (64, 96, 3)
    # Q4_K_M AR and Q8_0 DiT: the AR may sample other tokens than the unquantized model, so only check that
    # this is a real image (the GGUF numerics are tested in tests/export).
    assert image.std() > 0


def test_reference_image_editing(server):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 112, 3), dtype=np.uint8)).save(server.root / "input" / "ref.png")
    wf = example(seed=7)
    wf["4"] = {"class_type": "LoadImage", "inputs": {"image": "ref.png"}}
    wf["2"]["inputs"]["image_1"] = ["4", 0]
    edited = server.images(server.run(wf))[0]
    assert edited.shape == (64, 96, 3)
    assert not np.array_equal(edited, seed7_image(server)), "the reference image changed nothing"


def _listen(server, client_id: str, out: Path) -> subprocess.Popen:
    ws = server.url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
    proc = subprocess.Popen([str(server.python), str(Path(__file__).with_name("ws_listen.py")), ws, str(out)])
    deadline = time.monotonic() + 30
    while not (out.exists() and "glmq_listener_ready" in out.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "websocket listener did not connect"
        time.sleep(0.1)
    return proc


def _messages(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_progress_per_stage_and_cancel(server, tmp_path):
    client = uuid.uuid4().hex
    out = tmp_path / "ws.jsonl"
    listener = _listen(server, client, out)
    try:
        # Progress: a short run reports the AR's tokens, then every DiT step, on the Generate node.
        server.run(example(seed=21, steps=3), client_id=client)
        progress = [m["data"] for m in _messages(out) if m.get("type") == "progress" and m["data"].get("node") == "2"]
        dit = [(p["value"], p["max"]) for p in progress if p["max"] == 3]
        assert dit == [(0, 3), (1, 3), (2, 3), (3, 3)], progress
        # The AR reports its tokens (about 250 here: the preview grid, the target grid, EOS), throttled to one
        # message per percent so a 1024x1024 image's 1281 tokens do not flood the browser.
        ar = [p["value"] for p in progress if p["max"] > 3]
        n_tokens = max(p["max"] for p in progress)
        assert n_tokens > 200 and ar[-1] == n_tokens and ar == sorted(ar), progress
        assert 20 < len(ar) <= 101, len(ar)

        # Cancel: a run of many steps stops within a step or two of POST /interrupt.
        steps = 1000  # the node's maximum; uncancelled, this run would take minutes
        status, body = server.queue(example(seed=22, steps=steps), client_id=client)
        assert status == 200, body
        prompt_id = body["prompt_id"]
        deadline = time.monotonic() + 120
        while not any(m.get("type") == "progress" and m["data"].get("max") == steps and m["data"]["value"] >= 2
                      for m in _messages(out)):
            assert time.monotonic() < deadline, f"the DiT loop did not start:\n{server.log_tail()}"
            time.sleep(0.05)
        t0 = time.monotonic()
        assert server.request("POST", "/interrupt", {})[0] == 200
        entry = server.wait(prompt_id, timeout=60)
        stopped_s = time.monotonic() - t0
        events = [event for event, _ in entry["status"]["messages"]]
        assert "execution_interrupted" in events, entry["status"]
        done = max(m["data"]["value"] for m in _messages(out)
                   if m.get("type") == "progress" and m["data"].get("max") == steps)
        print(f"cancel: stopped {stopped_s:.2f} s after /interrupt, at DiT step {done} of {steps}")
        assert done < steps / 2 and stopped_s < 10
    finally:
        listener.terminate()
        listener.wait()
    assert server.images(server.run(example(seed=23)))[0].shape == (64, 96, 3)


def _ui_to_api(ui: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to the API format the way ComfyUI's frontend does for these nodes:
    links become [source id, slot]; widget values fill the node's non-link inputs in order, with the extra
    "control after generate" value after a seed."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        info = object_info[node["type"]]
        inputs = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _, src, slot, *_ = links[inp["link"]]
                inputs[inp["name"]] = [str(src), slot]
        values = list(node.get("widgets_values", []))
        spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name in info["input_order"].get("required", []) + info["input_order"].get("optional", []):
            kind, opts = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
            if not (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN")) or name in inputs:
                continue
            inputs[name] = values.pop(0)
            if opts.get("control_after_generate"):
                values.pop(0)
        assert not values, f"{node['type']}: widget values left over: {values}"
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def test_ui_workflow_matches_api_workflow(server):
    status, info = server.request("GET", "/object_info")
    assert status == 200
    ui = json.loads(UI_WORKFLOW.read_text())
    api = json.loads(API_WORKFLOW.read_text())
    converted = _ui_to_api(ui, info)
    assert converted == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    # ComfyUI offers the UI workflow in its template browser, served from the node pack's example_workflows/.
    status, templates = server.request("GET", "/workflow_templates")
    assert status == 200 and templates.get(NODE_PACK.name) == [UI_WORKFLOW.stem], templates
    status, served = server.request("GET", f"/api/workflow_templates/{NODE_PACK.name}/{UI_WORKFLOW.name}")
    assert status == 200 and served == ui
