"""Record a ComfyUI client's websocket messages, one JSON object per line, until killed.

Run by the ComfyUI server test with the ComfyUI virtualenv's python (which has aiohttp); the test's own
environment needs no websocket client. Usage: ws_listen.py URL OUT_FILE
"""

import asyncio
import sys

import aiohttp


async def main(url: str, out: str) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        with open(out, "a", encoding="utf-8") as f:
            f.write('{"type": "glmq_listener_ready"}\n')
            f.flush()
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:  # binary frames are preview images
                    f.write(msg.data.replace("\n", " ") + "\n")
                    f.flush()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
