"""The page's HTTP side: public static files under a strict CSP, that weaken nothing else.

What the page does in a browser is tested in tests/browser.
"""

from __future__ import annotations

import itertools
import re
from html.parser import HTMLParser
from typing import Any

import pytest

from service.auth import key_hash
from service.routes import page
from service.routes.page import MEDIA_TYPES, STATIC_DIR

KEY = "a-page-test-key"
ASSETS = sorted(p.name for p in STATIC_DIR.iterdir() if p.suffix in MEDIA_TYPES)


def policy(header: str) -> dict[str, list[str]]:
    """A Content-Security-Policy header as {directive: sources}."""
    out = {}
    for part in header.split(";"):
        if part.strip():
            name, *sources = part.split()
            out[name] = sources
    return out


class Elements(HTMLParser):
    """Every start tag of a document with its attributes, and the text inside scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.script_text += data.strip()


def page_elements() -> Elements:
    parser = Elements()
    parser.feed((STATIC_DIR / "index.html").read_text())
    return parser


@pytest.fixture
def auth_client(make_client):
    return make_client(auth_disabled=False, api_key_hashes=(key_hash(KEY),))


@pytest.mark.parametrize("path", ["/", *(f"/static/{name}" for name in ASSETS)])
def test_page_files_are_public_under_a_strict_csp(auth_client, path):
    answer = auth_client.get(path)  # no key: the page is public
    assert answer.status_code == 200
    suffix = ".html" if path == "/" else path[path.rindex(".") :]
    assert answer.headers["content-type"] == MEDIA_TYPES[suffix]
    assert answer.headers["x-content-type-options"] == "nosniff"
    csp = policy(answer.headers["content-security-policy"])
    assert csp["default-src"] == ["'self'"]
    assert csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"]
    assert csp["connect-src"] == ["'self'"] and csp["img-src"] == ["'self'", "blob:"]
    assert csp["object-src"] == csp["base-uri"] == csp["frame-ancestors"] == ["'none'"]
    assert not [s for sources in csp.values() for s in sources if "unsafe" in s or "*" in s]


def test_the_page_does_not_open_the_api(auth_client):
    assert auth_client.get("/").status_code == 200
    assert auth_client.get("/v1/inversions/some-job").status_code == 401
    answer = auth_client.get("/v1/inversions/some-job", headers={"Referer": "/"})
    assert answer.status_code == 401
    assert auth_client.get("/v1/inversions/x", headers={"X-API-Key": KEY}).status_code == 404


def test_the_page_is_not_in_the_api_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not [p for p in paths if p.startswith("/static")]


def test_no_cors_on_the_page_unless_configured(client):
    answer = client.get("/", headers={"Origin": "https://elsewhere.example"})
    assert answer.status_code == 200
    assert not [h for h in answer.headers if h.startswith("access-control-")]


def test_only_the_page_files_are_served(client, monkeypatch, tmp_path):
    """Of the static folder, only files of the page's kinds, not hidden, are served."""
    for name in ("page.js", "notes.txt", "settings.py", ".secret.js"):
        (tmp_path / name).write_text("x")
    monkeypatch.setattr(page, "STATIC_DIR", tmp_path)
    assert client.get("/static/page.js").status_code == 200
    for name in ("notes.txt", "settings.py", ".secret.js", "nothing.js", "%2e%2e", "..%2fapp.py"):
        answer = client.get(f"/static/{name}")
        assert answer.status_code == 404, name
        assert answer.headers["content-type"] == "application/problem+json"


def test_no_inline_script_style_or_handler():
    page = page_elements()
    scripts = [attrs for tag, attrs in page.tags if tag == "script"]
    assert scripts and all(attrs.get("src") for attrs in scripts) and not page.script_text
    assert not [tag for tag, _ in page.tags if tag == "style"]
    inline = [(t, a) for t, a in page.tags for name in a if name == "style" or name[:2] == "on"]
    assert not inline


def test_no_third_party_asset():
    """Everything the page loads is the gateway's own: same-origin paths only."""
    links = [
        value
        for _, attrs in page_elements().tags
        for name, value in attrs.items()
        if name in ("src", "href") and value
    ]
    assert links and all(link.startswith("/") and not link.startswith("//") for link in links)
    for name in ASSETS:
        text = (STATIC_DIR / name).read_text()
        if name.endswith(".js"):
            imports = re.findall(r"""^import\b[^;]*?from\s+["']([^"']+)["']""", text, re.M)
            assert all(spec.startswith(("/static/", "./")) for spec in imports), imports
        if name.endswith(".css"):
            assert "@import" not in text and "url(" not in text


def form_controls() -> dict[str, dict[str, Any]]:
    """The page's named form controls, by name: the fields a submission sends."""
    return {
        str(attrs["name"]): {"tag": tag, **attrs}
        for tag, attrs in page_elements().tags
        if tag in ("input", "select", "textarea") and attrs.get("name")
    }


def test_the_form_sends_the_api_field_names_with_their_defaults(client):
    """The page's fields are submit fields of the OpenAPI schema (the model field is the
    hook for a pool that lists its models, shown only where it does); each placeholder is
    the contract's default (for a field absent by default, its example: the method's
    default); the method and inverse scheduler choices are the contract's."""
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    body = schema["paths"]["/v1/inversions"]["post"]["requestBody"]["content"]
    submit = body["multipart/form-data"]["schema"]
    controls = form_controls()
    unknown = set(controls) - set(submit["properties"]) - {"model"}
    assert not unknown, f"the page sends fields the API does not know: {unknown}"
    defaults = components["JobParams"]["properties"]
    numbers = {n: c for n, c in controls.items() if c.get("type") == "number"}
    assert numbers
    for name, control in numbers.items():
        # Absent by default (a method's own default applies): the contract's example is it.
        default = defaults[name].get("default")
        if default is None:
            default = defaults[name]["examples"][0]
        assert float(control["placeholder"]) == default, name
    tags = page_elements().tags
    start = next(i for i, (_, attrs) in enumerate(tags) if attrs.get("name") == "method")
    options = itertools.takewhile(lambda t: t[0] == "option", tags[start + 1 :])
    choices = [attrs["value"] for _, attrs in options]
    assert choices == defaults["method"]["enum"]
    start = next(i for i, (_, a) in enumerate(tags) if a.get("name") == "inverse_scheduler")
    options = itertools.takewhile(lambda t: t[0] == "option", tags[start + 1 :])
    assert [attrs["value"] for _, attrs in options] == defaults["inverse_scheduler"]["enum"]
