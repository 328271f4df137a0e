"""Screenshot of the example workflow in ComfyUI's web page (docs/comfyui_workflow.png).

Not a test: run by hand with the ComfyUI virtualenv's python (it needs aiohttp for Chrome's DevTools
protocol) on a machine with Chromium:

    python tests/comfyui/comfy_env.py                     # prints the ComfyUI virtualenv's python, PY
    PY tests/comfyui/screenshot.py docs/comfyui_workflow.png

It starts ComfyUI from a temporary copy of ../shared/ComfyUI with a tiny random-weight model named as in the
example workflow, opens the page in headless Chromium, loads the UI workflow through the page's own
``app.loadGraphData``, queues it (smaller and with fewer steps, so the Save Image node shows a result; the tiny
model's weights are random, so the image is noise) and saves a PNG of the page.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_env  # noqa: E402

WORKFLOW = comfy_env.NODE_PACK / "example_workflows" / "glm_image_text_to_image.json"


async def _cdp(ws, counter=[0], **msg):
    counter[0] += 1
    msg["id"] = counter[0]
    await ws.send_json(msg)
    while True:
        reply = await ws.receive_json()
        if reply.get("id") == counter[0]:
            if "error" in reply:
                raise RuntimeError(reply["error"])
            return reply["result"]


async def _eval(ws, expr: str):
    res = await _cdp(ws, method="Runtime.evaluate",
                     params={"expression": expr, "awaitPromise": True, "returnByValue": True})
    if "exceptionDetails" in res:
        raise RuntimeError(res["exceptionDetails"])
    return res["result"].get("value")


async def shoot(url: str, out: Path, devtools_port: int, size=(1500, 820)) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            try:
                async with session.get(f"http://127.0.0.1:{devtools_port}/json/list") as r:
                    pages = [p for p in await r.json() if p["type"] == "page"]
                    if pages:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            await _cdp(ws, method="Emulation.setDeviceMetricsOverride",
                       params={"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False})
            await _cdp(ws, method="Page.navigate", params={"url": url})
            for _ in range(300):  # the frontend sets window.app once its graph canvas is up
                if await _eval(ws, "!!(window.app && window.app.graph && window.app.canvas)"):
                    break
                await asyncio.sleep(0.2)
            else:
                raise RuntimeError("ComfyUI's frontend did not start")
            await asyncio.sleep(2)
            graph = json.loads(WORKFLOW.read_text())
            await _eval(ws, f"window.app.loadGraphData({json.dumps(graph)})")
            # Run it small, so that Save Image shows a result, then put the shipped values back on display.
            gen = next(n for n in graph["nodes"] if n["type"] == "GlmqImageGenerate")
            await _eval(ws, f"""(async () => {{
                const node = window.app.graph.getNodeById({gen["id"]});
                const set = (n, v) => {{ node.widgets.find(w => w.name === n).value = v; }};
                set("width", 256); set("height", 256); set("steps", 4);
                await window.app.queuePrompt(0, 1);
            }})()""")
            for _ in range(900):
                done = await _eval(ws, "fetch('/queue').then(r => r.json()).then(q => "
                                       "q.queue_running.length + q.queue_pending.length === 0)")
                if done:
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(2)
            await _eval(ws, f"""(() => {{
                const node = window.app.graph.getNodeById({gen["id"]});
                const set = (n, v) => {{ node.widgets.find(w => w.name === n).value = v; }};
                set("width", 1024); set("height", 1024); set("steps", 50);
                window.app.graph.setDirtyCanvas(true, true);
            }})()""")
            await asyncio.sleep(1)
            shot = await _cdp(ws, method="Page.captureScreenshot", params={"format": "png"})
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".partial.png")
            tmp.write_bytes(base64.b64decode(shot["data"]))
            tmp.replace(out)


def main(out: Path) -> None:
    comfy_dir = comfy_env.REPO.parent / "shared" / "ComfyUI"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny = work / "tiny"
        subprocess.run([sys.executable, "-m", "glmq", "make-tiny", str(tiny)], check=True,
                       stdout=subprocess.DEVNULL)
        name = json.loads(WORKFLOW.read_text())["nodes"][0]["widgets_values"][0]
        root = comfy_env.prepare_tree(comfy_dir, work, {name: tiny})
        # A returning user's settings: no first-run template dialog, no minimap over the graph.
        settings = root / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}))
        proc, url = comfy_env.start_server(Path(sys.executable), root, work / "server.log")
        port = comfy_env.free_port()
        browser = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu",
                                    f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
                                    f"--user-data-dir={work / 'chromium'}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            t0 = time.monotonic()
            asyncio.run(shoot(url, out, port))
            print(f"wrote {out} in {time.monotonic() - t0:.0f} s")
        finally:
            browser.terminate()
            browser.wait()
            comfy_env.stop_server(proc)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else comfy_env.REPO / "docs" / "comfyui_workflow.png")
