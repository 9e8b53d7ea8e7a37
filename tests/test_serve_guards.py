"""Issue 14 items 3 and 4: `pairforge serve` refuses a non-loopback host without a key (unless
--insecure), and refuses images above the build's pixel limit from the header, before the
pixels are decoded (a 13000x13000 PNG data URL is a 400, not 1.16 GB of RSS)."""

from __future__ import annotations

import base64
import io
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from pairforge.cli import app
from pairforge.errors import PairforgeError
from pairforge.serve import HTTPError, check_exposure, is_loopback, parse_chat_request


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}]}]}


@pytest.mark.parametrize("host, loop", [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True),
                                        ("[::1]", True), ("localhost", True),
                                        ("0.0.0.0", False), ("::", False), ("10.0.0.5", False),
                                        ("my-host.example", False)])
def test_loopback_hosts(host, loop):
    assert is_loopback(host) is loop


def test_a_public_host_needs_a_key_or_insecure():
    with pytest.raises(PairforgeError, match="--host 0.0.0.0 .* --api-key-env .* --insecure"):
        check_exposure("0.0.0.0", None, False)
    check_exposure("0.0.0.0", "MY_KEY", False)
    check_exposure("0.0.0.0", None, True)
    check_exposure("127.0.0.1", None, False)


def test_cli_refuses_before_loading_the_model_and_says_so_in_help():
    runner = CliRunner()
    r = runner.invoke(app, ["serve", "no-such-model-is-loaded", "--host", "0.0.0.0"])
    assert isinstance(r.exception, PairforgeError) and "--insecure" in str(r.exception)
    help_text = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200).output
    assert "--insecure" in help_text and "--api-key-env" in help_text


def test_an_image_above_the_pixel_limit_is_a_400():
    with pytest.raises(HTTPError) as e:
        parse_chat_request(body(data_url(Image.new("1", (5000, 5000)))), "m")
    assert e.value.status == 400 and "25,000,000 pixels, above the limit" in e.value.message
    assert "--max-pixels" not in e.value.message
    job = parse_chat_request(body(data_url(Image.new("RGB", (64, 48), (9, 9, 9)))), "m")
    assert job.request.images[0].size == (64, 48)
    for url in ("data:image/png;base64,!!!", "data:image/png;base64," +
                base64.b64encode(b"not an image").decode()):
        with pytest.raises(HTTPError) as e:
            parse_chat_request(body(url), "m")
        assert e.value.status == 400


BOMB = """
import base64, io, resource, sys, time
from PIL import Image
from pairforge.serve import HTTPError, parse_chat_request
buf = io.BytesIO()
Image.new("1", (13000, 13000)).save(buf, format="PNG")
url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
small = io.BytesIO()
Image.new("RGB", (8, 8)).save(small, format="PNG")  # warm-up: imports are not the bomb's cost
parse_chat_request({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
    "url": "data:image/png;base64," + base64.b64encode(small.getvalue()).decode()}}]}]}, "m")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try:
    parse_chat_request(body, "m")
    print("accepted")
except HTTPError as e:
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(e.status, grown // 1024, round(time.perf_counter() - t0, 2))
"""


def test_a_13000_square_png_is_refused_without_decoding_it():
    out = subprocess.run([sys.executable, "-c", BOMB], capture_output=True, text=True,
                         timeout=120)
    status, grown_mb, seconds = out.stdout.split()
    assert status == "400", out.stderr
    assert int(grown_mb) < 64  # decoding it as RGB would take 507 MB
    assert float(seconds) < 1  # was 9 s
