"""The studio's copy of the wire contract and of the pacer's parameters, held to their Python owners.

app/static/studio.js runs in the browser and cannot import inference/protocol.py or inference/pacing.py, so
it declares what it needs of them. These tests read those declarations out of the script (its `const`
lines, the `PACING` object and the DataView calls that read and write the frame header) and compare them
with the Python definitions: a constant that drifts on either side fails here, before a browser ever
meets a worker that disagrees with it. The studio page's own limits (prompt length, seed range, canvas
size, step choices) are rendered from the same definitions; the last test reads them off the page.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from litestar.testing import TestClient

from app.auth import SESSION_COOKIE, mint_sandbox_session_token
from app.factory import create_app
from app.settings import load_settings
from inference import pacing, protocol
from inference.protocol import CloseCode
from tests.conftest import ROOT

STUDIO_JS = ROOT / "app" / "static" / "studio.js"

# The script's names for the protocol's limits.
PROTOCOL_LIMITS = {
    "SIZE": protocol.OUTPUT_SIZE,
    "MAX_UNACKED": protocol.MAX_UNACKED,
    "MAX_CAPTURE_FPS": protocol.MAX_CLIENT_FPS,
    "MAX_PROMPT_CHARS": protocol.MAX_PROMPT_CHARS,
    "MAX_SEED": protocol.MAX_SEED,
    "MAX_FRAME_ID": protocol.MAX_FRAME_ID,
    "HEADER_BYTES": protocol.FRAME_HEADER_BYTES,
    "MAX_STYLE_IMAGE_BYTES": protocol.MAX_STYLE_IMAGE_BYTES,
    "HEADER_KIND_AT": protocol.BINARY_KIND_AT,
    "KIND_STYLE_IMAGE": protocol.BinaryKind.STYLE_IMAGE,
}
_DATAVIEW_TYPES = {"I": "Uint32", "H": "Uint16", "h": "Int16", "i": "Int32", "B": "Uint8", "b": "Int8"}


def js_constants(source: str) -> dict[str, int | float]:
    """Every top-level `const NAME = number;` of the script."""
    found: dict[str, int | float] = {}
    for name, literal in re.findall(r"^const ([A-Z][A-Z0-9_]*) = ([0-9][0-9a-fA-FxX_.]*);", source, re.M):
        found[name] = _number(literal)
    return found


def js_object(source: str, name: str) -> dict[str, int | float]:
    """The number-valued members of the top-level object literal `const NAME = {...};`."""
    match = re.search(rf"^const {name} = \{{(.*?)^\}};", source, re.M | re.S)
    assert match, f"studio.js declares no object {name}"
    members = re.findall(r"^\s*([A-Za-z][A-Za-z0-9]*): ([0-9][0-9a-fA-FxX_.]*),?\s*$", match.group(1), re.M)
    body_lines = [line for line in match.group(1).splitlines() if line.strip()]
    assert len(members) == len(body_lines), f"{name} has members that are not plain numbers: {body_lines}"
    return {key: _number(literal) for key, literal in members}


def _number(literal: str) -> int | float:
    text = literal.replace("_", "")
    if text.lower().startswith("0x"):
        return int(text, 16)
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def header_fields() -> dict[int, tuple[str, str]]:
    """Offset -> (struct code, DataView type) of each field of the protocol's frame header."""
    fmt = protocol.FRAME_HEADER.format
    order, codes = fmt[0], fmt[1:]
    fields = {}
    for index, code in enumerate(codes):
        offset = struct.calcsize(order + codes[:index])
        fields[offset] = (code, _DATAVIEW_TYPES[code])
    return fields


def header_accesses(source: str, constants: dict[str, int | float]) -> list[tuple[str, int, bool]]:
    """(DataView type, offset, little-endian) of every header read or write the script makes."""
    accesses = []
    for kind, offset_name, rest in re.findall(
        r"\.(?:get|set)((?:Ui|I)nt(?:8|16|32))\((HEADER_\w+)([^)]*)\)", source
    ):
        assert offset_name in constants, f"{offset_name} is not a constant of studio.js"
        accesses.append((kind, int(constants[offset_name]), rest.replace(" ", "").endswith(",true")))
    return accesses


def pacing_name(js_key: str) -> tuple[str, float]:
    """The pacing.py constant a `PACING` member stands for, and the factor from its unit to the script's
    (pacing.py counts seconds, the script milliseconds: `...Ms` members)."""
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", js_key).upper()
    if snake.endswith("_MS"):
        return snake.removesuffix("_MS"), 1000.0
    return snake, 1.0


def pacing_parameters() -> dict[str, float]:
    """pacing.py's module-level numbers: the parameters of the algorithm."""
    return {
        name: value
        for name, value in vars(pacing).items()
        if name.isupper() and isinstance(value, int | float) and not isinstance(value, bool)
    }


@pytest.fixture(scope="module")
def source() -> str:
    return STUDIO_JS.read_text()


def test_the_studio_declares_the_protocols_limits_and_header_size(source: str) -> None:
    constants = js_constants(source)
    for name, value in PROTOCOL_LIMITS.items():
        assert name in constants, f"studio.js no longer declares {name}"
        assert constants[name] == value, f"studio.js {name} = {constants[name]}, the protocol says {value}"


def test_every_close_code_the_studio_names_is_the_protocols(source: str) -> None:
    constants = js_constants(source)
    declared = {
        name.removeprefix("CLOSE_"): value for name, value in constants.items() if name.startswith("CLOSE_")
    }
    assert declared, "studio.js declares no close codes"
    for name, value in declared.items():
        assert name in CloseCode.__members__, f"CLOSE_{name} is not a close code of the protocol"
        assert CloseCode[name] == value, (
            f"studio.js CLOSE_{name} = {value}, the protocol says {CloseCode[name]}"
        )


def test_the_studio_reads_and_writes_the_frame_header_where_the_protocol_puts_its_fields(source: str) -> None:
    constants = js_constants(source)
    fields = header_fields()
    accesses = header_accesses(source, constants)
    # At least the frame id written into input frames and the id and wait read from output frames.
    assert len(accesses) >= 3, accesses
    little_endian = protocol.FRAME_HEADER.format.startswith("<")
    for kind, offset, little in accesses:
        assert offset in fields, f"studio.js reads the header at byte {offset}, where no field starts"
        code, expected = fields[offset]
        assert kind == expected, f"header byte {offset} is a {code!r} ({expected}), studio.js uses {kind}"
        assert little == little_endian, f"studio.js reads header byte {offset} in the wrong byte order"


def test_the_studio_paces_with_the_parameters_of_inference_pacing(source: str) -> None:
    declared = js_object(source, "PACING")
    parameters = pacing_parameters()
    named = {}
    for key, value in declared.items():
        name, factor = pacing_name(key)
        assert name in parameters, f"PACING.{key} has no counterpart {name} in inference/pacing.py"
        assert value == pytest.approx(parameters[name] * factor), (
            f"PACING.{key} = {value}, inference/pacing.py {name} = {parameters[name]}"
        )
        named[name] = key
    missing = sorted(parameters.keys() - named.keys())
    assert not missing, f"inference/pacing.py parameters the studio's pacer does not declare: {missing}"


def test_the_studio_page_offers_what_the_protocol_accepts(tmp_path: Path) -> None:
    settings = load_settings({}, state_dir=tmp_path, dotenv=None)
    with TestClient(create_app(settings), base_url=settings.app_url) as client:
        client.cookies.set(SESSION_COOKIE, mint_sandbox_session_token(settings, "user_limits123"))
        page = client.get("/studio").text
    prompt = re.search(r'<textarea id="prompt"[^>]*maxlength="(\d+)"', page, re.S)
    seed = re.search(r'<input id="seed"[^>]*min="(\d+)" max="(\d+)"', page, re.S)
    canvas = re.search(r'<canvas id="output" width="(\d+)" height="(\d+)"', page)
    steps = re.search(r'<select id="steps".*?</select>', page, re.S)
    assert prompt, "the studio page has no prompt with a maxlength"
    assert seed, "the studio page has no seed with a range"
    assert canvas, "the studio page has no output canvas with a size"
    assert steps, "the studio page has no step choice"
    assert int(prompt.group(1)) == protocol.MAX_PROMPT_CHARS
    assert (int(seed.group(1)), int(seed.group(2))) == (0, protocol.MAX_SEED)
    assert (int(canvas.group(1)), int(canvas.group(2))) == (protocol.OUTPUT_SIZE, protocol.OUTPUT_SIZE)
    offered = [int(value) for value in re.findall(r'<option value="(\d+)"', steps.group(0))]
    selected = re.findall(r'<option value="(\d+)" selected', steps.group(0))
    assert offered, "the studio offers no step counts"
    assert all(protocol.MIN_STEPS <= value <= protocol.MAX_STEPS for value in offered), offered
    assert max(offered) == protocol.MAX_STEPS
    assert selected == [str(protocol.DEFAULT_STEPS)]
